"""The student stage: the fine-tuned teacher -> a fake-quantized student, by ``cfg.method``.

``kdlsq`` and ``ternarybert`` distil from the teacher; ``lsq`` and ``q8bert`` train on the task loss
alone (no teacher is loaded); ``ptq`` quantizes the teacher with calibrated ranges and only evaluates;
``theseus`` replaces the teacher's modules by a shallower successor (``stages/theseus.py``).
All start from the same teacher checkpoint and share data, insertion and evaluation.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from itertools import islice
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from kdlsq_pl import cell_name
from kdlsq_pl.callbacks.quantization import QuantizationCallback, StepSizeFreeze, calibrate
from kdlsq_pl.distill.losses import KDLoss
from kdlsq_pl.distill.teacher_cache import ensure_teacher_cache
from kdlsq_pl.export import export_packed, load_student_checkpoint, packable
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.layout import layout_for
from kdlsq_pl.models.loading import init_head_bias_, init_student, is_qa, is_regression, load_classifier
from kdlsq_pl.models.modules import KDLSQModule
from kdlsq_pl.report import fmt, print_summary
from kdlsq_pl.stages.common import build_datamodule, build_trainer, finish_loggers, fit, protocol_fields, teacher_fp32_bytes
from kdlsq_pl.stages.teacher import ensure_teacher
from kdlsq_pl.quant.modules import model_size_bytes, quantize_, weight_bits_by_module


def is_full_precision(quant: DictConfig) -> bool:
    """Whether ``quant`` quantizes nothing: every role and every override at 32 bits."""
    overrides = [int(b) for b in (quant.get("overrides") or {}).values()]
    return min([int(quant.weight_bits), int(quant.embedding_bits), int(quant.act_bits), *overrides]) >= 32


def check_surgery(model_path: str, quant: DictConfig, task: DictConfig | None = None) -> None:
    """Fail in one line before any teacher is trained when the quantizer surgery cannot reach the model: an
    unsupported model type, or a ``quant.overrides`` pattern matching no module (checked on a ``meta``-device
    skeleton of the model: no weights are read).

    Raises:
        ConfigError: from :func:`layout_for` or :func:`weight_bits_by_module`.
    """
    import torch
    from transformers import AutoConfig

    from kdlsq_pl.models.loading import task_model_class

    config = AutoConfig.from_pretrained(model_path)
    layout_for(config.model_type)
    if quant.get("overrides"):
        from kdlsq_pl.models.pooling import apply_pooling
        with torch.device("meta"):
            skeleton = task_model_class(task or {}).from_config(config)
        if task is not None and "teacher" in task and not is_qa(task):  # the head the student will have (pooler dense or not)
            apply_pooling(skeleton, task.teacher.pooling, task.teacher.pooler_dense)
        weight_bits_by_module(skeleton, OmegaConf.to_container(quant, resolve=True))


def build_student_module(cfg: DictConfig, teacher_dir: Path, dm=None) -> KDLSQModule:
    """Student (``init_student``: by default a load of the fine-tuned teacher checkpoint), the loss, and the teacher if the loss needs it:
    live, or with ``teacher_cache.enabled`` its outputs on ``dm``'s training split, computed once and
    read from disk (no teacher in memory while training)."""
    from transformers import AutoConfig

    from kdlsq_pl.distill.selection import HiddenSelection, depth_map

    selection = HiddenSelection.from_config(OmegaConf.to_container(cfg.loss.selection, resolve=True) if cfg.loss.get("selection") else None)
    student = init_student(cfg, teacher_dir, attn_implementation=ATTN_IMPLEMENTATION)
    if (cfg.get("student") or {}).get("init") == "pretrained" and cfg.task.teacher.get("head_bias", "zero") == "prior":
        if dm is None:
            raise ValueError("build_student_module: student.init=pretrained with task.teacher.head_bias=prior needs the datamodule (dm)")
        dm.setup("fit")  # a new head started at the prior of the student's own training rows (one order of each pair)
        init_head_bias_(student, dm.splits["train"]["labels"])
    hidden_map = None
    if not selection.is_full:  # minimal hidden-state knowledge: the depth map from the student's layers to the teacher's
        n_teacher = int(AutoConfig.from_pretrained(str(teacher_dir)).num_hidden_layers)
        hidden_map = depth_map(int(student.config.num_hidden_layers), n_teacher, selection.map_top, selection.top_layers)
    loss = KDLoss(pred=cfg.loss.pred, attn=cfg.loss.attn, hidden=cfg.loss.hidden, gt=cfg.loss.gt, hidden_map=hidden_map,
                  temperature=cfg.loss.temperature, pred_reduction=cfg.task.get("pred_reduction") or cfg.loss.pred_reduction,
                  is_regression=is_regression(cfg.task), regression_target=cfg.loss.regression_target,
                  mask_padding=cfg.loss.mask_padding, intermediate_epochs=cfg.loss.intermediate_epochs)
    needs_teacher = loss.uses_teacher and cfg.method.train

    def load():
        return load_classifier(str(teacher_dir), cfg.task, attn_implementation=ATTN_IMPLEMENTATION)

    cache = None
    if needs_teacher and cfg.teacher_cache.enabled:
        dm.setup("fit")
        cache = ensure_teacher_cache(OmegaConf.to_container(cfg.teacher_cache, resolve=True), teacher_dir, dm, load,
                                     hidden=loss.weights["hidden"] > 0, attn=loss.weights["attn"] > 0,
                                     selection=selection, hidden_map=hidden_map)
    teacher = load() if needs_teacher and cache is None else None
    return KDLSQModule(teacher, student, OmegaConf.to_container(cfg.task, resolve=True), loss,
                       OmegaConf.to_container(cfg.optim, resolve=True), teacher_cache=cache, selection=selection,
                       sep_token_id=dm.tokenizer.sep_token_id if dm is not None else None,
                       teacher_dtype=str(cfg.teacher.get("forward_dtype", "float32")))


def quant_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """``QuantizationCallback`` (unless fp32) and ``StepSizeFreeze`` when a freeze point is set."""
    if is_full_precision(cfg.quant):
        return []
    cbs: list[pl.Callback] = [QuantizationCallback(OmegaConf.to_container(cfg.quant, resolve=True))]
    if cfg.quant.freeze_step_sizes_at_step is not None or cfg.quant.freeze_step_sizes_at_epoch is not None:
        cbs.append(StepSizeFreeze(cfg.quant.freeze_step_sizes_at_step, cfg.quant.freeze_step_sizes_at_epoch))
    return cbs


def post_training_quantize(cfg: DictConfig, module: KDLSQModule, dm) -> None:
    """PTQ: insert quantizers into the (teacher-initialised) student and calibrate every step size on
    ``cfg.quant.calibration_batches`` random training batches; no training (METHODS.md section 2)."""
    quantize_(module.student, OmegaConf.to_container(cfg.quant, resolve=True))
    dm.setup("fit")
    calibrate(module.student, list(islice(iter(dm.calibration_dataloader()), int(cfg.quant.calibration_batches))))


def export_best(cfg: DictConfig, student, ckpt: str | None, teacher_dir: Path, out_dir: Path) -> dict:
    """Write the best student as packed codes to ``<run>/packed``; return its real size on disk (bytes)
    and the ratio to the FP32 ``model.safetensors`` of the teacher it started from."""
    if ckpt:
        load_student_checkpoint(student, ckpt)
    target = out_dir / "packed"
    shutil.rmtree(target, ignore_errors=True)  # left by an attempt that never finished: no record claims it
    info = export_packed(student, OmegaConf.to_container(cfg.quant, resolve=True), target)
    fp32_file = (teacher_dir / "model.safetensors").stat().st_size
    return {"packed_dir": str(target), "packed_bytes": info["packed_bytes"], "fp32_file_bytes": fp32_file,
            "packed_compression_ratio": fp32_file / info["packed_bytes"]}


def knowledge_fields(cfg: DictConfig, module: KDLSQModule, dm, fit_s: float | None, teacher_layers: int) -> dict:
    """What the minimal-knowledge study reads from a record: the selection (its name and values), the share of the
    full hidden-state knowledge it keeps on the training split (``HiddenSelection.fraction``), where the teacher's
    outputs came from (``cached`` / ``live``) with the cache's size on disk (bytes), and the training time per epoch
    (seconds, evaluations included). A trained loss without a hidden-state term (``loss.hidden=0``) keeps none of
    it: selection ``none``, share 0.0, teacher source ``none`` when no teacher is read at all. Empty for a method
    that does not train (``ptq``)."""
    if not cfg.method.train:
        return {}
    source = "cached" if module.teacher_cache is not None else ("live" if module.teacher is not None else "none")
    if module.loss.weights["hidden"] == 0:
        out = {"hidden_selection": {"name": "none"}, "hidden_fraction": 0.0, "teacher_source": source}
    else:
        from kdlsq_pl.distill.selection import HiddenSelection

        raw = OmegaConf.to_container(cfg.loss.selection, resolve=True) if cfg.loss.get("selection") else {}
        sel = HiddenSelection.from_config(raw)
        lengths = [len(x) for x in dm.splits["train"].with_format(None)["input_ids"]]
        L, D = module.student.config.num_hidden_layers, module.student.config.hidden_size
        out = {"hidden_selection": {"name": raw.get("name", "full"), **dataclasses.asdict(sel)},
               "hidden_fraction": sel.fraction(L, teacher_layers, lengths, D), "teacher_source": source}
    if module.teacher_cache is not None:
        out["teacher_cache_bytes"] = int(module.teacher_cache.meta["bytes"])
    if fit_s is not None:
        out["fit_time_per_epoch_s"] = round(fit_s / max(int(cfg.trainer.max_epochs), 1), 1)
    return out


def train_student(cfg: DictConfig, model_path: str, out_dir: Path) -> dict:
    """Train the ``cfg.method`` student of ``cfg.task`` at ``cfg.quant`` bits; return the record's fields.

    The fields: teacher metric, student best and final metric (x100), bits, size in bytes at those
    bits and the compression ratio against FP32, the teacher directory and the stage wall time (s).
    """
    if not is_full_precision(cfg.quant):  # what the surgery cannot reach fails before its teacher is trained
        check_surgery(model_path, cfg.quant, cfg.task)
    teacher_dir, teacher = ensure_teacher(cfg, model_path, out_dir)
    if cfg.method.name == "theseus":  # module replacing: a shallower full-precision successor, its own loop
        from kdlsq_pl.stages.theseus import train_theseus
        return train_theseus(cfg, teacher_dir, teacher, out_dir)
    t0 = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg, str(teacher_dir), cfg.data.batch_size)
    module = build_student_module(cfg, teacher_dir, dm)
    method = cfg.method.name
    run_name = cell_name(cfg.stage, method, cfg.task.name, cfg.quant.name, cfg.seed)  # W&B run name = cell folder name
    trainer = build_trainer(cfg, out_dir, run_name, extra_callbacks=quant_callbacks(cfg) if cfg.method.train else None)
    fit_s = None
    try:
        if cfg.method.train:
            t_fit = time.time()
            fit(trainer, module, dm)
            fit_s = time.time() - t_fit
            module.metrics_from_trainer()
        else:
            post_training_quantize(cfg, module, dm)
            trainer.validate(module, datamodule=dm, verbose=False)
        final = dict(module.last)
        best = dict(module.best_row)  # the metrics of the best checkpoint's evaluation, one row
        size = model_size_bytes(module.student)
        for lg in trainer.loggers:
            lg.log_metrics({"model/size_bytes": size["size_bytes"], "model/compression_ratio": size["compression_ratio"],
                            "teacher/" + cfg.task.metric: teacher.get("value") or 0.0})
    finally:
        finish_loggers(trainer)
    metric = cfg.task.metric
    from transformers import AutoConfig

    teacher_layers = int(AutoConfig.from_pretrained(str(teacher_dir)).num_hidden_layers)  # read once for the record
    fp32 = size["fp32_bytes"]  # the FP32 reference is the teacher: a shallower student is measured against it
    if cfg.student.layers or cfg.student.init != "teacher":
        fp32 = teacher_fp32_bytes(teacher_dir, cfg.task)
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    fields = {
        "bits": {k: int(cfg.quant[k]) for k in ("weight_bits", "embedding_bits", "act_bits")},
        "bit_overrides": OmegaConf.to_container(cfg.quant.overrides) if cfg.quant.get("overrides") else {}, "avg_weight_bits": size["avg_weight_bits"],
        "teacher_metric": teacher.get("value"), "teacher_metrics": teacher.get("metrics"), "teacher_dir": str(teacher_dir),
        "metrics": final, "best_metrics": best, "best": best.get(metric), "final": final.get(metric),
        "size_bytes": size["size_bytes"], "fp32_bytes": fp32, "compression_ratio": fp32 / size["size_bytes"],
        "checkpoint": ckpt or None,
        "student_init": str(cfg.student.init), "student_layers": int(module.student.config.num_hidden_layers),
        "teacher_layers": teacher_layers,
        "student_wall_time_s": round(time.time() - t0, 1), **protocol_fields(dm), **knowledge_fields(cfg, module, dm, fit_s, teacher_layers),
    }
    if cfg.export_packed and packable(module.student):
        fields.update(export_best(cfg, module.student, ckpt, teacher_dir, out_dir))
    split = fields.get("squad_protocol", {}).get("protocol", "dev")  # offline-dev-split: never mistaken for official dev
    print_summary(f"{method} {cfg.quant.name} on {cfg.task.name} ({metric}, {split})", [
        ("teacher (FP32)", fmt(teacher.get("value"))), ("student best", fmt(fields["best"])),
        ("student final", fmt(fields["final"])), ("size (MB)", f"{size['size_bytes'] / 1e6:.2f}"),
        ("average weight bits", f"{size['avg_weight_bits']:.2f}"),
        ("compression vs FP32", f"{size['compression_ratio']:.1f}x"),
        *([("packed file (MB)", f"{fields['packed_bytes'] / 1e6:.2f} ({fields['packed_compression_ratio']:.1f}x smaller)")]
          if "packed_bytes" in fields else []), ("student wall time (s)", f"{fields['student_wall_time_s']:.0f}")])
    return fields
