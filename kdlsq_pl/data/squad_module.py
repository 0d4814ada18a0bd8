"""The SQuAD ``LightningDataModule``: the task's examples as windowed features, batched like GLUE's.

Examples, features, answer decoding and scoring are :mod:`kdlsq_pl.data.squad`; this module only picks the
protocol's two parts (the official train and dev files, or the offline split of the dev file by article),
turns them into features once, and serves them through :class:`kdlsq_pl.data.glue.GLUEDataModule`'s
loaders (length-grouped training batches, dynamic padding, resumable epochs).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import datasets

from kdlsq_pl.data import squad
from kdlsq_pl.data.glue import GLUEDataModule

log = logging.getLogger(__name__)


class SQuADDataModule(GLUEDataModule):
    """SQuAD v1.1 / v2.0 features with dynamic padding per batch.

    Training batches: ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[B, T]`` (T = the longest window
    in the batch, at most ``task.max_length``), ``start_positions``, ``end_positions`` ``[B]`` (token indices;
    [CLS] = 0 when the answer is not in the window or the question has none) and ``idx`` ``[B]`` (the feature's
    row). Evaluation batches: the same inputs and ``idx``, the row in :attr:`eval_features`, which keeps each
    feature's ``example_id`` and ``offset_mapping`` for decoding (:class:`kdlsq_pl.data.squad.SpanEvaluator`).

    Args:
        task: the task config (``conf/task/squad.yaml``: ``version``, ``max_length``, ``doc_stride``,
            ``protocol``, ``eval_fraction``, ``split_seed``).
        squad_dir: ``data.squad_dir`` (``None``: ``$SQUAD_DIR``, ``../shared/data/squad``, the hub).
        limit_train_examples, limit_eval_examples: keep the first N *questions* of each part (smoke runs).
        The rest as :class:`GLUEDataModule`.

    Raises:
        ConfigError: from :func:`kdlsq_pl.data.squad.resolve_protocol` (bad protocol or folder); on
        :meth:`setup`, unreadable files, an unreachable hub, or windows that cannot hold a question.
    """

    def __init__(self, task: Mapping[str, Any], tokenizer_path: str, squad_dir: str | None, cache_dir: str, **kwargs: Any):
        super().__init__(task, tokenizer_path, None, cache_dir, **kwargs)
        self.squad_dir = squad_dir
        self.version = squad.check_version(task["version"])
        self.protocol = squad.resolve_protocol(task.get("protocol", "auto"), self.version, squad_dir)
        self.protocol_record: dict[str, Any] = {"protocol": self.protocol}
        self.eval_examples: list[dict] = []
        self.eval_features: datasets.Dataset | None = None

    def examples(self) -> tuple[list[dict], list[dict], dict[str, Any]]:
        """The training and evaluation example records and the protocol's record fields (protocol, sources,
        and for the offline split its articles and question counts)."""
        if self.protocol == squad.OFFLINE_PROTOCOL:
            dev, source = squad.load_squad(self.version, "dev", self.squad_dir)
            split = squad.split_by_article(dev, float(self.task.get("eval_fraction", 0.2)), int(self.task.get("split_seed", 0)))
            return split.train, split.eval, {**split.record(), "source": source}
        train, train_source = squad.load_squad(self.version, "train", self.squad_dir)
        dev, dev_source = squad.load_squad(self.version, "dev", self.squad_dir)
        return train, dev, {"protocol": squad.OFFICIAL_PROTOCOL, "train_source": train_source, "dev_source": dev_source}

    def setup(self, stage: str | None = None) -> None:
        """Read the protocol's examples and build the training and evaluation features once."""
        if self.splits:
            return
        datasets.disable_progress_bars()
        train, dev, info = self.examples()
        if self.limits["train"]:
            train = train[: self.limits["train"]]
        if self.limits["eval"]:
            dev = dev[: self.limits["eval"]]
        window = {"max_length": self.max_length, "doc_stride": int(self.task.get("doc_stride", squad.DOC_STRIDE))}
        feats = squad.train_features(train, self.tokenizer, **window)
        feats = feats.add_column("idx", list(range(len(feats))))
        evals = squad.eval_features(dev, self.tokenizer, **window)
        self.eval_examples = dev
        self.eval_features = evals.select_columns(["example_id", "offset_mapping"])
        evals = evals.remove_columns(["example_id", "offset_mapping"]).add_column("idx", list(range(len(evals))))
        feats.set_format("torch")
        evals.set_format("torch")
        self.splits = {"train": feats, "dev": evals}
        self.protocol_record = {**info, "train_questions": len(train), "eval_questions": len(dev),
                                "train_features": len(feats), "eval_features": len(evals)}
        log.info("SQuAD v%s, protocol %s: %d training questions (%d windows), %d evaluation questions (%d windows)",
                 self.version, self.protocol, len(train), len(feats), len(dev), len(evals))

    def score(self, evaluator: squad.SpanEvaluator) -> dict[str, float]:
        """The evaluator's decoded answers scored against :attr:`eval_examples` (x100), by the task's decoding settings."""
        t = self.task
        return evaluator.compute(self.eval_examples, self.eval_features, self.version,
                                 n_best_size=int(t.get("n_best_size", squad.N_BEST_SIZE)),
                                 max_answer_length=int(t.get("max_answer_length", squad.MAX_ANSWER_LENGTH)),
                                 null_score_diff_threshold=float(t.get("null_score_diff_threshold", 0.0)))
