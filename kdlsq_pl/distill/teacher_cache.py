"""Teacher-output cache: the teacher's logits, hidden states and attention scores on the training split,
computed once per (teacher, task, max length, selection) and read back by example id.

Source: minimal hidden-state knowledge (Liu et al., ACL 2021, arXiv 2106.05691; METHODS.md section 4):
precompute the selected teacher knowledge (which layers, which tokens) once and train without
loading the teacher. Here every cell of a grid that shares a teacher and task reads one cache.

Layout of one cache folder (``<dir>/<task>/<key>/``), all ``.npy`` files opened as memory maps:

* ``meta.json``: the key's ingredients, shapes, the selection and the size in bytes;
* ``idx.npy`` ``[N]`` int64 example ids; ``tokens.npy`` ``[N]`` stored tokens per example
  (``min(length, max_tokens)``, real tokens only: no padding is stored);
* ``logits.npy`` ``[N, C]`` float32;
* ``hidden.npy``: per example ``[n_hidden, l, D]`` flattened one after the other;
* ``attn.npy``: per example ``[n_attn, H, l, l]`` pre-softmax scores flattened one after the other.

With a minimal-knowledge selection (:class:`kdlsq_pl.distill.selection.HiddenSelection`: the teacher states the
depth map needs, k tokens per example by [CLS] attention or first-k, a fraction of each vector's dimensions) only
the kept entries are stored, compressed, instead of ``hidden.npy``:

* ``sel_counts.npy`` ``[N, n_hidden]`` int32 kept tokens per example and state; ``sel_tokens.npy`` their positions
  (int16, flat); ``sel_dims.npy`` the kept dimensions of each kept token (int16 ``[k, m]`` flat; absent without a
  width budget); ``sel_values.npy`` the teacher's values there (``[k, m]`` or ``[k, D]`` flat, ``dtype``).

:meth:`TeacherCache.lookup` then also returns ``hidden_masks``, the live selection's masks
(:func:`kdlsq_pl.distill.selection.selection_masks`), so the loss is the live teacher's with the same selection.

Because only real tokens are stored, the distillation loss must ignore padding
(``loss.mask_padding=true``); the live teacher with that loss gives the same loss up to the
storage precision (exactly, with ``dtype=float32``, up to float rounding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.attention import capture_attention_scores
from kdlsq_pl.models.loading import model_digest, weight_files
from kdlsq_pl.results import atomic_output
from kdlsq_pl.options import CacheDtype, allowed

log = logging.getLogger("kdlsq_pl")

DTYPES = {name: np.dtype(name).type for name in allowed(CacheDtype)}
META_FILE = "meta.json"
#: Bumped whenever the files' layout or what is captured changes, so older caches are never read.
CACHE_FORMAT = 1
SEL_FILES = ("sel_counts", "sel_tokens", "sel_dims", "sel_values")


def teacher_digest(teacher_dir: str | Path) -> str:
    """SHA-1 (16 hex characters) over the teacher's ``config.json`` and every weight file (safetensors or
    ``.bin``, sharded or not): the teacher's identity in the cache key.

    Raises:
        ConfigError: the folder holds no weight file.
    """
    teacher_dir = Path(teacher_dir)
    if not weight_files(teacher_dir):
        raise ConfigError(f"teacher_cache: no weights (*.safetensors or *.bin) in the teacher folder {teacher_dir}")
    return model_digest(teacher_dir)


def cache_key(teacher_digest: str, task: str, max_length: int, data_key: str, selection: Mapping[str, Any]) -> str:
    """The folder name of one cache: a hash of the format version, the teacher's digest, the task, the max length
    (tokens), the tokenised training split's fingerprint and the selection (layers, tokens, dtype), which should
    be normalised (:func:`normalise_selection`). Any change in them gives another folder: a stale cache is never read."""
    parts = json.dumps([CACHE_FORMAT, teacher_digest, task, int(max_length), data_key, dict(sorted(selection.items()))], sort_keys=True)
    return hashlib.sha1(parts.encode()).hexdigest()[:16]


def _layers(chosen: Sequence[int] | None, count: int, what: str) -> list[int]:
    """``None`` -> all ``0..count-1``; a list -> sorted, deduplicated and range-checked (may be empty: none)."""
    if chosen is None:
        return list(range(count))
    chosen = sorted({int(i) for i in chosen})
    if any(not 0 <= i < count for i in chosen):
        raise ConfigError(f"teacher_cache.{what}={list(chosen)} is not allowed; allowed: a list of 0..{count - 1} or null (all)")
    return chosen


def _check_max_tokens(max_tokens: int | None) -> int | None:
    if max_tokens is not None and int(max_tokens) < 1:
        raise ConfigError(f"teacher_cache.max_tokens={max_tokens!r} is not allowed; allowed: an integer >= 1 or null (all)")
    return max_tokens


def normalise_selection(selection: Mapping[str, Any], num_layers: int, max_length: int) -> dict:
    """The selection in one canonical form, so equal selections share a cache: explicit sorted layer lists,
    ``max_tokens`` ``None`` when it keeps every token (``>= max_length``)."""
    max_tokens = _check_max_tokens(selection.get("max_tokens"))
    return {"hidden_layers": _layers(selection.get("hidden_layers"), num_layers + 1, "hidden_layers"),
            "attn_layers": _layers(selection.get("attn_layers"), num_layers, "attn_layers"),
            "max_tokens": None if max_tokens is None or int(max_tokens) >= max_length else int(max_tokens),
            "dtype": selection.get("dtype", "float16")}


def estimate_bytes(lengths: Sequence[int], n_hidden: int, n_attn: int, hidden_size: int, heads: int,
                   num_labels: int, max_tokens: int | None, itemsize: int) -> int:
    """Bytes on disk of a cache over examples of ``lengths`` tokens (before building it)."""
    l = np.minimum(np.asarray(lengths, dtype=np.int64), max_tokens or np.iinfo(np.int64).max)
    per_value = int((n_hidden * l * hidden_size).sum() + (n_attn * heads * l * l).sum())
    return per_value * itemsize + len(l) * (num_labels * 4 + 16)


class TeacherCache:
    """Read side of a built cache: :meth:`lookup` gives a batch's teacher outputs in the live teacher's layout.

    Memory maps open lazily (and are not pickled), so the object travels to spawned DDP workers.

    Args:
        path: a cache folder written by :func:`build_teacher_cache`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / META_FILE).read_text())
        self._arrays: dict[str, np.ndarray] | None = None
        self._staging: tuple[np.ndarray, np.ndarray] | None = None  # lookup's blocks, reused

    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta, "_arrays": None, "_staging": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            a = {k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in ("idx", "tokens", "logits", "hidden", "attn")}
            m = self.meta
            if m.get("selection"):
                a.update({k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in SEL_FILES if (self.path / f"{k}.npy").exists()})
                counts = a["sel_counts"].astype(np.int64)  # [N, nh]
                per_token = m["width_kept"] or m["hidden_size"]
                a["sel_tok_off"] = np.concatenate([[0], np.cumsum(counts.sum(1))])
                a["sel_val_off"] = a["sel_tok_off"] * per_token
            tokens = a["tokens"].astype(np.int64)
            dense = 0 if m.get("selection") else len(m["hidden_layers"])  # a selection stores no dense hidden.npy
            a["hidden_off"] = np.concatenate([[0], np.cumsum(dense * m["hidden_size"] * tokens)])
            a["attn_off"] = np.concatenate([[0], np.cumsum(len(m["attn_layers"]) * m["heads"] * tokens * tokens)])
            a["row"] = {int(i): r for r, i in enumerate(a["idx"])}
            self._arrays = a
        return self._arrays

    def lookup(self, idx: torch.Tensor, seq_len: int, device: torch.device | str = "cpu") -> dict:
        """Teacher outputs for the examples ``idx`` (``[B]`` int) padded to ``seq_len`` tokens.

        Returns a dict as the live teacher gives the loss: ``logits`` ``[B, C]`` float32;
        ``hidden_states``: ``L + 1`` entries ``[B, T, D]`` (``None`` for layers not cached);
        ``attention_scores``: ``L`` entries ``[B, H, T, T]`` (``None`` where not cached); ``mask``
        ``[B, T]`` bool, True at the stored positions (zeros elsewhere, which the loss ignores).

        Raises:
            KeyError: an example id the cache does not hold (another training split), naming the cache.
        """
        a, m = self._open(), self.meta
        missing = [int(i) for i in idx.tolist() if int(i) not in a["row"]]
        if missing:
            raise KeyError(f"teacher cache {self.path} holds no example id {missing[0]} (built for another training split?)")
        rows = [a["row"][int(i)] for i in idx.tolist()]
        B, T, D, H = len(rows), int(seq_len), m["hidden_size"], m["heads"]
        nh, na = (0 if m.get("selection") else len(m["hidden_layers"])), len(m["attn_layers"])
        # Gather the stored values into staging blocks of the stored dtype kept between calls (a fresh block this
        # size would be page-faulted in every step), one copy per example for all layers; then torch casts each
        # layer to its own float32 tensor (vectorized, on all threads; exact).
        shape_h, shape_a = (nh, B, T, D), (na, B, H, T, T)
        if self._staging is None or self._staging[0].shape != shape_h or self._staging[1].shape != shape_a:
            self._staging = (np.empty(shape_h, a["hidden"].dtype), np.empty(shape_a, a["attn"].dtype))
        stage_h, stage_a = self._staging
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, r in enumerate(rows):
            n = int(a["tokens"][r])
            l = min(n, T)
            h = a["hidden"][a["hidden_off"][r]:a["hidden_off"][r + 1]].reshape(nh, n, D)
            s = a["attn"][a["attn_off"][r]:a["attn_off"][r + 1]].reshape(na, H, n, n)
            stage_h[:, b, :l] = h[:, :l]
            stage_h[:, b, l:] = 0.0
            stage_a[:, b, :, :l, :l] = s[:, :, :l, :l]
            stage_a[:, b, :, :l, l:] = 0.0  # only the padding is zeroed: one write per element in all
            stage_a[:, b, :, l:, :] = 0.0
            mask[b, :l] = True
        hidden_masks: list[torch.Tensor | None] | None = None
        if m.get("selection"):
            hidden, sel_masks = self._selected(rows, T)
            hidden_masks = [None] * (m["num_layers"] + 1)
            for k, layer in enumerate(m["hidden_layers"]):
                hidden_masks[layer] = sel_masks[k].to(device)
        else:
            hidden = [torch.from_numpy(stage_h[k]).to(torch.float32, copy=True) for k in range(nh)]  # never the block
        attn = [torch.from_numpy(stage_a[k]).to(torch.float32, copy=True) for k in range(na)]
        hidden_states: list[torch.Tensor | None] = [None] * (m["num_layers"] + 1)
        for k, layer in enumerate(m["hidden_layers"]):
            hidden_states[layer] = hidden[k].to(device)
        scores: list[torch.Tensor | None] = [None] * m["num_layers"]
        for k, layer in enumerate(m["attn_layers"]):
            scores[layer] = attn[k].to(device)
        logits = torch.from_numpy(np.stack([a["logits"][r] for r in rows])).to(device)
        out = {"logits": logits, "hidden_states": hidden_states, "attention_scores": scores, "mask": mask.to(device)}
        if hidden_masks is not None:
            out["hidden_masks"] = hidden_masks
        return out

    def _selected(self, rows: list[int], T: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The compressed selection of ``rows`` as dense ``[B, T, D]`` float32 states (zeros where not kept) and
        their masks (``[B, T, D]`` bool, or ``[B, T]`` without a width budget), one per stored state."""
        a, m = self._open(), self.meta
        nh, D, width = len(m["hidden_layers"]), m["hidden_size"], m["width_kept"]
        B = len(rows)
        hidden = torch.zeros(nh, B, T, D)
        masks = torch.zeros((nh, B, T, D) if width else (nh, B, T), dtype=torch.bool)
        for b, r in enumerate(rows):
            t0, v0 = int(a["sel_tok_off"][r]), int(a["sel_val_off"][r])
            for k, count in enumerate(a["sel_counts"][r].tolist()):
                pos = torch.from_numpy(a["sel_tokens"][t0:t0 + count].astype(np.int64))
                n_val = count * (width or D)
                vals = torch.from_numpy(a["sel_values"][v0:v0 + n_val].astype(np.float32))
                if width:
                    dims = torch.from_numpy(a["sel_dims"][v0:v0 + n_val].astype(np.int64)).view(count, width)
                    hidden[k, b, pos[:, None], dims] = vals.view(count, width)
                    masks[k, b, pos[:, None], dims] = True
                else:
                    hidden[k, b, pos] = vals.view(count, D)
                    masks[k, b, pos] = True
                t0, v0 = t0 + count, v0 + n_val
        return list(hidden.unbind(0)), list(masks.unbind(0))


@torch.no_grad()
def build_teacher_cache(teacher: nn.Module, dataset, collate, out_dir: str | Path, *, hidden_layers: Sequence[int] | None = None,
                        attn_layers: Sequence[int] | None = None, max_tokens: int | None = None, dtype: str = "float16",
                        max_gb: float = 8.0, batch_size: int = 64, extra_meta: Mapping[str, Any] | None = None,
                        device: str | torch.device | None = None, selection: Any = None, sep_token_id: int | None = None) -> Path:
    """Run ``teacher`` once over ``dataset`` and write the cache folder ``out_dir`` (via a temporary folder, renamed).

    Args:
        teacher: the fine-tuned classifier (eager attention; put in eval mode here).
        dataset: the tokenised training split (rows with ``input_ids``, ``attention_mask``,
            ``token_type_ids``, ``idx``), e.g. ``GLUEDataModule.splits["train"]``.
        collate: a padding collator (``DataCollatorWithPadding``).
        hidden_layers: hidden-state indices to keep (0 = embedding output .. L), ``None`` for all.
        attn_layers: attention layers to keep (0 .. L-1), ``None`` for all.
        max_tokens: keep the first ``max_tokens`` tokens of each example (``[CLS]`` first), ``None`` for all.
        dtype: ``float16`` (half the disk) or ``float32``; logits are always float32.
        max_gb: refuse a cache whose estimated size exceeds this many GB (1e9 bytes).
        batch_size: examples per teacher forward (sorted by length, so little padding).
        device: where the teacher runs (default: CUDA when available, else CPU).
        selection: a :class:`kdlsq_pl.distill.selection.HiddenSelection` that is not the full knowledge: store only
            its kept entries of the ``hidden_layers`` states, compressed (see the module docstring).
        sep_token_id: the [SEP] id (a selection that excludes [SEP]).

    Raises:
        ConfigError: a bad selection or dtype, or an estimate above ``max_gb`` (one line, with the estimate).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"teacher_cache.dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    _check_max_tokens(max_tokens)
    cfg = teacher.config
    L, D, H = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    hidden_layers = _layers(hidden_layers, L + 1, "hidden_layers")
    attn_layers = _layers(attn_layers, L, "attn_layers")
    rows = dataset.with_format(None)
    lengths = [len(x) for x in rows["input_ids"]]
    tokens = np.minimum(np.asarray(lengths, dtype=np.int64), max_tokens or np.iinfo(np.int64).max)
    np_dtype = DTYPES[dtype]
    selecting = selection is not None and not selection.is_full
    width_kept = math.ceil(float(selection.width) * D - 1e-9) if selecting and selection.width else None
    size = estimate_bytes(lengths, 0 if selecting else len(hidden_layers), len(attn_layers), D, H, cfg.num_labels, max_tokens,
                          np.dtype(np_dtype).itemsize)
    if selecting:  # kept entries (values and int16 dims) plus int16 token positions
        kept = np.minimum(np.asarray(lengths), selection.tokens or np.iinfo(np.int64).max).sum() * len(hidden_layers)
        size += int(kept * ((width_kept or D) * (np.dtype(np_dtype).itemsize + (2 if width_kept else 0)) + 2))
    if size > max_gb * 1e9:
        raise ConfigError(f"teacher_cache: the cache would take {size / 1e9:.2f} GB > teacher_cache.max_gb={max_gb}; "
                          "keep fewer layers (teacher_cache.hidden_layers / attn_layers), fewer tokens "
                          "(teacher_cache.max_tokens) or raise max_gb")
    out_dir = Path(out_dir)
    with atomic_output(out_dir, directory=True) as tmp:  # readable by other users of a shared cache
        nh, na = (0 if selecting else len(hidden_layers)), len(attn_layers)
        sel: dict[str, list] = {k: [] for k in SEL_FILES}
        hidden_off = np.concatenate([[0], np.cumsum(nh * D * tokens)])
        attn_off = np.concatenate([[0], np.cumsum(na * H * tokens * tokens)])
        mm = np.lib.format.open_memmap
        hidden = mm(tmp / "hidden.npy", mode="w+", dtype=np_dtype, shape=(int(hidden_off[-1]),))
        attn = mm(tmp / "attn.npy", mode="w+", dtype=np_dtype, shape=(int(attn_off[-1]),))
        logits = mm(tmp / "logits.npy", mode="w+", dtype=np.float32, shape=(len(lengths), cfg.num_labels))
        np.save(tmp / "idx.npy", np.asarray(rows["idx"], dtype=np.int64))
        np.save(tmp / "tokens.npy", tokens)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher.to(device).eval()
        order = np.argsort(lengths, kind="stable")
        keys = ("input_ids", "attention_mask", "token_type_ids")
        for start in range(0, len(order), batch_size):
            chunk = [int(r) for r in order[start:start + batch_size]]
            batch = collate([{k: rows[r][k] for k in keys if k in rows.column_names} for r in chunk])
            with capture_attention_scores() as scores:
                out = teacher(**{k: batch[k].to(device) for k in keys if k in batch}, output_hidden_states=True)
            logits[chunk] = out.logits.float().cpu().numpy()
            if selecting:
                _store_selection(sel, selection, out.hidden_states, scores, batch, hidden_layers, chunk, sep_token_id, np_dtype)
            for b, r in enumerate(chunk):
                n = int(tokens[r])
                if nh:
                    h = torch.stack([out.hidden_states[i][b, :n] for i in hidden_layers])  # [nh, n, D]
                    hidden[hidden_off[r]:hidden_off[r + 1]] = h.float().cpu().numpy().reshape(-1)
                if na:
                    s = torch.stack([scores[i][b, :, :n, :n] for i in attn_layers])  # [na, H, n, n]
                    attn[attn_off[r]:attn_off[r + 1]] = s.float().cpu().numpy().reshape(-1)
        for a in (hidden, attn, logits):
            a.flush()
        del hidden, attn, logits
        if selecting:  # rows were written in length order: put them back in dataset order
            _save_selection(tmp, sel, len(lengths), len(hidden_layers), width_kept or D, np_dtype)
        meta = {"num_examples": len(lengths), "num_layers": L, "hidden_size": D, "heads": H, "num_labels": cfg.num_labels,
                "hidden_layers": hidden_layers, "attn_layers": attn_layers, "max_tokens": max_tokens, "dtype": dtype,
                "selection": dataclasses.asdict(selection) if selecting else None, "width_kept": width_kept,
                "bytes": sum(f.stat().st_size for f in tmp.iterdir()), **dict(extra_meta or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def _store_selection(sel: dict, selection, hidden_states, scores, batch, hidden_layers, chunk, sep_token_id, np_dtype) -> None:
    """Append the kept entries of one teacher batch (rows ``chunk`` of the dataset) to ``sel``'s per-row lists."""
    from kdlsq_pl.distill.selection import selection_masks

    sep = batch["input_ids"] == sep_token_id if sep_token_id is not None else None
    masks = selection_masks(selection, [h.cpu() for h in hidden_states], batch["attention_mask"].cpu(),
                            [x.cpu() for x in scores] if selection.needs_attention else None, sep, layers=hidden_layers)
    for b, r in enumerate(chunk):
        counts, toks, dims, vals = [], [], [], []
        for j in hidden_layers:
            h, mk = hidden_states[j][b].float().cpu(), masks[j][b]  # [T, D], [T] or [T, D]
            pos = (mk if mk.dim() == 1 else mk.any(-1)).nonzero().flatten()
            counts.append(len(pos))
            toks.append(pos.numpy().astype(np.int16))
            if mk.dim() == 1:
                vals.append(h[pos].numpy().reshape(-1))
            else:
                d = mk[pos].nonzero()[:, 1].view(len(pos), -1)  # ascending dims per kept token
                dims.append(d.numpy().astype(np.int16).reshape(-1))
                vals.append(h[pos[:, None], d].numpy().reshape(-1))
        sel["sel_counts"].append((r, np.asarray(counts, np.int32)))
        sel["sel_tokens"].append((r, np.concatenate(toks)))
        sel["sel_dims"].append((r, np.concatenate(dims) if dims else np.zeros(0, np.int16)))
        sel["sel_values"].append((r, np.concatenate(vals).astype(np_dtype)))


def _save_selection(tmp: Path, sel: dict, n_rows: int, n_layers: int, per_token: int, np_dtype) -> None:
    for key in SEL_FILES:
        by_row = dict(sel[key])
        if key == "sel_counts":
            arr = np.stack([by_row[r] for r in range(n_rows)]) if n_rows else np.zeros((0, n_layers), np.int32)
        else:
            arr = np.concatenate([by_row[r] for r in range(n_rows)])
        if key == "sel_dims" and not arr.size:
            continue
        np.save(tmp / f"{key}.npy", arr)


def ensure_teacher_cache(cache_cfg: Mapping[str, Any], teacher_dir: Path, dm, load_teacher, *, hidden: bool = True,
                         attn: bool = True, selection: Any = None, hidden_map: Sequence[int | None] | None = None) -> TeacherCache:
    """The cache for this teacher and training split, built first (under a file lock, so parallel grid
    cells build it once) if absent. ``load_teacher()`` is called only when building.

    Args:
        cache_cfg: the ``teacher_cache`` config (``dir``, ``dtype``, ``hidden_layers``, ``attn_layers``,
            ``max_tokens``, ``max_gb``).
        teacher_dir: the stored teacher (its config and weight files are hashed into the key).
        dm: the set-up ``GLUEDataModule`` (training split, collator, its fingerprint ``split_keys``).
        hidden, attn: whether the loss distils hidden states / attention scores; a term it does not use
            is not stored, whatever the selection says.
        selection, hidden_map: a minimal-knowledge :class:`~kdlsq_pl.distill.selection.HiddenSelection` (not the
            full one) and the loss's depth map: only the mapped teacher states are kept, and of them only the
            selected entries (part of the cache key).
    """
    from transformers import AutoConfig

    num_layers = int(AutoConfig.from_pretrained(str(teacher_dir)).num_hidden_layers)  # DistilBERT: n_layers
    chosen = normalise_selection(cache_cfg, num_layers, dm.max_length)
    selecting = hidden and selection is not None and not selection.is_full
    if selecting:  # only the states the depth map reaches, and of them the selected entries
        chosen["hidden_layers"] = sorted({j for j in (hidden_map or range(num_layers + 1)) if j is not None})
        chosen["hidden_selection"] = dataclasses.asdict(selection)
    if not hidden:
        chosen["hidden_layers"] = []
    if not attn:
        chosen["attn_layers"] = []
    digest = teacher_digest(teacher_dir)
    task = dm.task["name"]
    key = cache_key(digest, task, dm.max_length, dm.split_keys["train"], chosen)
    path = Path(cache_cfg["dir"]) / task / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        for stale in path.parent.glob(f".{key}.*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if not (path / META_FILE).exists():
            log.info("teacher cache: computing the teacher's outputs on %s/train once -> %s", task, path)
            build_teacher_cache(load_teacher(), dm.splits["train"], dm.collator, path, hidden_layers=chosen["hidden_layers"],
                                attn_layers=chosen["attn_layers"], max_tokens=chosen["max_tokens"], dtype=chosen["dtype"],
                                max_gb=float(cache_cfg["max_gb"]), selection=selection if selecting else None,
                                sep_token_id=dm.tokenizer.sep_token_id,
                                extra_meta={"teacher_dir": str(teacher_dir), "teacher_digest": digest, "task": task,
                                            "max_length": dm.max_length, "data_key": dm.split_keys["train"]})
        else:
            log.info("teacher cache: reusing %s", path)
    cache = TeacherCache(path)
    log.info("teacher cache: %d examples, %.2f GB, %s", cache.meta["num_examples"], cache.meta["bytes"] / 1e9, cache.meta["dtype"])
    return cache
