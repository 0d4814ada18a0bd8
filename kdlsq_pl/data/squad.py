"""SQuAD v1.1 / v2.0 extractive question answering: data, features, answer decoding and scoring.

Sources:
    * the task and data: Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of
      Text" (EMNLP 2016) for v1.1, and "Know What You Don't Know: Unanswerable Questions for SQuAD"
      (ACL 2018) for v2.0 (``is_impossible`` questions whose gold answer is the empty string);
    * features and post-processing: the standard fine-tuning recipe of Hugging Face's
      ``examples/pytorch/question-answering/run_qa.py`` and ``utils_qa.py`` (sliding windows over the
      context, start/end logits per token, n-best decoding), re-implemented here;
    * scoring: the official ``evaluate-v1.1.py`` (through ``torchmetrics.text.SQuAD``) and the
      official ``evaluate-v2.0.py`` rules (re-implemented: torchmetrics scores v1.1 only).

Data lookup, as for GLUE (``kdlsq_pl.data.tsv``): an explicit directory, then ``$SQUAD_DIR``, then
``../shared/data/squad`` beside this repository, else the Hugging Face hub (``rajpurkar/squad``,
``rajpurkar/squad_v2``). Offline only ``dev-v1.1.json`` exists, so :func:`split_by_article` carves an
*offline* protocol out of it (:data:`OFFLINE_PROTOCOL`): its numbers are not official dev results.

Example records (one per question) are plain dicts in the hub's layout plus ``is_impossible``::

    {"id": str, "title": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]},   # empty lists when unanswerable
     "is_impossible": bool}

Heavy libraries (``datasets``, ``torchmetrics``) are imported inside the functions that need them, so
reading, splitting and scoring stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from kdlsq_pl.errors import ConfigError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
#: Searched when neither an explicit directory nor ``$SQUAD_DIR`` is given.
DEFAULT_SQUAD_DIRS = (REPO_DIR.parent / "shared" / "data" / "squad",)
ENV_VAR = "SQUAD_DIR"
VERSIONS = ("1.1", "2.0")
#: Hub datasets (``datasets.load_dataset``) by SQuAD version; their splits are ``train``, ``validation``.
HUB_DATASETS = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}
LOCAL_SPLITS = ("train", "dev")

#: Protocol of numbers measured on the official dev set (needs a train file or the hub).
OFFICIAL_PROTOCOL = "official-dev"
#: Protocol of numbers measured on the held-out articles of :func:`split_by_article`. Results
#: computed under it are *not* official SQuAD dev results and must carry this name.
OFFLINE_PROTOCOL = "offline-dev-split"
#: Name of the split of the dev file itself; its parts are ``dev-split/train`` and ``dev-split/eval``.
SPLIT_NAME = "dev-split"

MAX_LENGTH, DOC_STRIDE = 384, 128
N_BEST_SIZE, MAX_ANSWER_LENGTH = 20, 30


# --------------------------------------------------------------------------------------------- lookup
def resolve_squad_dir(squad_dir: str | os.PathLike | None) -> Path | None:
    """Return the local SQuAD directory to read, or ``None`` to use the hub.

    Order: ``squad_dir`` (the config value), then ``$SQUAD_DIR``, then ``../shared/data/squad``
    beside this repository (:data:`DEFAULT_SQUAD_DIRS`).

    Raises:
        ConfigError: an explicitly given directory (argument or ``$SQUAD_DIR``) that does not exist;
        it does not fall back silently to the hub.
    """
    for value, what in ((squad_dir, "data.squad_dir"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if value not in (None, ""):
            path = Path(os.path.expanduser(str(value)))
            if not path.is_dir():
                raise ConfigError(f"{what}={value} is not a directory; point it at a folder holding dev-v1.1.json (and train-v1.1.json / *-v2.0.json)")
            return path
    for path in DEFAULT_SQUAD_DIRS:
        if path.is_dir():
            return path
    return None


def check_version(version: Any) -> str:
    """``"1.1"`` or ``"2.0"`` from ``1.1``, ``"v2.0"``, ``2`` ...; raises ``ConfigError`` otherwise."""
    v = str(version).strip().lstrip("vV")
    v = {"1": "1.1", "2": "2.0"}.get(v, v)
    if v not in VERSIONS:
        raise ConfigError(f"squad.version={version!r} is not allowed; allowed: {', '.join(VERSIONS)}")
    return v


def squad_file(squad_dir: Path, version: str = "1.1", split: str = "dev") -> Path:
    """The official file name in ``squad_dir``: ``{train,dev}-v{1.1,2.0}.json`` (it may not exist).

    Raises:
        ConfigError: a split other than ``train`` / ``dev`` or an unknown version.
    """
    if split not in LOCAL_SPLITS:
        raise ConfigError(f"squad split={split!r} is not allowed; allowed: {', '.join(LOCAL_SPLITS)}")
    return Path(squad_dir) / f"{split}-v{check_version(version)}.json"


# -------------------------------------------------------------------------------------------- reading
def _need(ok: bool, path: Path, where: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {where}: {what}; expected the SQuAD layout data[].paragraphs[].qas[] with id, question, answers[{{text, answer_start}}]")


def read_squad_json(path: str | os.PathLike) -> list[dict]:
    """Read an official SQuAD JSON file (v1.1 or v2.0 layout) into flat example records.

    Layout: ``{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}], "is_impossible"?, "plausible_answers"?}]}]}]}``.
    ``answer_start`` is a character offset into ``context``. v2.0 unanswerable questions
    (``is_impossible: true``) have no answers; their ``plausible_answers`` are dropped.

    Returns:
        One record per question in file order (see the module docstring); ``answers`` holds every
        gold answer (dev files have up to 3-6 per question, train files one).

    Raises:
        ConfigError: unreadable, non-UTF-8 or non-JSON file, or a malformed entry: missing or mistyped
        field, an answerable question without answers, an unanswerable one with answers, an
        ``answer_start`` outside the context, or a duplicate question id. The one-line message
        names the path and the entry (``data[3].paragraphs[2].qas[0]``).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); SQuAD files are UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); expected a SQuAD v1.1/v2.0 file") from None
    _need(isinstance(raw, dict) and isinstance(raw.get("data"), list), path, "top level", "no 'data' list")
    _need(len(raw["data"]) > 0, path, "data", "no articles")
    records: list[dict] = []
    seen: dict[str, str] = {}
    misaligned = 0
    for a, article in enumerate(raw["data"]):
        where = f"data[{a}]"
        _need(isinstance(article, dict) and isinstance(article.get("title"), str), path, where, "no 'title' string")
        _need(isinstance(article.get("paragraphs"), list), path, where, "no 'paragraphs' list")
        for p, para in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            _need(isinstance(para, dict) and isinstance(para.get("context"), str) and para["context"] != "", path, where, "no non-empty 'context' string")
            _need(isinstance(para.get("qas"), list), path, where, "no 'qas' list")
            context = para["context"]
            for q, qa in enumerate(para["qas"]):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                _need(isinstance(qa, dict), path, where, "not an object")
                _need(isinstance(qa.get("id"), str) and qa["id"] != "", path, where, "no 'id' string")
                _need(qa["id"] not in seen, path, where, f"duplicate id {qa['id']!r} (first at {seen.get(qa['id'])})")
                seen[qa["id"]] = where
                _need(isinstance(qa.get("question"), str), path, where, "no 'question' string")
                impossible = qa.get("is_impossible", False)
                _need(isinstance(impossible, bool), path, where, f"'is_impossible' is {impossible!r}, not true/false")
                answers = qa.get("answers")
                _need(isinstance(answers, list), path, where, "no 'answers' list")
                if impossible:
                    _need(not answers, path, where, f"is_impossible=true but {len(answers)} answers")
                else:
                    _need(bool(answers), path, where, "an answerable question (no is_impossible=true) with no answers")
                texts, starts = [], []
                for n, ans in enumerate(answers):
                    aw = f"{where}.answers[{n}]"
                    _need(isinstance(ans, dict) and isinstance(ans.get("text"), str) and ans["text"] != "", path, aw, "no non-empty 'text' string")
                    start = ans.get("answer_start")
                    _need(isinstance(start, int) and not isinstance(start, bool), path, aw, f"answer_start={start!r} is not an integer")
                    _need(0 <= start and start + len(ans["text"]) <= len(context), path, aw,
                          f"answer_start={start} + len(text)={len(ans['text'])} is outside the context of {len(context)} characters")
                    misaligned += context[start:start + len(ans["text"])] != ans["text"]
                    texts.append(ans["text"])
                    starts.append(start)
                records.append({"id": qa["id"], "title": article["title"], "context": context, "question": qa["question"],
                                "answers": {"text": texts, "answer_start": starts}, "is_impossible": impossible})
    _need(bool(records), path, "data", "no questions")
    if misaligned:
        log.warning("%s: %d answers whose text differs from context[answer_start:answer_start+len(text)]", path, misaligned)
    return records


def load_hub_squad(version: str = "1.1", split: str = "validation") -> list[dict]:
    """Load a split of SQuAD from the Hugging Face hub (``rajpurkar/squad`` or ``rajpurkar/squad_v2``).

    The hub rows already have ``id``, ``title``, ``context``, ``question`` and ``answers`` (``{"text":
    [...], "answer_start": [...]}``); ``is_impossible`` is added as "no gold answer" (v2.0).

    Args:
        version: ``"1.1"`` or ``"2.0"``. split: ``"train"`` or ``"validation"`` (the official dev set).

    Raises:
        ConfigError: the hub cannot be reached (offline) or the split does not exist; the message says
        how to point at local files instead.
    """
    import datasets

    version = check_version(version)
    name = HUB_DATASETS[version]
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, or no such split
        raise ConfigError(f"SQuAD v{version}: no local file and the hub dataset {name} split={split} could not be loaded "
                          f"({type(e).__name__}); set SQUAD_DIR=/path/to/squad or data.squad_dir, or use protocol {OFFLINE_PROTOCOL}") from None
    return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
             "answers": {"text": list(r["answers"]["text"]), "answer_start": [int(s) for s in r["answers"]["answer_start"]]},
             "is_impossible": len(r["answers"]["text"]) == 0} for r in ds]


def load_squad(version: str = "1.1", split: str = "dev", squad_dir: str | os.PathLike | None = None) -> tuple[list[dict], str]:
    """Example records of one SQuAD split and a description of where they came from.

    The local file ``{split}-v{version}.json`` of :func:`resolve_squad_dir` is read when it exists;
    otherwise (no directory, or the file is not in it, as ``train-v1.1.json`` offline) the hub split
    (``train`` / ``validation``) is loaded.

    Returns:
        ``(records, source)``: source is the file path or ``hub:<dataset>/<split>``.

    Raises:
        ConfigError: a bad version or split, a malformed file, or neither a local file nor the hub.
    """
    version = check_version(version)
    root = resolve_squad_dir(squad_dir)
    if root is not None:
        path = squad_file(root, version, split)
        if path.is_file():
            return read_squad_json(path), str(path)
        log.warning("no %s in %s; trying the hub", path.name, root)
    elif split not in LOCAL_SPLITS:
        raise ConfigError(f"squad split={split!r} is not allowed; allowed: {', '.join(LOCAL_SPLITS)}")
    hub_split = "train" if split == "train" else "validation"
    try:
        return load_hub_squad(version, hub_split), f"hub:{HUB_DATASETS[version]}/{hub_split}"
    except ConfigError as e:
        if root is None:
            raise
        raise ConfigError(f"{squad_file(root, version, split)} does not exist; {e}") from None


def resolve_protocol(protocol: str, version: str = "1.1", squad_dir: str | os.PathLike | None = None) -> str:
    """The protocol a run is measured under (``task.protocol``).

    ``auto``: :data:`OFFLINE_PROTOCOL` when the local SQuAD folder (:func:`resolve_squad_dir`) holds no
    ``train-v{version}.json`` (this machine: only ``dev-v1.1.json``), else :data:`OFFICIAL_PROTOCOL` (the local
    train and dev files, or with no local folder the hub's ``train`` and ``validation`` splits). An explicit
    ``official-dev`` or ``offline-dev-split`` is returned as given.

    Raises:
        ConfigError: an unknown protocol, or an explicit folder that does not exist.
    """
    if protocol not in ("auto", OFFICIAL_PROTOCOL, OFFLINE_PROTOCOL):
        raise ConfigError(f"task.protocol={protocol!r} is not allowed; allowed: auto, {OFFICIAL_PROTOCOL}, {OFFLINE_PROTOCOL}")
    if protocol != "auto":
        return protocol
    root = resolve_squad_dir(squad_dir)
    if root is not None and not squad_file(root, check_version(version), "train").is_file():
        return OFFLINE_PROTOCOL
    return OFFICIAL_PROTOCOL


# ------------------------------------------------------------------------------------ offline protocol
@dataclass(frozen=True)
class DevSplit:
    """The dev file split by article into a training part and an evaluation part.

    ``train`` / ``eval`` are example records (file order kept); ``train_titles`` / ``eval_titles``
    the articles of each part (file order). :attr:`protocol` is :data:`OFFLINE_PROTOCOL`: scores on
    ``eval`` are not official dev results; :meth:`record` gives the fields a result row should carry.
    """

    train: list[dict]
    eval: list[dict]
    train_titles: tuple[str, ...]
    eval_titles: tuple[str, ...]
    eval_fraction: float
    seed: int
    protocol: str = field(default=OFFLINE_PROTOCOL)
    name: str = field(default=SPLIT_NAME)

    def record(self) -> dict[str, Any]:
        """``{"protocol": "offline-dev-split", "split": "dev-split", "eval_fraction", "seed",
        "train_articles", "eval_articles", "train_questions", "eval_questions"}``."""
        return {"protocol": self.protocol, "split": self.name, "eval_fraction": self.eval_fraction, "seed": self.seed,
                "train_articles": len(self.train_titles), "eval_articles": len(self.eval_titles),
                "train_questions": len(self.train), "eval_questions": len(self.eval)}


def _title_key(title: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{title}".encode("utf-8")).hexdigest()


def split_by_article(examples: Sequence[Mapping[str, Any]], eval_fraction: float = 0.2, seed: int = 0) -> DevSplit:
    """Split example records by article (``title``) for the offline protocol (:data:`OFFLINE_PROTOCOL`).

    Articles are ordered by SHA-256 of ``"{seed}\\0{title}"`` and the first
    ``round(eval_fraction * n_articles)`` (at least 1, at most ``n_articles - 1``) go to ``eval``, the
    rest to ``train``. No article is in both parts, every question is in exactly one, and the split
    depends only on the titles and ``seed`` (not on file order or Python's hash seed). The fraction
    is of *articles*; the question fraction follows approximately (articles differ in size).

    Raises:
        ConfigError: ``eval_fraction`` outside (0, 1), or fewer than 2 articles.
    """
    if not (isinstance(eval_fraction, (int, float)) and 0.0 < float(eval_fraction) < 1.0):
        raise ConfigError(f"squad.eval_fraction={eval_fraction!r} is out of range; allowed: 0 < eval_fraction < 1 (fraction of articles held out)")
    titles = list(dict.fromkeys(ex["title"] for ex in examples))
    if len(titles) < 2:
        raise ConfigError(f"squad {SPLIT_NAME}: {len(titles)} article(s); splitting by article needs at least 2")
    n_eval = min(max(int(math.floor(eval_fraction * len(titles) + 0.5)), 1), len(titles) - 1)
    held = set(sorted(titles, key=lambda t: (_title_key(t, seed), t))[:n_eval])
    return DevSplit(train=[ex for ex in examples if ex["title"] not in held], eval=[ex for ex in examples if ex["title"] in held],
                    train_titles=tuple(t for t in titles if t not in held), eval_titles=tuple(t for t in titles if t in held),
                    eval_fraction=float(eval_fraction), seed=int(seed))


# ------------------------------------------------------------------------------------- preprocessing
def _encode(batch: Mapping[str, list], tokenizer, max_length: int, doc_stride: int, pad_to_max_length: bool):
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"SQuAD features need a fast tokenizer (offset mappings); {type(tokenizer).__name__} is not one")
    if not 0 <= doc_stride < max_length:
        raise ConfigError(f"squad doc_stride={doc_stride} with max_length={max_length}; allowed: 0 <= doc_stride < max_length")
    if max_length > tokenizer.model_max_length:
        raise ConfigError(f"squad max_length={max_length} exceeds the tokenizer's model_max_length={tokenizer.model_max_length}")
    questions = [q.lstrip() for q in batch["question"]]  # leading spaces only waste window room
    try:
        return tokenizer(questions, list(batch["context"]), truncation="only_second", max_length=max_length, stride=doc_stride,
                         return_overflowing_tokens=True, return_offsets_mapping=True,
                         padding="max_length" if pad_to_max_length else False)
    except Exception as e:  # a question too long for the window: the tokenizer cannot truncate the context
        raise ConfigError(f"squad tokenisation failed with max_length={max_length}, doc_stride={doc_stride} ({str(e).splitlines()[0]}); "
                          "a question plus doc_stride must fit in max_length") from None


def _context_span(seq_ids: list) -> tuple[int, int] | None:
    """First and last token index of the context (sequence id 1) in one feature, or None."""
    idx = [i for i, s in enumerate(seq_ids) if s == 1]
    return (idx[0], idx[-1]) if idx else None


def _cls_index(input_ids: list[int], tokenizer) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def prepare_train_features(batch: Mapping[str, list], tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE,
                           pad_to_max_length: bool = False, keep_offsets: bool = False) -> dict[str, list]:
    """Training features of a batch of examples (a ``Dataset.map(batched=True)`` function).

    As ``run_qa.py``'s ``prepare_train_features``: ``[CLS] question [SEP] context [SEP]`` with
    ``truncation="only_second"``; a context longer than the window becomes several features
    (``return_overflowing_tokens``), consecutive windows sharing ``doc_stride`` context tokens (the
    Hugging Face meaning of stride: the overlap; in Google's BERT ``run_squad.py`` doc_stride is the
    step between window starts). Labels come from the first gold answer's character span
    ``[answer_start, answer_start + len(text))`` mapped through the offset mapping:
    ``start_positions`` = the last context token starting at or before the span's start,
    ``end_positions`` = the first context token from there ending at or after the span's end. A
    feature whose context window does not fully contain the span, and every feature of an
    unanswerable (v2.0) question, points both at the [CLS] index (0 for BERT).

    Args:
        batch: columns ``question``, ``context``, ``answers`` (and ``id``), lists of B examples.
        tokenizer: a *fast* Hugging Face tokenizer. max_length: window length in tokens.
        doc_stride: overlap between windows in tokens. pad_to_max_length: pad every feature to
        ``max_length`` (else unpadded; pad per batch with ``DataCollatorWithPadding``).
        keep_offsets: also return ``offset_mapping`` (character ``(start, end)`` per token) and
        ``example_id`` (for checks).

    Returns:
        Columns of F >= B features: ``input_ids``, ``attention_mask``, ``token_type_ids`` (lists of
        ints, length <= ``max_length``), ``start_positions``, ``end_positions`` (token indices, ints).

    Raises:
        ConfigError: slow tokenizer, ``doc_stride >= max_length``, ``max_length`` above the model's,
        or a question too long to leave room for the context.
    """
    enc = _encode(batch, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        cls = _cls_index(enc["input_ids"][i], tokenizer)
        answers = batch["answers"][sample_map[i]]
        span = _context_span(enc.sequence_ids(i))
        if not answers["text"] or span is None:
            starts.append(cls), ends.append(cls)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        first, last = span
        if offsets[first][0] > start_char or offsets[last][1] < end_char:  # the answer is not (fully) in this window
            starts.append(cls), ends.append(cls)
            continue
        tok_start = first
        while tok_start < last and offsets[tok_start + 1][0] <= start_char:
            tok_start += 1
        tok_end = tok_start
        while tok_end < last and offsets[tok_end][1] < end_char:
            tok_end += 1
        starts.append(tok_start), ends.append(tok_end)
    out = dict(enc)
    out["start_positions"], out["end_positions"] = starts, ends
    if keep_offsets:
        out["offset_mapping"] = [[list(o) for o in offs] for offs in offsets_all]
        out["example_id"] = [batch["id"][s] for s in sample_map]
    return out


def prepare_eval_features(batch: Mapping[str, list], tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE,
                          pad_to_max_length: bool = False) -> dict[str, list]:
    """Evaluation features of a batch of examples (a ``Dataset.map(batched=True)`` function).

    The same windows as :func:`prepare_train_features` (``run_qa.py``'s
    ``prepare_validation_features``), without labels, plus ``example_id`` (the example each feature
    came from; an example may have several) and ``offset_mapping``: per token a character span
    ``[start, end)`` into the context, or ``None`` for question, special and padding tokens, so that
    :func:`postprocess_predictions` can only pick context spans.

    Returns:
        Columns of F >= B features: ``input_ids``, ``attention_mask``, ``token_type_ids``,
        ``example_id`` (str), ``offset_mapping`` (list of ``[start, end]`` or ``None``).

    Raises:
        ConfigError: as :func:`prepare_train_features`.
    """
    enc = _encode(batch, tokenizer, max_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    out = dict(enc)
    out["example_id"] = [batch["id"][s] for s in sample_map]
    out["offset_mapping"] = [[list(o) if s == 1 else None for o, s in zip(offs, enc.sequence_ids(i))] for i, offs in enumerate(offsets_all)]
    return out


def _features(records: Sequence[Mapping[str, Any]], fn, desc: str, **kwargs) -> "datasets.Dataset":
    import datasets

    ds = datasets.Dataset.from_list([dict(r) for r in records])
    return ds.map(fn, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs, desc=desc, load_from_cache_file=False)


def train_features(records: Sequence[Mapping[str, Any]], tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE,
                   pad_to_max_length: bool = False, keep_offsets: bool = False) -> "datasets.Dataset":
    """:func:`prepare_train_features` over example records through ``datasets.Dataset.map(batched=True)``."""
    return _features(records, prepare_train_features, "squad train features", tokenizer=tokenizer, max_length=max_length,
                     doc_stride=doc_stride, pad_to_max_length=pad_to_max_length, keep_offsets=keep_offsets)


def eval_features(records: Sequence[Mapping[str, Any]], tokenizer, max_length: int = MAX_LENGTH, doc_stride: int = DOC_STRIDE,
                  pad_to_max_length: bool = False) -> "datasets.Dataset":
    """:func:`prepare_eval_features` over example records through ``datasets.Dataset.map(batched=True)``.

    Drop ``example_id`` and ``offset_mapping`` before batching the model inputs
    (``ds.remove_columns([...])``) and keep the dataset itself for :func:`postprocess_predictions`.
    """
    return _features(records, prepare_eval_features, "squad eval features", tokenizer=tokenizer, max_length=max_length,
                     doc_stride=doc_stride, pad_to_max_length=pad_to_max_length)


# ------------------------------------------------------------------------------------ post-processing
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator or in half precision
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def legal_spans(start_logits: Any, end_logits: Any, offsets: Sequence[Any], n_best_size: int = N_BEST_SIZE,
                max_answer_length: int = MAX_ANSWER_LENGTH) -> list[tuple[float, int, int]]:
    """Candidate answer spans of one feature, best first, as ``(score, start_token, end_token)``.

    The ``n_best_size`` highest start logits are paired with the ``n_best_size`` highest end logits
    (``utils_qa.py``); a pair is kept when both tokens are context tokens (``offsets[i]`` not None and
    ``i < len(offsets)``: logits of a padded batch may be longer than the feature), ``end >= start``
    and ``end - start + 1 <= max_answer_length``. The score is ``start_logits[start] +
    end_logits[end]`` (the log of an unnormalised span probability under independent start and end
    softmaxes). A legal span whose start or end is outside the top ``n_best_size`` is not considered.

    Args:
        start_logits, end_logits: ``[T]`` floats (numpy or torch). offsets: ``T' <= T`` entries,
        each ``(char_start, char_end)`` or ``None``.
    """
    start, end = _as_numpy(start_logits), _as_numpy(end_logits)
    n = min(len(offsets), start.shape[-1])
    legal = np.array([offsets[i] is not None for i in range(n)], dtype=bool)
    top_s = np.argsort(-start[:n], kind="stable")[:n_best_size]
    top_e = np.argsort(-end[:n], kind="stable")[:n_best_size]
    out = []
    for s in top_s:
        if not legal[s]:
            continue
        for e in top_e:
            if legal[e] and s <= e and e - s + 1 <= max_answer_length:
                out.append((float(start[s] + end[e]), int(s), int(e)))
    out.sort(key=lambda c: -c[0])
    return out


def postprocess_predictions(examples: Sequence[Mapping[str, Any]], features: Any, start_logits: Any, end_logits: Any,
                            n_best_size: int = N_BEST_SIZE, max_answer_length: int = MAX_ANSWER_LENGTH,
                            version_2_with_negative: bool = False, null_score_diff_threshold: float = 0.0,
                            return_details: bool = False):
    """One answer text per example from per-feature start and end logits (``utils_qa.py``'s
    ``postprocess_qa_predictions``).

    For each example, the best :func:`legal_spans` candidate over all its features wins; its text is
    ``context[offsets[start][0]:offsets[end][1]]``. With ``version_2_with_negative`` (SQuAD v2.0) the
    null score is ``start_logits[0] + end_logits[0]`` (the [CLS] token), the minimum over the
    example's features (as BERT's ``run_squad.py``), and the prediction is ``""`` when
    ``null_score - best_span_score > null_score_diff_threshold``. An example with no legal span gets
    ``""``.

    Args:
        examples: records with ``id`` and ``context`` (E examples).
        features: F evaluation features (a ``datasets.Dataset`` or a sequence of mappings) with
            ``example_id`` and ``offset_mapping`` (from :func:`prepare_eval_features`).
        start_logits, end_logits: ``[F, T]`` arrays or tensors (T >= the longest feature), or F 1-D
            arrays; in feature order.
        n_best_size: start and end indices tried per feature. max_answer_length: in tokens.
        null_score_diff_threshold: logit units; larger values predict "no answer" less often.
        return_details: also return, per example id, ``{"score", "null_score", "score_diff",
            "start_char", "end_char"}`` (``score`` is ``-inf`` without a legal span; the null fields
            are None for v1.1).

    Returns:
        ``{example id: answer text}`` (and the details dict when ``return_details``).

    Raises:
        ValueError: the logits' first dimension is not F, or an example has no feature.
    """
    if hasattr(features, "select_columns"):  # a datasets.Dataset: read only the two columns needed
        columns = features.select_columns(["example_id", "offset_mapping"]).with_format(None)
        example_ids, offset_maps = columns["example_id"], columns["offset_mapping"]
    else:
        example_ids, offset_maps = [f["example_id"] for f in features], [f["offset_mapping"] for f in features]
    starts = start_logits if isinstance(start_logits, (list, tuple)) else _as_numpy(start_logits)
    ends = end_logits if isinstance(end_logits, (list, tuple)) else _as_numpy(end_logits)
    if len(starts) != len(example_ids) or len(ends) != len(example_ids):
        raise ValueError(f"start_logits ({len(starts)}) and end_logits ({len(ends)}) must have one row per feature ({len(example_ids)})")
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, eid in enumerate(example_ids):
        by_example[eid].append(i)
    predictions: dict[str, str] = {}
    details: dict[str, dict] = {}
    for ex in examples:
        feats = by_example.get(ex["id"])
        if not feats:
            raise ValueError(f"example {ex['id']!r} has no feature; tokenise the same examples that are post-processed")
        best: tuple[float, int, int, int] | None = None  # (score, feature, start, end)
        null_score = None
        for f in feats:
            s_log, e_log = _as_numpy(starts[f]), _as_numpy(ends[f])
            cands = legal_spans(s_log, e_log, offset_maps[f], n_best_size, max_answer_length)
            if cands and (best is None or cands[0][0] > best[0]):
                best = (cands[0][0], f, cands[0][1], cands[0][2])
            if version_2_with_negative:
                null = float(s_log[0] + e_log[0])
                null_score = null if null_score is None else min(null_score, null)
        text, score, span = "", -math.inf, (None, None)
        if best is not None:
            score, f, s, e = best
            span = (offset_maps[f][s][0], offset_maps[f][e][1])
            text = ex["context"][span[0]:span[1]]
        diff = None
        if version_2_with_negative:
            diff = null_score - score
            if diff > null_score_diff_threshold:
                text = ""
        predictions[ex["id"]] = text
        details[ex["id"]] = {"score": score, "null_score": null_score, "score_diff": diff, "start_char": span[0], "end_char": span[1]}
    return (predictions, details) if return_details else predictions


# ------------------------------------------------------------------------------------------- metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a/an/the (whole words), collapse whitespace (``evaluate-v1.1.py`` / ``evaluate-v2.0.py``)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, gold: str) -> int:
    """1 if the normalised strings are equal, else 0 (official ``compute_exact``)."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised strings, in [0, 1] (official v2.0 ``compute_f1``).

    ``2PR / (P + R)`` with P = shared tokens / prediction tokens, R = shared tokens / gold tokens
    (shared counted with multiplicity); when either side has no token, 1.0 if both are empty else 0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


def _check_predictions(predictions: Mapping[str, str], references: Sequence[Mapping[str, Any]]) -> None:
    missing = [r["id"] for r in references if r["id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(references)} questions have no prediction (first: {missing[0]!r})")


def squad_v1_metrics(predictions: Mapping[str, str], references: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (x100) through ``torchmetrics.text.SQuAD`` (the official
    ``evaluate-v1.1.py``: per question the maximum over its gold answers, averaged over questions).
    One corner differs from the official v1.1 script: when prediction and gold both normalise to
    the empty string (e.g. ``""`` against the gold ``"the"``) torchmetrics scores F1 = 1 (the v2.0
    rule), the v1.1 script 0 (exact match is 1 in both). In dev-v1.1.json three questions have a
    gold answer ``"."``, so only an empty (or punctuation/article-only) prediction there differs.

    Args:
        predictions: ``{question id: answer text}``. references: records with ``id`` and ``answers``.

    Returns:
        ``{"exact_match": float, "f1": float}`` in [0, 100].

    Raises:
        ValueError: a question without a prediction, or one without gold answers (v2.0 data:
        use :func:`squad_v2_metrics`).
    """
    from torchmetrics.text import SQuAD

    _check_predictions(predictions, references)
    empty = [r["id"] for r in references if not r["answers"]["text"]]
    if empty:
        raise ValueError(f"{len(empty)} questions have no gold answer (first: {empty[0]!r}); SQuAD v2.0 data needs squad_v2_metrics")
    preds = [{"id": r["id"], "prediction_text": predictions[r["id"]]} for r in references]
    target = [{"id": r["id"], "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}} for r in references]
    out = SQuAD()(preds, target)
    return {"exact_match": float(out["exact_match"]), "f1": float(out["f1"])}


def squad_v2_metrics(predictions: Mapping[str, str], references: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """SQuAD v2.0 scores by the rules of the official ``evaluate-v2.0.py`` (re-implemented here:
    ``torchmetrics.text.SQuAD`` cannot score a question without gold answers).

    Per question: gold answers that normalise to the empty string are dropped; an unanswerable
    question's only gold answer is ``""``, so the empty prediction scores 1 there and any other
    prediction 0 (and ``""`` scores 0 on an answerable question); exact match and F1 are the maxima
    over the gold answers (:func:`exact_match`, :func:`f1_score`, same normalisation as v1.1). No
    no-answer-probability threshold is applied (the official script's default without ``--na-prob-file``).

    Returns:
        ``exact``, ``f1`` (x100) and ``total`` over all questions; ``HasAns_exact``, ``HasAns_f1``,
        ``HasAns_total`` over answerable and ``NoAns_*`` over unanswerable ones, each group present
        only when it has questions (as in the official output).

    Raises:
        ValueError: a question without a prediction.
    """
    _check_predictions(predictions, references)
    scores: dict[str, tuple[int, float, bool]] = {}
    for r in references:
        golds = [a for a in r["answers"]["text"] if normalize_answer(a)] or [""]
        pred = predictions[r["id"]]
        scores[r["id"]] = (max(exact_match(pred, g) for g in golds), max(f1_score(pred, g) for g in golds), bool(r["answers"]["text"]))

    def block(ids: Iterable[str], prefix: str) -> dict[str, float]:
        ids = list(ids)
        return {f"{prefix}exact": 100.0 * sum(scores[i][0] for i in ids) / len(ids),
                f"{prefix}f1": 100.0 * sum(scores[i][1] for i in ids) / len(ids), f"{prefix}total": len(ids)}

    out = block(scores, "")
    has = [i for i, s in scores.items() if s[2]]
    no = [i for i, s in scores.items() if not s[2]]
    if has:
        out.update(block(has, "HasAns_"))
    if no:
        out.update(block(no, "NoAns_"))
    return out


def squad_metrics(predictions: Mapping[str, str], references: Sequence[Mapping[str, Any]], version: str = "1.1") -> dict[str, float]:
    """:func:`squad_v1_metrics` for ``version="1.1"``, :func:`squad_v2_metrics` for ``"2.0"``."""
    return squad_v1_metrics(predictions, references) if check_version(version) == "1.1" else squad_v2_metrics(predictions, references)


# ------------------------------------------------------------------------------------------ evaluation
class SpanEvaluator:
    """Start and end logits of the evaluation features, gathered over batches, then decoded and scored.

    :meth:`update` keeps each feature's logits up to its real length (the attention mask), keyed by the feature's
    index in the evaluation features; :meth:`compute` runs :func:`postprocess_predictions` and
    :func:`squad_metrics`. When only some features were evaluated (``limit_val_batches``, ``fast_dev_run``), only
    the examples with an evaluated feature are scored; :attr:`questions` says how many were.
    """

    def __init__(self) -> None:
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.questions = 0

    def reset(self) -> None:
        self.rows = {}

    def update(self, idx: Any, start_logits: Any, end_logits: Any, attention_mask: Any) -> None:
        """Args: ``idx`` ``[B]`` feature indices; ``start_logits``, ``end_logits`` ``[B, T]``; ``attention_mask``
        ``[B, T]`` (right padding: the first ``mask.sum()`` positions are the feature's tokens)."""
        start, end = _as_numpy(start_logits), _as_numpy(end_logits)
        lengths = _as_numpy(attention_mask).sum(-1).astype(int)
        for row, (i, n) in enumerate(zip(_as_numpy(idx).astype(int).tolist(), lengths.tolist())):
            self.rows[i] = (start[row, :n], end[row, :n])

    def compute(self, examples: Sequence[Mapping[str, Any]], features: Any, version: str = "1.1", n_best_size: int = N_BEST_SIZE,
                max_answer_length: int = MAX_ANSWER_LENGTH, null_score_diff_threshold: float = 0.0) -> dict[str, float]:
        """Scores (x100) of the gathered logits: ``exact_match``/``f1`` (v1.1) or ``exact``/``f1``/``HasAns_*``/``NoAns_*``
        (v2.0); :attr:`questions` is set to the number of questions scored.

        Args:
            examples: the evaluation records. features: their F evaluation features (``example_id``, ``offset_mapping``).

        Raises:
            ValueError: no feature was gathered.
        """
        if not self.rows:
            raise ValueError("SpanEvaluator.compute: no evaluation feature was gathered")
        seen = sorted(self.rows)
        if len(seen) < len(features):
            features = features.select(seen) if hasattr(features, "select") else [features[i] for i in seen]
            ids = set(features["example_id"] if hasattr(features, "select_columns") else (f["example_id"] for f in features))
            examples = [ex for ex in examples if ex["id"] in ids]
            log.warning("SQuAD evaluation of %d of the features: %d questions scored", len(seen), len(examples))
        preds = postprocess_predictions(examples, features, [self.rows[i][0] for i in seen], [self.rows[i][1] for i in seen],
                                        n_best_size=n_best_size, max_answer_length=max_answer_length,
                                        version_2_with_negative=check_version(version) == "2.0",
                                        null_score_diff_threshold=null_score_diff_threshold)
        self.questions = len(examples)
        return {k: v for k, v in squad_metrics(preds, examples, version).items() if not k.endswith("total")}
