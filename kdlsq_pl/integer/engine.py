"""An integer-only inference engine built from a trained KDLSQ student (I-BERT's dataflow, METHODS.md section 3).

The student's learned step sizes become the quantization scales: every quantized weight is stored as its int8
codes (2- and 4-bit codes widened to int8), every Linear's input is requantized onto its input quantizer's grid
(int8 codes), Q, K, V and the attention probabilities onto theirs. Matrix products are int8 x int8 -> int32 by
oneDNN's matmul primitive (the PyPI wheel ``onednn-cpu-gomp``, :func:`kdlsq_pl.kernels.integer_kernels`): for the
Linears on weights packed once when the engine is built (the query, key and value Linears as one product where they
share an input step size, as in a calibrated student), and batched over heads for the two attention products
inside the fused attention kernel (``int_attention``); the reference path uses ``torch._int_mm`` and int32
``torch.matmul``;
biases are integers on the accumulator's scale; requantization between them is dyadic (``ops.Requantize``: an integer
multiplier and a right shift). GELU, softmax and LayerNorm are I-BERT's integer operators (``ops``), the pooler's
tanh is ``2 sigmoid(2x) - 1`` with the sigmoid as a two-way integer softmax, and the classifier head's weights
(full precision in the student) are 16-bit integers. Embeddings are integer tables summed in integers; at
4 bits or fewer the word table is kept as its codes (one byte each) and each row's few level values, above as int32. Between
the token ids and the logits no floating-point operation runs: every float scale is folded into integer
constants when the engine is built (:meth:`IntegerEngine.from_student`), where one float forward of the student
on calibration batches also fixes the scales of the tensors the student keeps in full precision (the residual
sums entering each LayerNorm, the GELU input and the pooler's tanh input).

Supported: BERT-layout encoders (BERT, MiniLM) whose embeddings, Linears and attention activations all carry
LSQ quantizers of at most 8 bits (``quant=w2a8 | w4a8 | w8a8``, per tensor or per channel), with the ``cls`` or
``mean`` pooling of ``kdlsq_pl.models.pooling``.
"""

from __future__ import annotations

import gc
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from kdlsq_pl import kernels as kernels_mod
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.integer.ops import INT, IntGELU, IntLayerNorm, IntSoftmax, Requantize
from kdlsq_pl.quant.lsq import LSQQuantizer

#: Bits of the residual sums entering a LayerNorm (I-BERT: 22), of the GELU and tanh inputs, of LayerNorm
#: outputs (over their hard bound ``max|gamma| sqrt(n) + max|beta|``), and of the classifier's weights.
RESIDUAL_BITS, ACT_BITS, LN_OUT_BITS, HEAD_BITS = 22, 20, 20, 16
#: Calibrated ranges are widened by this factor before a scale is fixed; values beyond are clamped.
MARGIN = 2.0


def _lsq(q: nn.Module, what: str) -> LSQQuantizer:
    if not isinstance(q, LSQQuantizer) or q.bits > 8:
        raise ConfigError(f"integer engine: {what} needs an LSQ quantizer of 2..8 bits; got {type(q).__name__}"
                          f"{' at ' + str(q.bits) + ' bits' if hasattr(q, 'bits') else ''}; allowed: a KDLSQ/LSQ student")
    return q


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class IntLinear:
    """A quantized Linear as int8 codes: ``acc = Q_in(x) @ W_codes^T + b_int`` (int32 accumulation, int64 out).

    Built from a ``QuantLinear`` and the scale of its integer input; ``acc`` has the per-output-channel scale
    ``s_in * s_w`` (``scale_out``, float64 ``[out]``, for the next folding).
    """

    def __init__(self, linear: nn.Module, scale_in, in_bits: int = 31):
        wq = _lsq(linear.weight_quantizer, "weight")
        aq = _lsq(linear.input_quantizer, "Linear input")
        s_w = _f64(wq.step_size).reshape(-1)
        w = _f64(linear.weight)
        codes = torch.clamp(torch.round(w / s_w.reshape(-1, 1) if s_w.numel() > 1 else w / s_w), -wq.Q_N, wq.Q_P)
        self.w_t = codes.to(torch.int8).t().contiguous()  # [in, out]
        s_a = float(aq.step_size)
        self.in_rq = Requantize(scale_in, s_a, -aq.Q_N, aq.Q_P, in_bits=in_bits)
        self.scale_out = s_a * s_w.expand(codes.shape[0]).clone()
        bias = _f64(linear.bias) if linear.bias is not None else torch.zeros(codes.shape[0], dtype=torch.float64)
        self.bias = torch.round(bias / self.scale_out).to(INT)

    @classmethod
    def side_by_side(cls, linears: list["IntLinear"]) -> "IntLinear":
        """One Linear whose output is the outputs of ``linears`` side by side (weights ``[in, sum(out)]``, biases and
        output scales concatenated), for Linears that read the same codes (equal input requantizations)."""
        self = object.__new__(cls)
        self.w_t = torch.cat([lin.w_t for lin in linears], dim=1).contiguous()
        self.in_rq = linears[0].in_rq
        self.scale_out = torch.cat([lin.scale_out for lin in linears])
        self.bias = torch.cat([lin.bias for lin in linears])
        return self

    #: The weights packed for oneDNN's matmul primitive (``torch.classes.kdlsq.PackedS8`` of
    #: :func:`kdlsq_pl.kernels.integer_kernels`), set by an engine on the fused path; None: ``torch._int_mm`` on ``w_t``.
    packed = None

    def mm(self, x8: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``x8 @ w_t`` into ``out``: ``x8`` ``[N, in]`` int8, ``out`` ``[N, out]`` int32 (no bias)."""
        return self.packed.mm(x8, out) if self.packed is not None else torch._int_mm(x8, self.w_t, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.in_rq(x).to(torch.int8)
        lead = codes.shape[:-1]
        acc = torch._int_mm(codes.reshape(-1, codes.shape[-1]), self.w_t)
        return acc.to(INT).reshape(*lead, -1) + self.bias


def _ln_bound(ln: nn.LayerNorm) -> float:
    return float(ln.weight.detach().abs().max()) * math.sqrt(ln.normalized_shape[-1]) + float(ln.bias.detach().abs().max())


class _Workspace(threading.local):
    """The fused path's reused output buffers: one growable flat buffer per tag, per thread.

    Each intermediate of a layer (the Linears' int32 products, the int8 codes, the LayerNorm outputs) is written
    into the same memory on every layer and every call, instead of a new tensor each time.
    Memory written again soon is still in cache, where a new allocation of a few MB costs a trip to DRAM: at batch
    8, length 128 that alone made the Linears' GEMMs take twice their back-to-back time inside the engine
    (``benchmarks/engine_profile.py`` prints the A/B). A tag's buffer is only reused after its previous content has been read;
    the LayerNorm outputs take two buffers in turn, except in a call that returns the hidden states (new tensors
    then). Nothing a call returns is a view of a buffer. Per thread: two threads may call one engine at once.
    ``reuse=False`` hands out a new tensor each time instead (the engine before this workspace, for benchmarks).
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}  # (tag, shape, dtype) -> the view handed out last time

    def __call__(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``[*shape]`` tensor of ``dtype`` in the buffer of ``tag`` (its content is undefined)."""
        if not self.reuse:
            return torch.empty(shape, dtype=dtype)
        key = (tag, shape, dtype)
        view = self.views.get(key)
        if view is not None:  # the same view as last time (slicing and viewing cost microseconds a call)
            return view
        flat = self.buffers.get(tag)
        n = math.prod(shape)
        if flat is None or flat.dtype != dtype or flat.numel() < n:
            flat = self.buffers[tag] = torch.empty(n, dtype=dtype)
            self.views = {k: v for k, v in self.views.items() if k[0] != tag}  # views of the old buffer
        view = self.views[key] = flat[:n].view(shape)
        return view


@dataclass
class _Layer:
    q: IntLinear
    k: IntLinear
    v: IntLinear
    q_rq: Requantize
    k_rq: Requantize
    v_rq: Requantize
    softmax: IntSoftmax
    p_rq: Requantize
    o: IntLinear
    o_rq: Requantize
    h_rq1: Requantize
    ln1: IntLayerNorm
    i: IntLinear
    g_rq: Requantize
    gelu: IntGELU
    o2: IntLinear
    o2_rq: Requantize
    h_rq2: Requantize
    ln2: IntLayerNorm
    heads: int
    clamp1: int
    clamp2: int
    fused: dict | None = None  # the fused kernels' constant arguments (:func:`_fused_args`), set at build time
    qkv: IntLinear | None = None  # the query, key and value Linears side by side where they share an input grid


@torch.no_grad()
def _calibrate_ranges(student: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Largest ``|value|`` of each full-precision tensor the engine must integerize, over a float forward of
    ``student`` on ``batches``: LayerNorm inputs (residual sums), GELU inputs, the pooler's tanh input."""
    ranges: dict[str, float] = {}
    hooks = []

    def keep(name, t):
        ranges[name] = max(ranges.get(name, 0.0), float(t.detach().abs().max()))

    for name, m in student.named_modules():
        if isinstance(m, nn.LayerNorm):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: keep(name, args[0])))
        if name.endswith("intermediate.dense") or name.endswith("pooler.dense"):
            hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: keep(name, out)))
    was = student.training
    student.eval()
    try:
        for b in batches:
            student(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        student.train(was)
        for h in hooks:
            h.remove()
    return ranges


def _one_product(L: _Layer) -> bool:
    """Whether the query, key and value Linears can run as one product: they read the same int8 codes (equal input
    requantizations) and clamp their outputs alike, as in a calibrated student, where the three input quantizers
    start from the same tensor; training moves their step sizes apart."""
    lins = (L.q, L.k, L.v)
    return (all(lin.in_rq.m.numel() == 1 for lin in lins)
            and len({(int(lin.in_rq.m), int(lin.in_rq.e), lin.in_rq.lo, lin.in_rq.hi) for lin in lins}) == 1
            and len({(r.lo, r.hi) for r in (L.q_rq, L.k_rq, L.v_rq)}) == 1)


def _rq_args(r: Requantize) -> tuple:
    """A requantization as the fused kernels take it: ``m``, ``e`` (flat int64), ``lo``, ``hi``."""
    return r.m.reshape(-1).contiguous(), r.e.reshape(-1).contiguous(), r.lo, r.hi


def _fused_args(L: _Layer) -> dict[str, tuple]:
    """Every constant argument of one layer's fused kernel calls, as tuples: built once with the engine instead of
    converting and reshaping the same tensors at every call."""
    rq = _rq_args

    def residual(lin: IntLinear, a_rq: Requantize, h_rq: Requantize, clamp: int, ln: IntLayerNorm) -> tuple:
        return (lin.bias, *rq(a_rq)[:2]), (int(h_rq.m), int(h_rq.e), clamp, ln.gamma_int, ln.beta_int, ln.NORM_BITS,
                                           int(ln.requant.m), int(ln.requant.e))

    def code(lin: IntLinear) -> tuple:
        m, e, lo, hi = rq(lin.in_rq)
        if m.numel() != 1:
            raise ConfigError("integer engine: a Linear's input quantizer must have one step size (per tensor)")
        return m, e, lo, hi

    sm, p, g, n = L.softmax, L.p_rq, L.gelu, L.o2.in_rq
    o_m, o_e, o_lo, o_hi = code(L.o)
    qkv = {"q": (L.q, L.q_rq), "k": (L.k, L.k_rq), "v": (L.v, L.v_rq)}
    if L.qkv is not None:  # one product for the three: its [N, 3D] output onto the three grids, channel by channel
        m, e = ([rq(r)[j].expand(lin.bias.numel()) for lin, r in qkv.values()] for j in (0, 1))
        outs = {"qkv_out": (L.qkv.bias, torch.cat(m), torch.cat(e), L.q_rq.lo, L.q_rq.hi)}
    else:  # each product onto its codes: (bias, m, e, lo, hi)
        outs = {f"{name}_out": (lin.bias, *rq(r)) for name, (lin, r) in qkv.items()}
    return outs | {
        # int_attention: the softmax constants and the probability grid; the output Linear's input grid
        "attention": ([sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS, sm.NUM_BITS, int(p.m),
                       int(p.e), p.lo, p.hi], int(o_m), int(o_e), o_lo, o_hi),
        # the int8 codes a LayerNorm writes beside its output: (m, e, lo, hi) of each Linear that reads it
        "qkv_code": [int(v) for lin in ((L.q,) if L.qkv is not None else (L.q, L.k, L.v)) for v in code(lin)],
        "i_code": [int(v) for v in code(L.i)],
        "gelu": (L.i.bias, *rq(L.g_rq)[:2], L.g_rq.hi, g.b_int, g.c_int, g.shift, g.one, int(n.m), int(n.e), n.lo, n.hi),
        "res1": residual(L.o, L.o_rq, L.h_rq1, L.clamp1, L.ln1),
        "res2": residual(L.o2, L.o2_rq, L.h_rq2, L.clamp2, L.ln2),
    }


class IntegerEngine:
    """Integer-only inference of a quantized BERT classifier (see the module docstring).

    Call it with ``input_ids`` ``[B, T]`` (int64), ``attention_mask`` ``[B, T]`` (1 = real token) and
    ``token_type_ids`` ``[B, T]``; it returns the logits as integers ``[B, num_labels]`` (int64) whose real value
    is ``logits * logit_scale`` (``logit_scale`` is a Python float; the argmax of the integers is the class).
    """

    def __init__(self):
        raise TypeError("build an IntegerEngine with IntegerEngine.from_student(student, calibration_batches)")

    @classmethod
    @torch.no_grad()
    def from_student(cls, student: nn.Module, calibration_batches: Iterable[Mapping[str, torch.Tensor]],
                     fused: bool | None = None) -> "IntegerEngine":
        """Fold a quantized student (``quantize_`` + trained or calibrated step sizes) into an integer engine.

        Args:
            student: a BERT-layout ``*ForSequenceClassification`` with LSQ quantizers on every embedding, Linear and
                attention activation.
            calibration_batches: a few batches (``input_ids``, ``attention_mask``, ``token_type_ids``) for the scales
                of the tensors the student keeps in full precision.
            fused: run each layer's integer passes as the fused C++ kernels of ``csrc/integer_cpu.cpp`` and its
                GEMMs by oneDNN's matmul primitive (bit-identical to the torch operators of ``ops``; needs the
                ``onednn-cpu-gomp`` wheel, :func:`kdlsq_pl.kernels.integer_kernels`); ``None``: where they can be
                built; ``False``: the torch operators and ``torch._int_mm`` (the reference).

        Raises:
            ConfigError: a model the engine does not support (not BERT-layout, a quantizer that is not LSQ or is
                wider than 8 bits, an unquantized module).
        """
        if student.config.model_type != "bert":
            raise ConfigError(f"integer engine: model type {student.config.model_type!r} is not supported; allowed: bert")
        self = object.__new__(cls)
        self.workspace = _Workspace()
        self.kernels = kernels_mod.integer_kernels() if fused is not False else None
        if fused and self.kernels is None:
            raise RuntimeError("integer engine: fused=True but the C++ kernels could not be built (see the warning above)")
        ranges = _calibrate_ranges(student, list(calibration_batches))
        bert = student.bert
        emb = bert.embeddings
        for name in ("word_embeddings", "position_embeddings"):
            if not hasattr(getattr(emb, name), "weight_quantizer"):
                raise ConfigError(f"integer engine: bert.embeddings.{name} is not quantized; allowed: a quantized student")

        def codes_and_step(e: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            """A quantized table's codes ``[V, D]`` and step size ``[V, 1]`` or ``[1, 1]``, both float64."""
            q = _lsq(e.weight_quantizer, "embedding")
            s = _f64(q.step_size)
            s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)
            return torch.clamp(torch.round(_f64(e.weight) / s), -q.Q_N, q.Q_P), s

        def table(e: nn.Module) -> torch.Tensor:
            if getattr(e, "weight_quantizer", None) is None:
                return _f64(e.weight)
            codes, s = codes_and_step(e)
            return codes * s

        s_e = MARGIN * ranges["bert.embeddings.LayerNorm"] / 2 ** (RESIDUAL_BITS - 1)
        self.embedding_scale = s_e  # the float scale of the integer embedding sum
        self.word, self.word_codes, self.word_lut = None, None, None
        wq = _lsq(emb.word_embeddings.weight_quantizer, "embedding")
        if wq.bits <= 4:  # codes + a per-row table of their values on s_e: the same integers, a fraction of the memory
            codes, s = codes_and_step(emb.word_embeddings)
            levels = torch.arange(-wq.Q_N, wq.Q_P + 1, dtype=torch.float64).reshape(1, -1)
            self.word_lut = torch.round(levels * s / s_e).to(INT)  # [V or 1, Q_N + Q_P + 1]
            self.word_codes = (codes + wq.Q_N).to(torch.uint8)  # [V, D]: each entry's column in word_lut
        else:  # int32 where the values allow (half the memory of int64; the same integers)
            word = torch.round(table(emb.word_embeddings) / s_e)
            self.word = word.to(torch.int32 if float(word.abs().max()) < 2 ** 30 else INT)
        self.position = torch.round(table(emb.position_embeddings) / s_e).to(INT)
        self.token_type = torch.round(table(emb.token_type_embeddings) / s_e).to(INT)
        self.clamp_e = 2 ** (RESIDUAL_BITS + 1)
        s_h = _ln_bound(emb.LayerNorm) / 2 ** (LN_OUT_BITS - 1)
        self.ln_e = IntLayerNorm(emb.LayerNorm.weight, emb.LayerNorm.bias, s_h)
        self.layers = []
        for idx, layer in enumerate(bert.encoder.layer):
            att, prefix = layer.attention, f"bert.encoder.layer.{idx}"
            aq = getattr(att.self, "kdlsq_act_quant", None)
            if aq is None:
                raise ConfigError(f"integer engine: {prefix}.attention has no activation quantizers; allowed: quantize_attention=true")
            sq, sk, sv, sp = (_lsq(aq[k], f"attention {k}") for k in ("query", "key", "value", "probs"))
            q, k, v = IntLinear(att.self.query, s_h), IntLinear(att.self.key, s_h), IntLinear(att.self.value, s_h)
            s_score = float(sq.step_size) * float(sk.step_size) * float(att.self.scaling)
            s_ctx = float(sp.step_size) * float(sv.step_size)
            o = IntLinear(att.output.dense, s_ctx)
            s_r1 = MARGIN * ranges[f"{prefix}.attention.output.LayerNorm"] / 2 ** (RESIDUAL_BITS - 1)
            s_h1 = _ln_bound(att.output.LayerNorm) / 2 ** (LN_OUT_BITS - 1)
            i = IntLinear(layer.intermediate.dense, s_h1)
            s_g = MARGIN * ranges[f"{prefix}.intermediate.dense"] / 2 ** (ACT_BITS - 1)
            gelu = IntGELU(s_g)
            o2 = IntLinear(layer.output.dense, gelu.scale_out, in_bits=gelu.out_bits(ACT_BITS + 2))  # GELU input clamp 2^(ACT_BITS+1)
            s_r2 = MARGIN * ranges[f"{prefix}.output.LayerNorm"] / 2 ** (RESIDUAL_BITS - 1)
            s_h2 = _ln_bound(layer.output.LayerNorm) / 2 ** (LN_OUT_BITS - 1)
            self.layers.append(_Layer(
                q=q, k=k, v=v,
                q_rq=Requantize(q.scale_out, float(sq.step_size), -sq.Q_N, sq.Q_P),
                k_rq=Requantize(k.scale_out, float(sk.step_size), -sk.Q_N, sk.Q_P),
                v_rq=Requantize(v.scale_out, float(sv.step_size), -sv.Q_N, sv.Q_P),
                softmax=IntSoftmax(s_score), p_rq=Requantize(IntSoftmax(s_score).scale_out, float(sp.step_size), 0, sp.Q_P),
                o=o, o_rq=Requantize(o.scale_out, s_r1), h_rq1=Requantize(s_h, s_r1),
                ln1=IntLayerNorm(att.output.LayerNorm.weight, att.output.LayerNorm.bias, s_h1),
                i=i, g_rq=Requantize(i.scale_out, s_g, -2 ** (ACT_BITS + 1), 2 ** (ACT_BITS + 1)), gelu=gelu,
                o2=o2, o2_rq=Requantize(o2.scale_out, s_r2), h_rq2=Requantize(s_h1, s_r2),
                ln2=IntLayerNorm(layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, s_h2),
                heads=att.self.num_attention_heads, clamp1=2 ** (RESIDUAL_BITS + 1), clamp2=2 ** (RESIDUAL_BITS + 1)))
            if self.kernels is not None:
                L = self.layers[-1]
                if _one_product(L):
                    L.qkv = IntLinear.side_by_side([q, k, v])
                for lin in ((L.qkv,) if L.qkv is not None else (q, k, v)) + (o, i, o2):  # packed once for oneDNN's matmul
                    lin.packed = torch.classes.kdlsq.PackedS8(lin.w_t)
                L.fused = _fused_args(L)
            s_h = s_h2
        pooler = bert.pooler
        self.pooling = getattr(pooler, "mode", "cls")
        dense = getattr(pooler, "dense", None)
        self.pool_dense = None
        s_x = s_h
        if dense is not None:
            self.pool_dense = IntLinear(dense, s_h)
            s_t = MARGIN * ranges["bert.pooler.dense"] / 2 ** (ACT_BITS - 1)
            self.t_rq = Requantize(self.pool_dense.scale_out, s_t, -2 ** (ACT_BITS + 1), 2 ** (ACT_BITS + 1))
            self.sigmoid = IntSoftmax(2.0 * s_t, out_bits=15, max_len=2)  # sigmoid(2x) = softmax([2x, 0])[0]
            s_x = 2.0 ** -15
            if self.kernels is not None:
                self.pool_dense.packed = torch.classes.kdlsq.PackedS8(self.pool_dense.w_t)
                self._pool_args = (_rq_args(self.pool_dense.in_rq), _rq_args(self.t_rq))
        w = _f64(student.classifier.weight)
        s_w = float(w.abs().max()) / 2 ** (HEAD_BITS - 1)
        self.head_w_t = torch.round(w / s_w).to(INT).t().contiguous()  # [D, C]
        self.logit_scale = s_x * s_w
        self.head_b = torch.round(_f64(student.classifier.bias) / self.logit_scale).to(INT)
        self.num_labels = w.shape[0]
        return self

    def _layer(self, L: _Layer, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape

        def heads(t):  # [B, T, D] -> [B, H, T, d]
            return t.reshape(B, T, L.heads, -1).transpose(1, 2)

        qc = heads(L.q_rq(L.q(h))).to(torch.int32)
        kc = heads(L.k_rq(L.k(h))).to(torch.int32)
        vc = heads(L.v_rq(L.v(h))).to(torch.int32)
        scores = torch.matmul(qc, kc.transpose(-1, -2)).to(INT)  # [B, H, T, T], scale s_q s_k / sqrt(d)
        probs = L.p_rq(L.softmax(scores, mask[:, None, None, :]))  # codes on the probability quantizer's grid
        ctx = torch.matmul(probs.to(torch.int32), vc).to(INT).transpose(1, 2).reshape(B, T, -1)
        res = torch.clamp(L.o_rq(L.o(ctx)) + L.h_rq1(h), -L.clamp1, L.clamp1)
        h1 = L.ln1(res)
        g = L.gelu(L.g_rq(L.i(h1)))
        res2 = torch.clamp(L.o2_rq(L.o2(g)) + L.h_rq2(h1), -L.clamp2, L.clamp2)
        return L.ln2(res2)

    def _layer_fused(self, L: _Layer, h: torch.Tensor, codes: list[torch.Tensor], mask: torch.Tensor, nxt: _Layer | None,
                     fresh: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`_layer` through the fused kernels: the same integers (``tests/test_integer_engine.py``).

        ``h``: the layer's input ``[N, D]`` (int32); ``codes``: that input's int8 codes on the query, key and value
        Linears' input grids (written by the LayerNorm before). Returns the output ``[N, D]`` and its codes on the
        grids of ``nxt``'s query, key and value Linears (none after the last layer). Every intermediate goes into the
        engine's :class:`_Workspace`; so do the two LayerNorm outputs (the second into the buffer of ``h``, which is
        read no more) unless ``fresh``, which returns a new tensor."""
        K, ws, c = self.kernels, self.workspace, L.fused
        N, D = h.shape
        i8, i32 = torch.int8, torch.int32
        if L.qkv is not None:  # one product for the three, its column blocks onto their codes
            q8, k8, v8 = (ws(f"{n}_codes", (N, D), i8) for n in "qkv")
            K.int_requant_split(L.qkv.mm(codes[0], ws("acc_qkv", (N, 3 * D), i32)), *c["qkv_out"], [q8, k8, v8])
        else:  # each product onto its codes at once, so the int32 buffer is written again while it is still in cache
            q8, k8, v8 = (K.int_requant(lin.mm(x8, ws("acc", (N, D), i32)), *c[f"{n}_out"], True,
                                        ws(f"{n}_codes", (N, D), i8))
                          for n, x8, lin in zip("qkv", codes, (L.q, L.k, L.v)))
        sm, om, oe, olo, ohi = c["attention"]
        o8 = K.int_attention(q8, k8, v8, mask, mask.shape[0], L.heads, sm, om, oe, olo, ohi, ws("o8", (N, D), i8))
        (a1, r1), (a2, r2) = c["res1"], c["res2"]
        acc_o = L.o.mm(o8, ws("acc", (N, D), i32))
        i_in = ws("i8", (N, D), i8)
        h1 = K.int_residual_layernorm(acc_o, *a1, h, *r1, None if fresh else ws("h1", (N, D), i32), c["i_code"], [i_in])
        acc_i = L.i.mm(i_in, ws("acc_ffn", (N, L.i.w_t.shape[1]), i32))
        g8 = K.int_gelu_requant(acc_i, *c["gelu"], ws("g8", tuple(acc_i.shape), i8))
        acc_o2 = L.o2.mm(g8, ws("acc", (N, D), i32))
        nxt_codes = [ws(f"{n}8", (N, D), i8) for n in "qkv"[:len(nxt.fused["qkv_code"]) // 4]] if nxt is not None else []
        out = K.int_residual_layernorm(acc_o2, *a2, h1, *r2, None if fresh else ws("h", (N, D), i32),
                                       nxt.fused["qkv_code"] if nxt is not None else [], nxt_codes)
        return out, nxt_codes

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False):
        """Integer logits ``[B, C]`` (int64); with ``output_hidden_states`` also the integer hidden states after the
        embeddings and each layer, as ``(logits, [h_0 .. h_L])``, each ``[B, T, D]`` on its ``hidden_scales``.

        Python's cyclic garbage collector is paused during the call: the forward's objects are freed by reference
        counting, and a collection that a forward's transient tensors would trigger walks every object of the process
        (a model loaded with ``transformers`` holds about half a million), about 3.5 ms a forward on average at
        batch 8 here (``benchmarks/engine_profile.py``)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._forward(input_ids, attention_mask, token_type_ids, output_hidden_states)
        finally:
            if was_enabled:
                gc.enable()

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                 output_hidden_states: bool):
        B, T = input_ids.shape
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        if self.kernels is not None:  # the residual kernel with a zero first term and the identity multiplier
            D = self.position.shape[1]
            e = self.kernels.int_embedding(input_ids.contiguous(), tt.contiguous(), self.word_codes, self.word_lut, self.word,
                                           self.position, self.token_type, self.clamp_e, self.workspace("e", (B * T, D), torch.int32))
            zeros, no_bias, one, zero = self._zeros(B * T, D)
            out = None if output_hidden_states else self.workspace("h", (B * T, D), torch.int32)
            n_codes = len(self.layers[0].fused["qkv_code"]) // 4 if self.layers else 0
            codes = [self.workspace(f"{n}8", (B * T, D), torch.int8) for n in "qkv"[:n_codes]]
            h = self.kernels.int_residual_layernorm(zeros, no_bias, one, zero, e, 1, 0, self.clamp_e, self.ln_e.gamma_int,
                                                    self.ln_e.beta_int, self.ln_e.NORM_BITS, int(self.ln_e.requant.m),
                                                    int(self.ln_e.requant.e), out,
                                                    self.layers[0].fused["qkv_code"] if self.layers else [], codes)
            mask = mask.contiguous()
            hidden = [h.reshape(B, T, D)]
            for L, nxt in zip(self.layers, self.layers[1:] + [None]):
                h, codes = self._layer_fused(L, h, codes, mask, nxt, output_hidden_states)
                hidden.append(h.reshape(B, T, D))
            h = hidden[-1]
        else:
            e = self._word_rows(input_ids) + self.position[:T].unsqueeze(0) + self.token_type[tt]
            h = self.ln_e(torch.clamp(e, -self.clamp_e, self.clamp_e))
            hidden = [h]
            for L in self.layers:
                h = self._layer(L, h, mask)
                hidden.append(h)
        if output_hidden_states:  # the fused kernels keep the LayerNorm outputs (20 bits) in int32; report int64 alike
            hidden = [x.to(INT) for x in hidden]
        if self.pooling == "cls":
            pooled = h[:, 0].to(INT)
        else:  # mean over real tokens, rounded
            m = mask.to(INT).unsqueeze(-1)
            count = m.sum(1).clamp(min=1)
            pooled = (2 * (h * m).sum(1) + count) // (2 * count)
        if self.pool_dense is not None and self.kernels is not None:  # the same integers in three C++ calls
            K, P, sm = self.kernels, self.pool_dense, self.sigmoid
            acc = P.mm(K.int_requant(pooled.contiguous(), None, *self._pool_args[0], True), None)
            x = K.int_requant(acc, P.bias, *self._pool_args[1], False)
            pooled = K.int_tanh(x, sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS, sm.NUM_BITS)
        elif self.pool_dense is not None:
            x = self.t_rq(self.pool_dense(pooled))
            pair = torch.stack([x, torch.zeros_like(x)], dim=-1)
            pooled = 2 * self.sigmoid(pair)[..., 0] - 2 ** 15  # tanh(x) = 2 sigmoid(2x) - 1, scale 2^-15
        logits = torch.matmul(pooled, self.head_w_t) + self.head_b
        return (logits, hidden) if output_hidden_states else logits

    def _zeros(self, n: int, d: int) -> tuple[torch.Tensor, ...]:
        """The embedding LayerNorm's constant operands: a zero first term ``[n, d]`` int32 (a view of one zero buffer
        kept for the largest ``n`` so far, never written), a zero bias ``[d]``, the identity multiplier and shift."""
        z = getattr(self, "_zero_rows", None)
        if z is None or z[0].shape[0] < n:
            z = self._zero_rows = (torch.zeros(n, d, dtype=torch.int32), torch.zeros(d, dtype=INT), torch.ones(1, dtype=INT),
                                   torch.zeros(1, dtype=INT))
        return (z[0][:n],) + z[1:]

    def _word_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word embeddings of ``input_ids`` ``[B, T]`` on the embedding sum's scale, ``[B, T, D]`` int64."""
        if self.word_codes is None:
            return self.word[input_ids].to(INT)
        idx = self.word_codes[input_ids].long()  # [B, T, D]
        if self.word_lut.shape[0] == 1:  # one step size for the whole table
            return self.word_lut[0][idx]
        return torch.gather(self.word_lut[input_ids], -1, idx)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the engine holds (integer weights, also packed for oneDNN on the fused path; tables,
        biases, multipliers)."""
        seen: dict[int, int] = {}

        def walk(obj, depth=0):
            if isinstance(obj, torch.Tensor):
                seen[id(obj)] = obj.numel() * obj.element_size()
            elif isinstance(obj, torch.ScriptObject):  # a Linear's weights packed for oneDNN (PackedS8)
                seen[id(obj)] = obj.nbytes()
            elif depth < 4 and isinstance(obj, (list, tuple)):
                for x in obj:
                    walk(x, depth + 1)
            elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, type):
                for x in vars(obj).values():
                    walk(x, depth + 1)

        walk([v for k, v in vars(self).items() if k not in ("kernels", "_zero_rows")])
        return sum(seen.values())

    @property
    def hidden_scales(self) -> list[float]:
        """The float scale of each hidden state ``__call__`` returns (embeddings, then each layer)."""
        return [self.ln_e.scale_out] + [L.ln2.scale_out for L in self.layers]
