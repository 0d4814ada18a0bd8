"""Packed low-bit export of a trained student: integer codes in safetensors, and the loader.

Usage: ``python -m kdlsq_pl.export <run dir> [--out DIR] [--evaluate] [--onnx]``

Each fake-quantized weight ``W`` (word and position embeddings, encoder Linears, pooler) is stored
as its integer codes ``c = clamp(round(W / s), -Q_N, Q_P)`` shifted to ``c + Q_N >= 0`` and packed
``8 // bits`` to a byte (2 bits: 4 codes per byte, 4 bits: 2; 8 bits: 1), plus its step size ``s``.
Everything else (biases, LayerNorm, token-type embedding, classifier, activation step sizes) is
stored as it is. ``load_packed`` rebuilds the Hugging Face model with ``W = c * s``, whose
fake-quantized forward gives exactly the trained student's logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdlsq_pl.quant.baselines import DynamicMaxQuantizer, EMAMaxQuantizer, TWNQuantizer
from kdlsq_pl.quant.lsq import LSQQuantizer
from kdlsq_pl.quant.modules import QuantEmbedding, QuantLinear, quantize_
from kdlsq_pl.results import atomic_output

PACKED_FILE = "model.packed.safetensors"
META_FILE = "packed.json"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (any shape, values < 2**bits) into a flat ``uint8`` tensor.

    ``bits`` in {2, 4, 8} packs ``8 // bits`` codes per byte, little end first; 3, 5, 6, 7 bits are
    stored one code per byte. Output length: ``ceil(numel / (8 // bits))`` bytes.

    Raises:
        ValueError: a code outside ``[0, 2**bits)`` or ``bits`` outside 2..8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; allowed: 2..8")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits; got [{int(flat.min())}, {int(flat.max())}]")
    per = 8 // bits if bits in (2, 4) else 1
    width = bits if per > 1 else 8
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int64) * width
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as ``int64`` (flat)."""
    per = 8 // bits if bits in (2, 4) else 1
    width = bits if per > 1 else 8
    shifts = torch.arange(per, dtype=torch.int64) * width
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)[:numel]


def _weight_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """``<param name> -> weight quantizer`` for every fake-quantized weight (any quantizer family)."""
    return {f"{name}.weight": m.weight_quantizer for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantEmbedding))}


def _quantized_weights(model: nn.Module) -> dict[str, LSQQuantizer]:
    """``<param name> -> quantizer`` for every weight stored as codes (those with an LSQ step size)."""
    return {k: q for k, q in _weight_quantizers(model).items() if isinstance(q, LSQQuantizer)}


def packable(model: nn.Module) -> bool:
    """Whether every quantized weight of ``model`` has an LSQ step size, so codes + ``s`` export it exactly
    (TernaryBERT's and Q8BERT's per-step ranges are not stored; those students are not packed)."""
    qs = _weight_quantizers(model)
    return bool(qs) and len(_quantized_weights(model)) == len(qs)


def load_student_checkpoint(student: nn.Module, ckpt: str | Path) -> nn.Module:
    """Load the ``student.*`` entries of a Lightning checkpoint (``weights_only``) into ``student``, whose
    quantizers must already be inserted (the state holds their step sizes). Returns ``student``."""
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)["state_dict"]
    student.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return student


def export_packed(student: nn.Module, quant: Mapping[str, Any], out_dir: str | Path) -> dict:
    """Write ``student`` (a quantized BERT classifier) as packed codes + FP remainder to ``out_dir``.

    Files: ``model.packed.safetensors``, ``packed.json`` (quant config and bits per tensor) and the
    Hugging Face ``config.json``; written into a temporary folder and renamed into place.

    Returns:
        ``{"packed_bytes": size of the safetensors file, "params": ..., "out_dir": ...}``.
    """
    out_dir = Path(out_dir)
    qweights = _quantized_weights(student)
    tensors: dict[str, torch.Tensor] = {}
    bits: dict[str, dict] = {}
    for name, tensor in student.state_dict().items():
        q = qweights.get(name)
        if q is None:
            tensors[name] = tensor.detach().contiguous()
            continue
        s = q.step_size
        shape = [-1] + [1] * (tensor.dim() - 1) if q.per_channel else []
        codes = torch.clamp(torch.round(tensor.detach() / s.reshape(shape)), -q.Q_N, q.Q_P).to(torch.int64) + q.Q_N
        tensors[f"{name}.codes"] = pack_codes(codes, q.bits)
        bits[name] = {"bits": q.bits, "Q_N": q.Q_N, "shape": list(tensor.shape)}
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; export to a new folder (nothing is overwritten)")
    with atomic_output(out_dir, directory=True, replace=False) as tmp:
        save_file(tensors, str(tmp / PACKED_FILE))
        (tmp / META_FILE).write_text(json.dumps({"quant": dict(quant), "packed": bits}, indent=2))
        student.config.to_json_file(str(tmp / "config.json"))
    return {"packed_bytes": (out_dir / PACKED_FILE).stat().st_size, "out_dir": str(out_dir)}


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the quantized student from :func:`export_packed` output (weights ``W = c * s``): a sequence
    classifier, or a span model when its config's architecture is ``...ForQuestionAnswering`` (SQuAD students)."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
    from kdlsq_pl.models.pooling import apply_pooling

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = ATTN_IMPLEMENTATION
    if any(a.endswith("ForQuestionAnswering") for a in config.architectures or ()):
        model = AutoModelForQuestionAnswering.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    else:
        model = apply_pooling(AutoModelForSequenceClassification.from_config(config, attn_implementation=ATTN_IMPLEMENTATION))
    quantize_(model, meta["quant"])
    tensors = load_file(str(path / PACKED_FILE))
    state = {k: v for k, v in tensors.items() if not k.endswith(".codes")}
    qweights = _quantized_weights(model)
    for name, info in meta["packed"].items():
        q = qweights[name]
        q.scale.data.copy_(state[name.removesuffix("weight") + "weight_quantizer.scale"])
        numel = int(torch.tensor(info["shape"]).prod())
        codes = unpack_codes(tensors[f"{name}.codes"], info["bits"], numel) - info["Q_N"]
        s = q.step_size
        shape = [-1] + [1] * (len(info["shape"]) - 1) if q.per_channel else []
        state[name] = codes.to(torch.float32).reshape(info["shape"]) * s.reshape(shape)
    model.load_state_dict(state)
    return model.eval()


class QDQ(nn.Module):
    """An LSQ quantizer as ONNX ``QuantizeLinear``/``DequantizeLinear``: ``torch.fake_quantize_per_tensor_affine``
    (per-channel: ``..._per_channel_affine`` along dim 0) with the quantizer's step size, zero point 0 and the int8
    range -128..127 that torch's ONNX exporter accepts, after clipping a per-tensor input to the quantizer's own
    range ``[-Q_N s, Q_P s]`` (an ONNX ``Clip``), so activations below 8 bits and the symmetric grid's -127 keep
    their codes; it differs from the LSQ forward only in ties, which torch rounds after multiplying by ``1 / s``.
    Per-channel (weight) quantizers see weights already replaced by ``codes * s``."""

    def __init__(self, q: LSQQuantizer):
        super().__init__()
        s = q.step_size.detach().float()
        self.per_channel = s.numel() > 1
        self.register_buffer("s", s.reshape(-1) if self.per_channel else s.reshape(()))
        self.register_buffer("zp", torch.zeros(s.numel() if self.per_channel else (), dtype=torch.int32))
        self.lo, self.hi = -float(q.Q_N) * float(s.reshape(-1)[0]), float(q.Q_P) * float(s.reshape(-1)[0])

    def forward(self, x: torch.Tensor, numel: int | None = None) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.s, self.zp, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(torch.clamp(x, self.lo, self.hi), self.s, self.zp, -128, 127)


ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BASELINE_QUANTIZERS = (TWNQuantizer, DynamicMaxQuantizer, EMAMaxQuantizer)


@torch.no_grad()
def export_onnx(student: nn.Module, path: str | Path, example: Mapping[str, torch.Tensor], opset: int = 17) -> Path:
    """Write ``student`` as an ONNX graph ONNX Runtime runs: QuantizeLinear/DequantizeLinear around every quantized
    weight (its integer codes: the weight is replaced by ``codes * s`` first, so the weight QDQ is exact at any
    bit-width) and activation, dynamic batch and sequence axes, inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (``[B, T]`` int64), output ``logits`` ``[B, C]``. Written to a temporary file and renamed.

    Uses torch's TorchScript exporter (``dynamo=False``): the dynamo exporter does not take fake-quantize ops
    (pytorch #167063). ``student`` itself is not changed (a copy is exported).

    Raises:
        ValueError: a weight or activation quantizer that is not LSQ (the baselines' ranges change every step).
    """
    import copy

    model = copy.deepcopy(student).eval()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and isinstance(m.weight_quantizer, LSQQuantizer):
            m.weight.data = m.weight_quantizer(m.weight.data)  # codes * s: the weight QDQ then reproduces it exactly
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LSQQuantizer):
                setattr(parent, name, QDQ(child))
            elif isinstance(child, BASELINE_QUANTIZERS):
                raise ValueError(f"ONNX export needs LSQ quantizers; got {type(child).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(example[k] for k in ONNX_INPUTS)
    axes = {k: {0: "batch", 1: "sequence"} for k in ONNX_INPUTS} | {"logits": {0: "batch"}}
    with atomic_output(path) as tmp:
        torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=opset, input_names=list(ONNX_INPUTS),
                          output_names=["logits"], dynamic_axes=axes)
    return path


def onnx_session(path: str | Path):
    """An ONNX Runtime CPU session for an exported student, with its graph optimisations (QDQ fusion) on."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def evaluate_dev(models: Mapping[str, nn.Module], cfg, tokenizer_path: str) -> dict[str, dict]:
    """Dev metrics (x100, named as in training: ``f1``, ``acc``; ``acc_m``/``acc_mm`` for MNLI) of each model on
    ``cfg.task``'s dev splits, by the stages' own validation loop (``GLUEModule`` under ``Trainer.validate``),
    plus the largest absolute logit difference of each against the first model (``max_abs_logit_diff``)."""
    import pytorch_lightning as pl
    from omegaconf import DictConfig, OmegaConf

    from kdlsq_pl.data.glue import GLUEDataModule
    from kdlsq_pl.models.modules import TeacherModule

    task = OmegaConf.to_container(cfg.task, resolve=True) if isinstance(cfg.task, DictConfig) else dict(cfg.task)
    dm = GLUEDataModule(task, tokenizer_path, cfg.data.glue_dir, cfg.paths.cache_dir, eval_batch_size=cfg.data.eval_batch_size,
                        max_length=cfg.task.max_length, limit_eval_examples=cfg.data.get("limit_eval_examples"))
    out, ref = {}, None
    for name, model in models.items():
        was_training = model.training
        module = TeacherModule(model, task, lr=0.0, weight_decay=0.0, warmup_ratio=0.0)
        logits: list[torch.Tensor] = []
        forward = module.eval_logits
        module.eval_logits = lambda batch, forward=forward, logits=logits: logits.append(forward(batch)) or logits[-1]
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).validate(module, datamodule=dm, verbose=False)
        model.train(was_training)  # as it came (the Trainer restores the module's mode, TeacherModule set train)
        z = torch.cat(logits)
        ref = z if ref is None else ref
        out[name] = dict(module.last) | {"max_abs_logit_diff": float((z - ref).abs().max())}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Export a trained KDLSQ student as packed integer codes.")
    ap.add_argument("run", help="a student run folder (holds result.json and checkpoints/)")
    ap.add_argument("--out", default=None, help="output folder (default: <run>/packed)")
    ap.add_argument("--onnx", action="store_true", help="also write <run>/onnx/model.onnx (QDQ graph for ONNX Runtime)")
    ap.add_argument("--evaluate", action="store_true",
                    help="reload the export and compare its dev metric and logits with the fake-quantized student's")
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
    from kdlsq_pl.models.loading import init_student

    run = Path(args.run)
    record = json.loads((run / "result.json").read_text())
    cfg = OmegaConf.create(record["config"])
    student = init_student(cfg, record["teacher_dir"], attn_implementation=ATTN_IMPLEMENTATION)
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    quantize_(student, quant)
    load_student_checkpoint(student, record["checkpoint"])
    info = export_packed(student, quant, args.out or run / "packed")
    fp32 = record.get("fp32_bytes")
    ratio = f", {fp32 / info['packed_bytes']:.1f}x smaller than FP32 ({fp32 / 1e6:.1f} MB)" if fp32 else ""
    print(f"wrote {info['out_dir']}: {info['packed_bytes'] / 1e6:.2f} MB{ratio}")
    if args.onnx:
        from kdlsq_pl.infer import calibration_batches, run_datamodule
        example = calibration_batches(run_datamodule(record)[0], 1)[0]
        onnx_path = export_onnx(student, Path(args.out or run / "packed").parent / "onnx" / "model.onnx", example)
        print(f"wrote {onnx_path}: {onnx_path.stat().st_size / 1e6:.2f} MB (check it: python -m kdlsq_pl.infer {run} --engine onnx)")
    if args.evaluate:
        results = evaluate_dev({"fake-quantized student": student, "reloaded packed export": load_packed(info["out_dir"])},
                               cfg, record["teacher_dir"])
        for name, values in results.items():
            print(f"{name}: " + ", ".join(f"dev {k} {v:.2f}" for k, v in values.items() if k != "max_abs_logit_diff")
                  + f", max |logit - student logit| {values['max_abs_logit_diff']:.3g}")
        print(f"recorded in result.json: best dev {record.get('metric')} {record.get('best')}")


if __name__ == "__main__":
    main()
