"""GLUE data: the standard TSV layout on disk, or the Hugging Face hub through ``datasets``.

Source layout: the GLUE distribution as written by ``download_glue_data.py`` (one folder per
task with ``train.tsv`` and ``dev*.tsv``), read with quoting off as BERT's ``run_classifier.py``
does. Column positions, label strings and metrics come from ``conf/task/<task>.yaml``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import datasets
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, DataCollatorWithPadding
from transformers.trainer_pt_utils import get_length_grouped_indices

from kdlsq_pl.data.tsv import DEFAULT_GLUE_DIRS, read_glue_tsv, resolve_glue_dir, task_files  # noqa: F401
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.options import Padding, allowed

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a batch that a BERT forward takes (``[B, T]`` each); drops ``labels`` and ``idx``."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def load_hub_split(task: Mapping[str, Any], split: str) -> dict[str, list]:
    """Load one split from the Hugging Face hub (``datasets.load_dataset``) in our column layout.

    Raises ``ConfigError`` with instructions for local data when the hub cannot be reached.
    """
    hub = task["hub"]
    try:
        ds = datasets.load_dataset(hub["path"], hub["name"], split=split)
    except Exception as e:  # offline, or no such dataset
        raise ConfigError(
            f"task={task['name']}: no local GLUE copy found and the hub dataset {hub['path']}/{hub['name']} could not be loaded "
            f"({type(e).__name__}); set GLUE_DIR=/path/to/glue or data.glue_dir=/path/to/glue") from None
    labels = list(task["labels"])
    if labels:
        ours = {name: i for i, name in enumerate(labels)}
        mapped = [ours[hub["labels"][y]] for y in ds["label"]]
    else:
        mapped = [float(y) for y in ds["label"]]
    return {"text_a": list(ds[hub["text_a"]]),
            "text_b": list(ds[hub["text_b"]]) if hub.get("text_b") else [None] * len(ds),
            "label": mapped, "idx": list(range(len(ds)))}


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process under ``torch.distributed``; ``(0, 1)`` outside it."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """The training order: shuffled (and length-grouped, as HF's ``LengthGroupedSampler``) as a function
    of ``(seed, epoch)`` alone, so a resumed run sees the same order; it can skip the batches a
    checkpoint had already trained. Under ``torch.distributed`` each process takes every
    ``world_size``-th index of that order from its rank on (so Lightning must not wrap it:
    ``use_distributed_sampler: false`` in ``conf/trainer/ddp*.yaml``).

    Lightning calls ``set_epoch`` before each epoch. ``resume_at(epoch, batches)`` makes the next
    iteration of that epoch start at batch ``batches`` of this process.

    Args:
        lengths: token count per example (``N`` ints), used when ``group_by_length``.
        batch_size: training batch size per process. seed: the run's seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed, self.group_by_length = list(lengths), batch_size, seed, group_by_length
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        self._resume = (int(epoch), int(batches))

    def order(self, epoch: int) -> list[int]:
        """This process's index order for ``epoch`` (all ``N`` indices in a single process)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.group_by_length:
            full = list(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))
        else:
            full = torch.randperm(len(self.lengths), generator=g).tolist()
        rank, n = world()
        if n > 1:
            full += full[: len(self) * n - len(full)]  # equal shares, as DistributedSampler pads
            full = full[rank::n]
        return full

    def __iter__(self):
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1] * self.batch_size
            self._resume = None
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / world()[1])


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, Path):
            h.update(p.read_bytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


class GLUEDataModule(pl.LightningDataModule):
    """Tokenised GLUE train and dev splits with dynamic padding per batch.

    Rows come from local TSVs (``data.glue_dir`` / ``$GLUE_DIR`` / ``../shared/data/glue``) or,
    with no local copy, from the hub. Tokenisation runs once through ``datasets.Dataset.map``
    and is cached as Arrow files under ``cache_dir/tokenized`` keyed by file contents,
    tokenizer and max length. Batches are dicts of ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (``[B, T]`` int64, T = longest in the batch), ``labels`` (``[B]``) and
    ``idx`` (``[B]``, the example's row number).

    Args:
        task: the task config (``conf/task/*.yaml``).
        tokenizer_path: a Hugging Face tokenizer directory or hub id.
        glue_dir: the GLUE root, or ``None`` to search the defaults and then the hub.
        cache_dir: where tokenised splits are cached.
        batch_size, eval_batch_size: examples per training / evaluation batch.
        max_length: truncation length in tokens.
        limit_train_examples, limit_eval_examples: keep only the first N rows (smoke runs).
        num_workers: DataLoader workers.
        group_by_length: draw training batches of similar length (Hugging Face's
            ``LengthGroupedSampler``: shuffled mega-batches of 50 batches sorted by length), which
            removes most padding (MRPC at batch 16: 30% of tokens) at the same number of steps.
        symmetric_pairs: train on every pair in both orders, (A, B) then (B, A) with the same label and ``idx``
            (the teacher recipe's ``task.teacher.symmetric_pairs``; sentence-transformers' cross-encoder STS-B
            recipe): twice the training rows, and a model that scores a pair the same either way round.
            Dev splits are unchanged.

    Raises:
        ConfigError: ``symmetric_pairs`` on a single-sentence task (at ``setup``).
    """

    def __init__(self, task: Mapping[str, Any], tokenizer_path: str, glue_dir: str | None, cache_dir: str,
                 batch_size: int = 32, eval_batch_size: int = 64, max_length: int = 128,
                 limit_train_examples: int | None = None, limit_eval_examples: int | None = None,
                 num_workers: int = 0, seed: int = 42, group_by_length: bool = True, padding: str = "dynamic",
                 symmetric_pairs: bool = False):
        super().__init__()
        self.task = task
        self.tokenizer_path = tokenizer_path
        self.glue_root = resolve_glue_dir(glue_dir)
        self.cache_dir = Path(cache_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length = max_length
        self.limits = {"train": limit_train_examples, "eval": limit_eval_examples}
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.symmetric_pairs = bool(symmetric_pairs)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if padding not in allowed(Padding):
            raise ConfigError(f"data.padding={padding!r} is not allowed; allowed: {', '.join(allowed(Padding))}")
        self.collator = DataCollatorWithPadding(self.tokenizer, padding="max_length" if padding == "max_length" else True,
                                                max_length=max_length if padding == "max_length" else None)
        self.splits: dict[str, datasets.Dataset] = {}
        self.split_keys: dict[str, str] = {}  # fingerprint of each tokenised split (source, tokenizer, length, limit)
        self.sampler: EpochSampler | None = None
        self._resume: tuple[int, int] | None = None

    @property
    def dev_keys(self) -> list[str]:
        """The dev split keys in config order (``["dev"]``, or ``["m", "mm"]`` for MNLI)."""
        return list(self.task["dev_files"])

    def rows(self, split: str) -> tuple[dict[str, list], str]:
        """Raw rows of ``split`` (``train`` or a dev key) and a fingerprint of their source."""
        if self.glue_root is not None:
            path = task_files(self.task, self.glue_root)[split]
            return read_glue_tsv(path, self.task), _fingerprint(path)
        hub_split = "train" if split == "train" else self.task["hub"]["dev_splits"][split]
        return load_hub_split(self.task, hub_split), _fingerprint(self.task["hub"], hub_split)

    def _tokenize(self, split: str) -> datasets.Dataset:
        rows, source = self.rows(split)
        limit = self.limits["train" if split == "train" else "eval"]
        if limit:
            rows = {k: v[:limit] for k, v in rows.items()}
        symmetric = self.symmetric_pairs and split == "train"
        if symmetric:  # each pair also in the other order (B, A), after the originals; same label and idx
            if any(b is None for b in rows["text_b"]):
                raise ConfigError(f"task.teacher.symmetric_pairs=true needs sentence pairs; task={self.task['name']} has single "
                                  "sentences; allowed: false")
            rows = {**{k: v + v for k, v in rows.items()}, "text_a": rows["text_a"] + rows["text_b"],
                    "text_b": rows["text_b"] + rows["text_a"]}
        key = _fingerprint(source, self.tokenizer_path, self.max_length, limit, len(rows["idx"]),
                           self.task["columns"], self.task["labels"], self.task["header"], *(("symmetric",) if symmetric else ()))
        self.split_keys[split] = key
        cache = self.cache_dir / "tokenized" / self.task["name"] / f"{split}-{key}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
        has_b = any(b is not None for b in rows["text_b"])
        if not has_b:
            rows = {k: v for k, v in rows.items() if k != "text_b"}
        ds = datasets.Dataset.from_dict(rows)

        def encode(batch):
            args = (batch["text_a"], batch["text_b"]) if has_b else (batch["text_a"],)
            return self.tokenizer(*args, truncation=True, max_length=self.max_length)

        ds = ds.map(encode, batched=True, cache_file_name=str(cache), load_from_cache_file=True,
                    remove_columns=[c for c in ("text_a", "text_b") if c in ds.column_names],
                    desc=f"tokenise {self.task['name']}/{split}")
        ds = ds.rename_column("label", "labels")
        ds.set_format("torch")
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Tokenise (or load from cache) the train split and every dev split once."""
        if self.splits:
            return
        datasets.disable_progress_bars()
        for split in ["train", *self.dev_keys]:
            self.splits[split] = self._tokenize(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.splits[split]
        sampler = None
        if shuffle:
            lengths = [len(ids) for ids in ds.with_format(None)["input_ids"]]
            sampler = self.sampler = EpochSampler(lengths, self.batch_size, self.seed, self.group_by_length)
            if self._resume is not None:
                sampler.resume_at(*self._resume)
        return DataLoader(ds, batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                          sampler=sampler, collate_fn=self.collator, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, int]:
        """Saved in every Lightning checkpoint: the epoch and how many of its batches were trained
        (``processed``: a checkpoint written in ``on_train_batch_end`` counts the batch just trained)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {"epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """On resume: the next training iteration of that epoch starts after the trained batches."""
        if "epoch" in state:
            self._resume = (int(state["epoch"]), int(state["batches"]))
            if self.sampler is not None:
                self.sampler.resume_at(*self._resume)

    def calibration_dataloader(self) -> DataLoader:
        """Shuffled training batches without length grouping (whose first batch is the longest).

        Batches hold the *global* batch (``batch_size x world size``), the same rows in every
        process, so DDP processes calibrate identical step sizes, equal to a single process's.
        """
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size * world()[1], shuffle=True,
                          collate_fn=self.collator, num_workers=self.num_workers, generator=gen)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        loaders = [self._loader(k, shuffle=False) for k in self.dev_keys]
        return loaders[0] if len(loaders) == 1 else loaders
