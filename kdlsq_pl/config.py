"""Validation of the composed Hydra config, before anything heavy starts.

Field rules (types, allowed values, ranges) are the schema's (``kdlsq_pl.schema``); the rules that tie
fields together, option names from ``conf/``, the model directory and the task's data files are checked
here. Every problem raises ``ConfigError`` with one line naming the field, the bad value and what is
allowed. ``run.py`` prints it and exits with status 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kdlsq_pl import schema
from kdlsq_pl.data.tsv import read_glue_tsv, resolve_glue_dir, task_files
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import STUDENT_INITS, is_qa, resolve_model_path, student_init_path

#: GLUE metric names (``kdlsq_pl.metrics`` builds them).
METRICS = schema.allowed(schema.Metric)
#: The classifier head's pooling (``kdlsq_pl.models.pooling``).
POOLINGS = schema.allowed(schema.Pooling)


#: The Hydra config folder (``conf/`` beside the package).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def conf_options(group: str) -> list[str]:
    """The option names of a config group (the ``conf/<group>/*.yaml`` file stems)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def source_task_cfg(cfg: DictConfig) -> DictConfig | None:
    """The config whose teacher this task's teacher starts from (``task.teacher.init_from``), or None.

    Intermediate-task training (STILTs: Phang et al., 2018, "Sentence Encoders on STILTs"): the teacher of task A
    is fine-tuned from the stored teacher of task B (same model, same ``teacher.seed``, B's own recipe from
    ``conf/task/<B>.yaml``) instead of from the pretrained checkpoint. The copy is ``cfg`` with ``task`` replaced
    (and ``teacher.retrain`` off: retraining applies to the requested teacher only).

    Raises:
        ConfigError: ``init_from`` names this task, a question-answering task or no task in ``conf/task/``, or the
            chain of sources comes back to a task already in it (a cycle).
    """
    name = cfg.task.teacher.get("init_from")
    if not name:
        return None
    tasks = conf_options("task")
    allowed = [t for t in tasks if t != cfg.task.name]
    if name not in allowed:
        raise ConfigError(f"task.teacher.init_from={name!r}: not another task's config; allowed: {', '.join(allowed)}")
    src = copy.deepcopy(cfg)
    with open_dict(src):
        src.task = OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")
        src.teacher.retrain = False
    chain, step = [cfg.task.name, name], src.task
    while step.teacher.get("init_from"):  # the source's own source, and so on: a chain must end at the checkpoint
        nxt = step.teacher.init_from
        if nxt in chain:
            raise ConfigError(f"task.teacher.init_from={name!r}: the teachers would start from each other "
                              f"({' -> '.join(chain + [nxt])}); allowed: a chain that ends at the pretrained checkpoint")
        if nxt not in tasks:
            raise ConfigError(f"task.teacher.init_from={nxt!r} in conf/task/{chain[-1]}.yaml: not a task's config")
        chain.append(nxt)
        step = OmegaConf.load(CONF_DIR / "task" / f"{nxt}.yaml")
    if is_qa(src.task) or is_qa(cfg.task):
        raise ConfigError(f"task.teacher.init_from={name!r}: question answering has no sentence classifier to start from "
                          f"or to start; allowed between GLUE tasks: {', '.join(a for a in allowed if not a.startswith('squad'))}")
    return src


def _resolved(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception as e:  # an interpolation that cannot be resolved
        raise ConfigError(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None


def _option(cfg: DictConfig, key: str, group: str) -> None:
    value = _resolved(cfg, key)
    if value not in (options := conf_options(group)):
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(options)}")


def validate(cfg: DictConfig) -> None:
    """Check the composed config and the task's data files; raise ``ConfigError`` on the first problem."""
    try:
        schema.check({key: _resolved(cfg, key) for key in schema.Config.model_fields if key in cfg})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _option(cfg, "task.name", "task")
    if is_qa(cfg.task) and cfg.task.teacher.get("head_bias", "zero") != "zero":
        raise ConfigError(f"task.teacher.head_bias={cfg.task.teacher.head_bias} is not allowed for task={cfg.task.name} "
                          "(question answering: a span head, no label prior); allowed: zero")
    if cfg.task.teacher.get("symmetric_pairs") and not cfg.task.get("symmetric"):
        raise ConfigError(f"task.teacher.symmetric_pairs=true needs pairs whose label does not depend on their order (task.symmetric: "
                          f"true, as mrpc, qqp, stsb); task={cfg.task.name} is not; allowed: false")
    src = source_task_cfg(cfg)  # task.teacher.init_from names another task's config
    if cfg.stage == "student":
        validate_student(cfg)
    resolve_model_path(_resolved(cfg, "model.name_or_path"))
    validate_data(cfg)
    if src is not None:
        validate_data(src)  # its teacher is trained first when the store has none: its files must be there too


def validate_student(cfg: DictConfig) -> None:
    """The student stage's cross-field rules (its field rules are the schema's)."""
    _option(cfg, "method.name", "method")
    last = int(cfg.trainer.max_epochs) - 1
    if int(cfg.loss.intermediate_epochs) > last:  # then predictions: at least one epoch of them
        raise ConfigError(f"loss.intermediate_epochs={cfg.loss.intermediate_epochs} is out of range; allowed: 0..{last}")
    _check_quant_name(cfg)
    student = cfg.get("student") or {}
    if cfg.method.name == "theseus" and (student.get("init", "teacher") != "teacher" or student.get("layers")):
        raise ConfigError(f"student.init={student.get('init')} student.layers={student.get('layers')} do not apply to method=theseus "
                          "(it builds its successor from the teacher); allowed: method.theseus.successor_layers")
    if student.get("init") not in (None, *STUDENT_INITS):  # a saved model directory: readable before any teacher trains
        student_init_path(str(student.get("init")), "", "")
    if (student.get("layers") or student.get("init") not in (None, "teacher")) and not cfg.method.train:
        raise ConfigError(f"student.init={student.get('init')} student.layers={student.get('layers')} need a trained student; "
                          f"method={cfg.method.name} evaluates the teacher untrained; allowed: student.init=teacher student.layers=null")
    if student.get("layers"):
        _check_student_layers(cfg, int(student.get("layers")))
    if cfg.teacher_cache.enabled and is_qa(cfg.task):
        raise ConfigError(f"teacher_cache.enabled=true is not supported for task={cfg.task.name} (question answering: the "
                          "cache holds classifier logits); allowed: teacher_cache.enabled=false")
    if cfg.teacher_cache.enabled and not cfg.loss.mask_padding:
        raise ConfigError("loss.mask_padding=false is not allowed with teacher_cache.enabled=true: "
                          "the cache stores no padded positions; allowed: loss.mask_padding=true")


def _check_student_layers(cfg: DictConfig, n: int) -> None:
    """``student.layers`` against the depth of a local ``model.name_or_path`` (the teacher's): at most its layers, and
    a divisor of them when hidden-state or attention terms map student layer i to teacher layer i L / n
    (``losses.layer_map``). A hub id is checked when the model is loaded."""
    import json

    path = Path(resolve_model_path(_resolved(cfg, "model.name_or_path"))) / "config.json"
    if not path.is_file():
        return
    L = int(json.loads(path.read_text(encoding="utf-8")).get("num_hidden_layers", 0)) or None
    if L is None:
        return
    if n > L:
        raise ConfigError(f"student.layers={n} is out of range; allowed: 1..{L} (the teacher's encoder layers)")
    if L % n and (float(cfg.loss.hidden) > 0 or float(cfg.loss.attn) > 0):
        raise ConfigError(f"student.layers={n} does not divide the teacher's {L} layers (the hidden-state and attention terms map "
                          f"student layer i to teacher layer i*{L}/n); allowed: {', '.join(str(d) for d in range(1, L + 1) if L % d == 0)}, "
                          "or loss.hidden=0 loss.attn=0")


def _check_quant_name(cfg: DictConfig) -> None:
    """A preset with a fixed ``name`` (``conf/quant/w2a8_emb4.yaml``) must not be changed on the command line, or its
    cell folder would be named for what it no longer is (and a rerun would skip it as finished); ``integer_ops``
    needs quantizers to act on."""
    from kdlsq_pl import bits_name

    q = cfg.quant
    bits = [int(q.weight_bits), int(q.embedding_bits), int(q.act_bits)]
    overrides = _resolved(cfg, "quant.overrides") or {}
    if q.get("integer_ops") and min(bits + [int(b) for b in overrides.values()]) >= 32:
        raise ConfigError("quant.integer_ops=true needs a quantized student; allowed: a bit setting below 32 bits (quant=w8a8, w4a8, w2a8)")
    preset = Path(__file__).resolve().parents[1] / "conf" / "quant" / f"{q.name}.yaml"
    if not preset.is_file() or "name" not in (own := OmegaConf.load(preset)):
        return
    same = (str(q.name).startswith(bits_name(*bits) + "_") and overrides == (OmegaConf.to_container(own.overrides) if own.get("overrides") else {})
            and bool(q.get("integer_ops")) == bool(own.get("integer_ops", False)))
    if not same:
        raise ConfigError(f"quant={q.name} was changed on the command line (bits, overrides or integer_ops); allowed: its own "
                          f"settings, or start from quant={bits_name(*bits)} and set quant.overrides / quant.integer_ops there")


def validate_data(cfg: DictConfig) -> None:
    """Find the task's local TSVs and read them once (columns and labels), or for SQuAD its protocol's local
    files; the hub is checked on load."""
    if is_qa(cfg.task):
        from kdlsq_pl.data import squad
        squad_dir = _resolved(cfg, "data.squad_dir") if "squad_dir" in cfg.data else None
        protocol = squad.resolve_protocol(cfg.task.protocol, cfg.task.version, squad_dir)
        root = squad.resolve_squad_dir(squad_dir)
        if protocol == squad.OFFLINE_PROTOCOL and (root is None or not squad.squad_file(root, cfg.task.version, "dev").is_file()):
            where = squad.squad_file(root, cfg.task.version, "dev") if root else "no local SQuAD folder"
            raise ConfigError(f"task.protocol={protocol} needs the local dev file ({where}); allowed: data.squad_dir or "
                              f"$SQUAD_DIR naming a folder with dev-v{cfg.task.version}.json")
        return
    root = resolve_glue_dir(cfg.data.glue_dir)
    if root is None:
        return
    for path in task_files(cfg.task, root).values():
        read_glue_tsv(path, cfg.task)
