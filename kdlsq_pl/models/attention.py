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

Score capture
-------------
Inside ``with capture_attention_scores() as scores:`` every call appends the pre-softmax
scores ``Q K^T * scaling + mask`` (``[B, H, T, T]``, the exact tensor the softmax sees,
not detached) to ``scores`` in call order (= layer order for an encoder). Captures use a
``ContextVar``, so only the innermost active context receives scores and sequential
teacher / student contexts never mix.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

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

_CAPTURE: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "kdlsq_attention_score_capture", default=None
)


@contextlib.contextmanager
def capture_attention_scores() -> Iterator[list[torch.Tensor]]:
    """Collect the pre-softmax attention scores of every ``kdlsq_eager`` call made inside.

    Yields a list that receives one ``[B, H, T_q, T_k]`` tensor per attention call, in
    call order. Nested contexts shadow the outer one (the outer list gets nothing from
    calls made inside the inner block); on exit the previous state is restored.
    """
    store: list[torch.Tensor] = []
    token = _CAPTURE.set(store)
    try:
        yield store
    finally:
        _CAPTURE.reset(token)


def _maybe_quant(quantizers: nn.ModuleDict | None, name: str, x: torch.Tensor) -> torch.Tensor:
    if quantizers is not None and name in quantizers:
        return quantizers[name](x)
    return x


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

    store = _CAPTURE.get()
    if store is not None:
        store.append(scores)

    if getattr(module, "kdlsq_integer_softmax", False):  # quant.integer_ops: I-BERT's exp polynomial, as the integer engine
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
