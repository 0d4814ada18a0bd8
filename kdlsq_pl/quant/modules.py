"""Fake-quantized drop-ins for ``nn.Linear`` / ``nn.Embedding`` and the model surgery that places them.

What is quantized follows the released KDLSQ code (METHODS.md section 1): word and position
embeddings, every encoder Linear (Q, K, V, attention output, FFN in, FFN out) and the pooler, with
activation quantizers at the input of each of those Linears and on Q, K, V and the attention
probabilities before the two attention matmuls. Token-type embedding, biases, LayerNorm, softmax
input, GELU, residuals and the classifier head stay full precision.

The replacements keep the original parameters (same names: ``...query.weight``), so a student's
state dict is the Hugging Face one plus ``*_quantizer.*`` entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdlsq_pl import options
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.layout import quantizable_modules
from kdlsq_pl.quant.baselines import DynamicMaxQuantizer, EMAMaxQuantizer, TWNQuantizer
from kdlsq_pl.quant.lsq import LSQQuantizer
from kdlsq_pl.options import allowed

#: Attention activations quantized inside the attention function (``kdlsq_pl.models.attention``).
ATTENTION_ACTS = ("query", "key", "value", "probs")


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake quantizers.

    ``y = Q_a(x) @ Q_w(W)^T + b``; x ``[..., in_features]`` -> y ``[..., out_features]``; the bias
    stays full precision. Built from an existing Linear, sharing its parameters.
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: nn.Module, input_quantizer: nn.Module | None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer if input_quantizer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table passes through a fake quantizer (ids ``[B, T]`` -> ``[B, T, D]``)."""

    def __init__(self, emb: nn.Embedding, weight_quantizer: nn.Module):
        super().__init__(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, device="meta")
        self.weight = emb.weight
        self.weight_quantizer = weight_quantizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.weight_quantizer
        if isinstance(q, LSQQuantizer) and not q.per_channel:
            # Quantizing is elementwise with one s, so quantizing the looked-up rows equals looking up
            # the quantized table; rows not looked up get no gradient either way. Saves quantizing
            # (and back-propagating through) the whole 30522 x D table every step.
            if not q.is_initialized:
                q.initialize(self.weight)  # the step size still comes from the full table
            return q(F.embedding(ids, self.weight, self.padding_idx), numel=self.weight.numel())
        if getattr(q, "rowwise", False):  # rows quantized independently: the looked-up rows suffice
            return q(F.embedding(ids, self.weight, self.padding_idx))
        return F.embedding(ids, q(self.weight), self.padding_idx)


@dataclass
class Inserted:
    """The quantizers placed in a model, by role (``weight``: Linears and embeddings; ``act``: activations)."""

    weight: dict[str, nn.Module] = field(default_factory=dict)
    act: dict[str, nn.Module] = field(default_factory=dict)

    def all(self) -> dict[str, nn.Module]:
        return {**self.weight, **self.act}


#: ``quant.weight.quantizer`` / ``quant.act.quantizer`` values: LSQ (KDLSQ, LSQ, PTQ) and the baselines'.
QUANTIZERS = tuple(dict.fromkeys(allowed(options.WeightQuantizer) + allowed(options.ActQuantizer)))


def make_quantizer(bits: int, opts: Mapping[str, Any], kind: str, num_channels: int | None = None,
                   per_row: bool = False, fused_kernel: bool = True) -> nn.Module:
    """A fake quantizer from ``quant.weight`` / ``quant.act`` options (``conf/quant/_lsq.yaml``).

    ``opts["quantizer"]`` picks the family (default ``lsq``): ``lsq`` -> ``LSQQuantizer``; ``twn`` ->
    ``TWNQuantizer`` at 2 bits (``per_row`` for the word embedding) and TernaryBERT's
    ``DynamicMaxQuantizer`` at other widths; ``dynamic_max`` -> ``DynamicMaxQuantizer`` (``clip``);
    ``ema_max`` -> ``EMAMaxQuantizer`` (``ema_decay``). ``fused_kernel``: LSQ on CPU uses the fused C++
    kernel (bit-identical to the torch formula; ``quant.fused_kernel``).

    Raises:
        ValueError: an unknown ``quantizer``.
    """
    family = opts.get("quantizer", "lsq")
    if family == "twn":
        return TWNQuantizer(per_row=per_row) if bits == 2 else DynamicMaxQuantizer(bits, opts.get("clip"), kind)
    if family == "dynamic_max":
        return DynamicMaxQuantizer(bits, opts.get("clip"), kind)
    if family == "ema_max":
        return EMAMaxQuantizer(bits, float(opts.get("ema_decay", 0.9999)))
    if family != "lsq":
        raise ValueError(f"quantizer={family!r} is not supported; allowed: {', '.join(QUANTIZERS)}")
    per_channel = bool(opts.get("per_channel", False)) and kind == "weight"
    return LSQQuantizer(bits=bits, signed=True, grid=opts["grid"], param=opts["param"], per_channel=per_channel,
                        channel_dim=0, num_channels=num_channels if per_channel else None,
                        grad_scale=bool(opts["grad_scale"]), ste_clip=bool(opts["ste_clip"]),
                        range_test=opts["range_test"], init=opts["init"], percentile=float(opts["percentile"]), kind=kind,
                        fused_kernel=fused_kernel)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


#: ``filter_fn(module, fqn) -> bool`` of :func:`quantize_`: whether the module at dotted path ``fqn`` is replaced.
FilterFn = Callable[[nn.Module, str], bool]


def weight_bits_by_module(model: nn.Module, quant: Mapping[str, Any]) -> dict[str, int]:
    """The weight bits of every embedding and Linear the surgery reaches, by dotted module path.

    ``embedding_bits`` for the embedding tables, ``weight_bits`` for the Linears, then ``quant["overrides"]``
    (``{glob pattern: bits}``, matched with ``fnmatch.fnmatchcase`` against the path, ``*`` crossing dots; the
    last matching pattern wins; the released code's per-layer bits dictionary in glob form). 32 means the
    weight stays full precision. Cheap: reads module names only, so a ``meta``-device model works.

    Raises:
        ConfigError: a pattern that matches none of these modules (one line naming it and listing examples).
    """
    targets = quantizable_modules(model)
    bits = {p: int(quant["embedding_bits"]) for p in targets["embeddings"]}
    bits |= {p: int(quant["weight_bits"]) for p in targets["linears"]}
    for pattern, b in (quant.get("overrides") or {}).items():
        hits = [p for p in bits if fnmatchcase(p, pattern)]
        if not hits:
            examples = ", ".join([targets["embeddings"][0], targets["linears"][0], targets["linears"][-1]])
            raise ConfigError(f"quant.overrides: pattern {pattern!r} matches no quantized module; allowed: a glob over "
                              f"embedding and Linear paths such as {examples}")
        for p in hits:
            bits[p] = int(b)
    return bits


def quantize_(model: nn.Module, quant: Mapping[str, Any], filter_fn: FilterFn | None = None) -> Inserted:
    """Replace a BERT-family classifier's modules with fake-quantized ones, in place (torchao's ``quantize_`` shape).

    The one insertion path: the training callback (``QuantizationCallback.setup``), PTQ, the packed export's
    reload and the benchmarks all call it. What is replaced comes from the model's own structure
    (:func:`kdlsq_pl.models.layout.quantizable_modules`): word and position embeddings (``QuantEmbedding``,
    ``embedding_bits``), every layer Linear and the head's pooler-role Linear (``QuantLinear``, ``weight_bits``
    with an ``act_bits`` input quantizer), and the Q/K/V/probability quantizers of each attention module
    (``quantize_attention``). ``quant["overrides"]`` sets the weight bits of single modules
    (:func:`weight_bits_by_module`: mixed precision).

    Args:
        model: a ``*ForSequenceClassification`` (or bare encoder) of a type in ``layout.LAYOUTS`` (BERT,
            RoBERTa, DistilBERT), loaded with ``attn_implementation="kdlsq_eager"`` so the attention
            quantizers take effect.
        quant: ``weight_bits``, ``embedding_bits``, ``act_bits`` (2..8, or 32 to leave that role in full
            precision), ``overrides`` (optional), quantizer options ``weight`` / ``act``, ``quantize_attention``,
            ``fused_kernel``.
        filter_fn: ``filter_fn(module, fqn)``; a module (embedding, Linear or attention module) is
            replaced only where it returns true. ``None``: every one.

    Returns:
        ``Inserted`` with every quantizer by its dotted module path.

    Raises:
        ConfigError: the model type has no layout, or computes attention outside transformers' interface (DeBERTa);
            an override pattern matches no module.
        ValueError: the model is already quantized.
    """
    if is_quantized(model):
        raise ValueError("model is already quantized")
    targets = quantizable_modules(model)
    bits = weight_bits_by_module(model, quant)
    keep = (lambda path: True) if filter_fn is None else (lambda path: bool(filter_fn(model.get_submodule(path), path)))
    ab = int(quant["act_bits"])
    fused = bool(quant.get("fused_kernel", True))
    inserted = Inserted()

    def act(path: str) -> nn.Module | None:
        if ab >= 32:
            return None
        q = make_quantizer(ab, quant["act"], "activation", fused_kernel=fused)
        inserted.act[path] = q
        return q

    for i, path in enumerate(targets["embeddings"]):
        if bits[path] >= 32 or not keep(path):
            continue
        emb = model.get_submodule(path)
        per_row = i == 0 and bool(quant["weight"].get("embedding_per_row", False))  # the word embedding
        q = make_quantizer(bits[path], quant["weight"], "weight", emb.num_embeddings, per_row=per_row, fused_kernel=fused)
        inserted.weight[f"{path}.weight_quantizer"] = q
        _set(model, path, QuantEmbedding(emb, q))
    for path in targets["linears"]:
        wb = bits[path]
        if (wb >= 32 and ab >= 32) or not keep(path):
            continue
        lin = model.get_submodule(path)
        wq = make_quantizer(wb, quant["weight"], "weight", lin.out_features, fused_kernel=fused) if wb < 32 else nn.Identity()
        if wb < 32:
            inserted.weight[f"{path}.weight_quantizer"] = wq
        _set(model, path, QuantLinear(lin, wq, act(f"{path}.input_quantizer")))
    if quant.get("quantize_attention", True) and ab < 32:
        for path in targets["attention"]:
            if keep(path):
                model.get_submodule(path).kdlsq_act_quant = nn.ModuleDict(
                    {k: act(f"{path}.kdlsq_act_quant.{k}") for k in ATTENTION_ACTS})
    if quant.get("integer_ops", False):
        use_integer_ops(model)
    return inserted


def use_integer_ops(model: nn.Module) -> int:
    """Train through I-BERT's integer-operator approximations (``quant.integer_ops``): every GELU inside the encoder
    layers becomes :class:`kdlsq_pl.integer.ops.IBertGELU` and every attention module computes I-BERT's softmax
    (``kdlsq_integer_softmax``), in float, so the integer engine built from the student runs what it was trained
    with. LayerNorm stays exact (the integer LayerNorm matches it to about 1e-3). Returns the number of GELUs
    replaced.

    Raises:
        ConfigError: no GELU found in the encoder layers (a model whose FFN activation is not GELU).
    """
    from transformers.activations import GELUActivation

    from kdlsq_pl.integer.ops import IBertGELU

    targets = quantizable_modules(model)
    for path in targets["attention"]:
        model.get_submodule(path).kdlsq_integer_softmax = True
    layers = {re.match(r"(.*\.layer\.\d+)\.", path).group(1) for path in targets["attention"]}  # the layer of each attention
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (GELUActivation, nn.GELU)) and any(name.startswith(p + ".") for p in layers):
            _set(model, name, IBertGELU())
            replaced += 1
    if not replaced:
        raise ConfigError("quant.integer_ops=true: no GELU in the encoder layers to replace; allowed: GELU encoders (BERT, RoBERTa, DistilBERT)")
    return replaced


def is_quantized(model: nn.Module) -> bool:
    """Whether ``quantize_`` has already run on ``model`` (any quantizer family)."""
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def lsq_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    """Every ``LSQQuantizer`` in ``model`` by dotted path: the quantizers with a learned step size (the ones
    that are calibrated, frozen, NaN-checked and get step-size optimizer groups). The baselines' quantizers
    (TWN, dynamic max, EMA max) have no learned parameter and are not included."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}


def model_size_bytes(model: nn.Module) -> dict[str, float]:
    """Storage of ``model`` at its bit-widths, in bytes (int codes packed at ``bits`` per value).

    Quantized tensors cost ``numel * bits / 8`` at their own bits (mixed precision included), every step size (or
    TWN/max scale) 4 bytes; everything else (biases, LayerNorm, token-type embedding, classifier) 4 bytes per value.
    Returns ``size_bytes``, ``fp32_bytes``, ``compression_ratio`` (FP32 / quantized) and ``avg_weight_bits``: the
    bits per value over the weights the surgery reaches (``layout.quantizable_modules``: embedding tables and
    Linear weights; 32 for those left in full precision), weighted by their sizes.

    Raises:
        ConfigError: a model type without a layout (:func:`kdlsq_pl.models.layout.layout_for`).
    """
    quantized = {id(m.weight): m.weight_quantizer for m in model.modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)) and hasattr(m.weight_quantizer, "bits")}
    scales = {id(q.scale) for q in lsq_quantizers(model).values()}
    size = fp32 = 0.0
    targets = quantizable_modules(model)
    coded = [(m.weight.numel(), getattr(getattr(m, "weight_quantizer", None), "bits", 32))
             for m in map(model.get_submodule, targets["embeddings"] + targets["linears"])]
    for p in model.parameters():
        if id(p) in scales:  # step sizes: stored in FP32 beside the codes, absent from the FP32 model
            size += 4 * p.numel()
            continue
        fp32 += 4 * p.numel()
        q = quantized.get(id(p))
        size += p.numel() * q.bits / 8 if q is not None else 4 * p.numel()
        if q is not None and not isinstance(q, LSQQuantizer):  # the baselines' scales: one per row or tensor
            size += 4 * (p.shape[0] if getattr(q, "rowwise", False) else 1)
    n = sum(k for k, _ in coded)
    avg = sum(k * b for k, b in coded) / n if n else 32.0
    return {"size_bytes": size, "fp32_bytes": fp32, "compression_ratio": fp32 / size if size else float("nan"),
            "avg_weight_bits": avg}
