"""Run a trained student: its dev metric and latency, or its label for a sentence (pair).

Usage::

    python -m kdlsq_pl.infer <run dir> [--engine integer|fake] [--limit N] [--batch-size 32]
    python -m kdlsq_pl.infer <run dir> --engine integer --text "A man plays." --text-pair "Someone makes music."

``<run dir>`` is a student run folder (``result.json`` + ``checkpoints/``; its ``packed/`` export is used when
present, so what runs is what ships). Engines: ``fake`` is the fake-quantized student in float (what training
evaluated); ``integer`` is :class:`kdlsq_pl.integer.engine.IntegerEngine`, integer-only from token ids to logits,
built with two training batches as calibration batches; ``onnx`` is the student's QDQ graph
(:func:`kdlsq_pl.export.export_onnx`) in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

import torch

ENGINES = ("integer", "fake", "onnx")


def load_student(run: Path):
    """``(student, record)`` of a run folder: the packed export when it exists, else the best checkpoint.

    Raises:
        FileNotFoundError: no ``result.json`` in ``run`` (one line naming the path).
    """
    from omegaconf import OmegaConf

    from kdlsq_pl.export import load_packed, load_student_checkpoint
    from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
    from kdlsq_pl.models.loading import init_student
    from kdlsq_pl.quant.modules import quantize_

    if not (run / "result.json").is_file():
        raise FileNotFoundError(f"{run}: no result.json; allowed: a student run folder (outputs/runs/... or a grid cell)")
    record = json.loads((run / "result.json").read_text())
    if record.get("stage") != "student" or record.get("status") != "finished":
        raise ValueError(f"{run}: a {record.get('status')} {record.get('stage')} run; allowed: a finished student run")
    if record.get("config", {}).get("task", {}).get("kind") == "qa":
        raise ValueError(f"{run}: a question answering run (task={record.get('task')}); allowed: a classification or "
                         f"regression student (SQuAD students are scored by their stage: see result.json's metrics)")
    if not (run / "packed" / "packed.json").is_file() and not (record.get("checkpoint") and Path(record["checkpoint"]).is_file()):
        raise FileNotFoundError(f"{run}: neither packed/ nor the checkpoint {record.get('checkpoint')} exists; allowed: a run "
                                f"that kept its best checkpoint or its packed export")
    if (run / "packed" / "packed.json").is_file():
        return load_packed(run / "packed"), record
    cfg = OmegaConf.create(record["config"])
    student = init_student(cfg, record["teacher_dir"], attn_implementation=ATTN_IMPLEMENTATION)
    quantize_(student, OmegaConf.to_container(cfg.quant, resolve=True))
    return load_student_checkpoint(student, record["checkpoint"]).eval(), record


def run_datamodule(record: dict, batch_size: int = 32, limit: int | None = None):
    """``(datamodule, task)`` of a run's record: its task's train and dev splits, set up (``limit``: dev rows)."""
    from omegaconf import OmegaConf

    from kdlsq_pl.data.glue import GLUEDataModule

    cfg = OmegaConf.create(record["config"])
    task = OmegaConf.to_container(cfg.task, resolve=True)
    dm = GLUEDataModule(task, record["teacher_dir"], cfg.data.glue_dir, cfg.paths.cache_dir, batch_size=batch_size,
                        eval_batch_size=batch_size, max_length=task["max_length"], limit_eval_examples=limit)
    dm.setup("fit")
    return dm, task


def calibration_batches(dm, n: int = 2) -> list[dict]:
    """The first ``n`` calibration batches of the training split (the integer engine's and ONNX export's examples)."""
    return list(islice(iter(dm.calibration_dataloader()), n))


def build_engine(name: str, student, calibration: list[dict]):
    """A callable ``(input_ids, attention_mask, token_type_ids) -> float logits [B, C]`` for engine ``name``."""
    if name == "fake":
        return lambda ids, mask, tt: student(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    if name == "onnx":  # the QDQ graph of ``python -m kdlsq_pl.export <run> --onnx``, exported to a temporary folder
        import tempfile

        from kdlsq_pl.export import ONNX_INPUTS, export_onnx, onnx_session

        with tempfile.TemporaryDirectory() as tmp:
            session = onnx_session(export_onnx(student, Path(tmp) / "model.onnx", calibration[0]))

        def run(ids, mask, tt):
            feeds = dict(zip(ONNX_INPUTS, (ids.numpy(), mask.numpy(), tt.numpy())))
            return torch.from_numpy(session.run(None, feeds)[0])
        return run
    from kdlsq_pl.integer.engine import IntegerEngine

    engine = IntegerEngine.from_student(student, calibration)
    return lambda ids, mask, tt: engine(ids, mask, tt).to(torch.float64) * engine.logit_scale


@torch.no_grad()
def split_predictions(forward, dm, key: str, is_regression: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(predictions [N], labels [N], seconds)`` of ``forward`` (from :func:`build_engine`) over the dev split ``key``
    of the set-up datamodule ``dm``, in order: class ids (int64) or regression scores; ``seconds`` is the time spent in
    ``forward`` alone (no tokenization or batching)."""
    from kdlsq_pl.metrics import predictions

    preds, labels, seconds = [], [], 0.0
    for batch in dm._loader(key, shuffle=False):
        t0 = time.perf_counter()
        logits = forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        seconds += time.perf_counter() - t0
        preds.append(predictions(logits, is_regression))
        labels.append(batch["labels"])
    return torch.cat(preds), torch.cat(labels), seconds


def dev_metrics(task: dict, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's dev metrics (x100, e.g. ``{"acc": .., "f1": ..}``) of ``preds`` [N] (from :func:`split_predictions`)
    against ``labels`` [N]."""
    from kdlsq_pl.metrics import build_metrics

    metrics = build_metrics(task)
    metrics.update(preds, labels)
    return {k: 100.0 * float(v) for k, v in metrics.compute().items()}


@torch.no_grad()
def evaluate(run: Path, engine_name: str, limit: int | None = None, batch_size: int = 32) -> dict:
    """Dev metrics (x100) of ``engine_name`` on the run's task, with the wall time (s) and ms per example."""
    student, record = load_student(run)
    dm, task = run_datamodule(record, batch_size, limit)
    forward = build_engine(engine_name, student, calibration_batches(dm))
    out = {"engine": engine_name, "task": task["name"], "quant": record.get("quant"), "recorded_best": record.get("best")}
    for key in dm.dev_keys:
        preds, labels, seconds = split_predictions(forward, dm, key, not task["labels"])
        n = len(labels)
        out[key] = {"metrics": dev_metrics(task, preds, labels), "examples": n, "seconds": seconds,
                    "ms_per_example": 1000.0 * seconds / max(n, 1)}
    return out


@torch.no_grad()
def label_text(run: Path, engine_name: str, text: str, text_pair: str | None) -> str:
    """The predicted label of one sentence (pair): the task's label string, or the regression value."""
    from transformers import AutoTokenizer

    from omegaconf import OmegaConf

    student, record = load_student(run)
    task = OmegaConf.to_container(OmegaConf.create(record["config"]).task, resolve=True)
    tok = AutoTokenizer.from_pretrained(record["teacher_dir"])
    calibration = calibration_batches(run_datamodule(record)[0]) if engine_name in ("integer", "onnx") else []
    forward = build_engine(engine_name, student, calibration)
    enc = tok(text, text_pair, truncation=True, max_length=task["max_length"], return_tensors="pt")
    logits = forward(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])))
    if not task["labels"]:
        return f"{float(logits[0, 0]):.4f}"
    return str(task["labels"][int(logits[0].argmax())])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate a trained student on its dev split, or label a sentence (pair).")
    ap.add_argument("run", help="a student run folder (result.json, checkpoints/, packed/)")
    ap.add_argument("--engine", default="integer", choices=ENGINES, help="default integer")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N dev examples only")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--text", default=None, help="print the label of this sentence instead of evaluating")
    ap.add_argument("--text-pair", default=None, help="the second sentence of a pair task")
    args = ap.parse_args(argv)
    try:
        if args.text is not None:
            print(label_text(Path(args.run), args.engine, args.text, args.text_pair))
            return
        result = evaluate(Path(args.run), args.engine, args.limit, args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key in (k for k in result if isinstance(result[k], dict)):
        r = result[key]
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in r["metrics"].items())
        print(f"{result['engine']} engine, {result['task']} {key} ({r['examples']} examples): {metrics}; "
              f"{r['seconds']:.1f} s, {r['ms_per_example']:.1f} ms/example (recorded best: {result['recorded_best']})")


if __name__ == "__main__":
    main()
