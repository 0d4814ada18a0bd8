"""KDLSQ attention: BERT eager attention + activation fake-quant hooks + score capture.

Instead of forking ``modeling_bert.py`` we register an attention function with the
transformers-5 ``AttentionInterface`` under the name ``"kdlsq_eager"``. BERT's
``BertSelfAttention.forward`` looks it up through
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` and calls::

    attn_output, attn_weights = fn(module, query, key, value, attention_mask,
                                   dropout=p_if_training_else_0, scaling=module.scaling, **kwargs)

with ``query/key/value`` of shape ``[B, H, T, d_head]`` and ``attention_mask`` an
*additive* float mask ``[B, 1, T_q, T_k]`` (0 for visible keys, ``torch.finfo(dtype).min``
i.e. -3.4e38 in float32 for padded keys) or ``None`` when there is no padding at all.
The function must return ``attn_output`` as ``[B, T, H, d_head]`` (BERT reshapes it to
``[B, T, H*d_head]``) and the attention probabilities ``[B, H, T_q, T_k]``.

Loading (transformers 5.23)
---------------------------
Import this module first (it registers at import), then either::

    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="kdlsq_eager")

or switch an already-built model in place::

    model.set_attn_implementation("kdlsq_eager")   # exists in 5.23; sets config._attn_implementation

Both route the mask creation through ``ALL_MASK_ATTENTION_FUNCTIONS["kdlsq_eager"]``
(= ``transformers.masking_utils.eager_mask``), which is why :func:`register` also
registers the mask builder: ``masking_utils._preprocess_mask_arguments`` returns
``attention_mask=None`` for any implementation name missing from
``AttentionMaskInterface``, and padding would then be silently attended.

Activation quantization hooks
-----------------------------
If the attention module (``BertSelfAttention``) has an attribute ``kdlsq_act_quant``
(an ``nn.ModuleDict``) the present keys are applied:

* ``"query"``, ``"key"``, ``"value"``: to Q, K, V (``[B, H, T, d_head]``) before ``QK^T`` / ``PV``;
* ``"probs"``: to the attention probabilities after softmax and dropout, before ``P @ V``.

With ``module.kdlsq_integer_softmax`` true (``quant.integer_ops``) the softmax is I-BERT's polynomial
approximation (``kdlsq_pl.integer.ops.ibert_softmax``), the one the integer engine computes.

Where the probability quantizer is an initialised per-tensor LSQ quantizer on float32 CPU tensors and the fused
kernels are built, softmax, dropout, the quantizer and ``P @ V`` run as one autograd node
(:class:`_QuantizedProbsTimesValue`) that keeps softmax's ``P`` and a one-byte dropout mask for the backward,
instead of ``P``, dropout's float noise, the dropped tensor and its fake-quantized copy: three ``[B, H, T, T]``
float32 tensors less per layer. The outputs and every gradient are bit-identical to the composite path.

Score capture
-------------
Inside ``with capture_attention_scores() as scores:`` every call appends the pre-softmax
scores ``Q K^T * scaling + mask`` (``[B, H, T, T]``, the exact tensor the softmax sees,
not detached) to ``scores`` in call order (= layer order for an encoder). With
``capture_attention_scores(consume=fn)`` it appends ``fn(layer index, scores)`` instead (the
distillation loss turns each layer's scores into its loss term while the forward runs, so no layer's
scores outlive it). Captures use a ``ContextVar``, so only the innermost active context receives
scores and sequential teacher / student contexts never mix.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_IMPLEMENTATION = "kdlsq_eager"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "capture_attention_scores",
    "kdlsq_attention_forward",
    "register",
]

_CAPTURE: contextvars.ContextVar[tuple[list, Callable | None] | None] = contextvars.ContextVar(
    "kdlsq_attention_score_capture", default=None
)


@contextlib.contextmanager
def capture_attention_scores(consume: Callable[[int, torch.Tensor], Any] | None = None) -> Iterator[list]:
    """Collect the pre-softmax attention scores of every ``kdlsq_eager`` call made inside.

    Yields a list that receives one ``[B, H, T_q, T_k]`` tensor per attention call, in
    call order, or, with ``consume``, what ``consume(i, scores)`` returns for the ``i``-th call
    (0-based), the scores themselves not kept. Nested contexts shadow the outer one (the outer
    list gets nothing from calls made inside the inner block); on exit the previous state is restored.
    """
    store: list = []
    token = _CAPTURE.set((store, consume))
    try:
        yield store
    finally:
        _CAPTURE.reset(token)


def _maybe_quant(quantizers: nn.ModuleDict | None, name: str, x: torch.Tensor) -> torch.Tensor:
    if quantizers is not None and name in quantizers:
        return quantizers[name](x)
    return x


class _QuantizedProbsTimesValue(torch.autograd.Function):
    """``Q(dropout(softmax(scores))) @ value`` in one autograd node, with the LSQ quantizer ``Q``'s gradients.

    Forward as the composite path computes it (``softmax``; CPU dropout's own arithmetic, ``P * (b / (1 - p))`` with
    the Bernoulli draw ``b`` taken from torch's generator in the same order; LSQ's fused kernel; ``P @ V`` as
    ``torch.matmul`` lowers it, one ``bmm`` over ``B * H``). The backward recomputes the fake-quantized
    probabilities from ``P`` and the dropout mask (one pass) and applies the formulas of ``BmmBackward0``, the
    fused LSQ backward, dropout's ``MulBackward0`` and ``SoftmaxBackward0`` in their order: bit-identical
    (``tests/test_kernels.py``). Saved: ``P`` (float32), the keep mask (bool), the ``[B*H, T, d]`` value copy
    ``bmm`` keeps anyway, the step size.

    Inputs: ``scores`` ``[B, H, T, T]`` float32 contiguous CPU; ``value`` ``[B, H, T, d]``; ``s`` the step size
    (one element); then the quantizer's ``q_n``, ``q_p``, gradient scale, ``ste_clip``, range test, eps; ``p_drop``
    in ``[0, 1)``. Returns ``(out [B, H, T, d], fake-quantized probabilities [B, H, T, T], not differentiable)``.
    Source: Esser et al. 2020, Eq. (1)-(3) (LSQ); the KDLSQ attention of :func:`kdlsq_attention_forward`.
    """

    @staticmethod
    def forward(ctx, scores, value, s, q_n, q_p, grad_scale, ste_clip, range_test, eps, p_drop):  # type: ignore[override]
        from kdlsq_pl.kernels import cpu_kernels

        ops = cpu_kernels()
        probs = torch.softmax(scores, dim=-1)
        s_eff = s.clamp_min(eps)
        keep = None
        if p_drop > 0.0:
            draw = torch.empty_like(probs).bernoulli_(1.0 - p_drop)  # F.dropout's draw, from the same generator
            probs_hat, keep = ops.dropout_lsq_forward(probs, draw, 1.0 - p_drop, s_eff, q_n, q_p)
            del draw
        else:
            probs_hat = ops.lsq_forward(probs, s_eff, q_n, q_p)
        b, h, t, _ = probs.shape
        d = value.shape[-1]
        value3 = value.reshape(b * h, t, d)  # torch.matmul's own reshape (a copy of the transposed V)
        out = torch.bmm(probs_hat.view(b * h, t, t), value3).view(b, h, t, d)
        ctx.save_for_backward(probs, keep, value3, s_eff)
        ctx.q_n, ctx.q_p, ctx.grad_scale, ctx.ste_clip, ctx.range_test, ctx.p_drop = q_n, q_p, grad_scale, ste_clip, range_test, p_drop
        ctx.s_shape = s.shape
        ctx.mark_non_differentiable(probs_hat)
        return out, probs_hat

    @staticmethod
    def backward(ctx, grad_out, _grad_probs):  # type: ignore[override]
        from kdlsq_pl.kernels import cpu_kernels

        ops = cpu_kernels()
        probs, keep, value3, s_eff = ctx.saved_tensors
        q_n, q_p, rounded, need_s = ctx.q_n, ctx.q_p, ctx.range_test == "rounded", ctx.needs_input_grad[2]
        b, h, t, _ = probs.shape
        d = value3.shape[-1]
        if keep is None:
            probs_hat = ops.lsq_forward(probs, s_eff, q_n, q_p)
        else:
            probs_hat = ops.dropout_lsq_recompute(probs, keep, 1.0 - ctx.p_drop, s_eff, q_n, q_p)
        grad3 = grad_out.reshape(b * h, t, d)
        grad_value = None
        if ctx.needs_input_grad[1]:  # BmmBackward0: mat2 <- self^T @ grad
            grad_value = torch.bmm(probs_hat.view(b * h, t, t).transpose(1, 2), grad3).view(b, h, t, d)
        del probs_hat
        grad_hat = torch.bmm(grad3, value3.transpose(1, 2)).view(b, h, t, t)  # self <- grad @ mat2^T
        if keep is None:
            grad_probs, gs = ops.lsq_backward(grad_hat, probs, s_eff, q_n, q_p, rounded, ctx.grad_scale, ctx.ste_clip, need_s)
            if not ctx.ste_clip:
                grad_probs = grad_hat
        else:
            grad_probs, gs = ops.dropout_lsq_backward(grad_hat, probs, keep, 1.0 - ctx.p_drop, s_eff, q_n, q_p, rounded,
                                                      ctx.ste_clip, ctx.grad_scale, need_s)
        del grad_hat
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype) if ctx.needs_input_grad[0] else None
        grad_s = gs.sum_to_size(s_eff.shape).reshape(ctx.s_shape).to(s_eff.dtype) if need_s else None
        return grad_scores, grad_value, grad_s, None, None, None, None, None, None, None


def _fused_probs_quantizer(quantizers: nn.ModuleDict | None, scores: torch.Tensor, value: torch.Tensor, p_drop: float):
    """The probability quantizer when :class:`_QuantizedProbsTimesValue` computes exactly what the composite path
    would (an initialised per-tensor LSQ quantizer with the fused kernel, float32 CPU tensors, built kernels), else
    None."""
    q = quantizers["probs"] if quantizers is not None and "probs" in quantizers else None
    from kdlsq_pl.quant.lsq import LSQQuantizer

    if not (isinstance(q, LSQQuantizer) and q.fused_kernel and not q.per_channel and q.is_initialized):
        return None
    if not (scores.device.type == "cpu" and scores.dtype == torch.float32 and value.dtype == torch.float32
            and scores.dim() == 4 and scores.is_contiguous() and 0.0 <= p_drop < 1.0):
        return None
    from kdlsq_pl.kernels import cpu_kernels

    return q if cpu_kernels() is not None else None


def kdlsq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT eager attention with KDLSQ fake-quant hooks and score capture.

    Args:
        module: the calling attention module (``BertSelfAttention``); may carry
            ``kdlsq_act_quant: nn.ModuleDict`` with keys among query/key/value/probs.
        query, key, value: ``[B, H, T, d_head]``.
        attention_mask: additive float mask broadcastable to ``[B, H, T_q, T_k]`` or ``None``.
        dropout: attention-probability dropout (BERT passes 0.0 in eval mode).
        scaling: score scale; defaults to ``d_head ** -0.5``.

    Returns:
        ``(attn_output [B, T, H, d_head], attn_probs [B, H, T_q, T_k])`` -- the probs are
        the (possibly quantized) ones actually multiplied with V.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    quantizers = getattr(module, "kdlsq_act_quant", None)

    query = _maybe_quant(quantizers, "query", query)
    key = _maybe_quant(quantizers, "key", key)
    value = _maybe_quant(quantizers, "value", value)

    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask

    capture = _CAPTURE.get()
    if capture is not None:
        store, consume = capture
        store.append(scores if consume is None else consume(len(store), scores))

    p_drop = float(dropout) if module.training else 0.0
    integer_softmax = getattr(module, "kdlsq_integer_softmax", False)
    q = None if integer_softmax else _fused_probs_quantizer(quantizers, scores, value, p_drop)
    if q is not None:  # the same numbers with three [B, H, T, T] tensors less kept for the backward
        s = q._step_from_scale().reshape(q._broadcast_shape(scores))
        g = 1.0 / math.sqrt(max(scores.numel(), 1) * q.Q_P) if q.grad_scale else 1.0
        attn_output, probs = _QuantizedProbsTimesValue.apply(scores, value, s, q.Q_N, q.Q_P, g, q.ste_clip, q.range_test,
                                                             q.eps, p_drop)
        return attn_output.transpose(1, 2).contiguous(), probs

    if integer_softmax:  # quant.integer_ops: I-BERT's exp polynomial, as the integer engine
        from kdlsq_pl.integer.ops import ibert_softmax
        probs = ibert_softmax(scores, None if attention_mask is None else attention_mask == 0)
    else:
        probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    probs = _maybe_quant(quantizers, "probs", probs)

    attn_output = torch.matmul(probs, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, probs


def register() -> str:
    """Register ``kdlsq_eager`` (attention fn + eager mask builder); idempotent. Returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kdlsq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    return ATTN_IMPLEMENTATION


register()
