"""The baselines' fake quantizers: TWN ternary weights, dynamic-max and EMA-max linear quantizers.

Each is a small ``nn.Module`` with the attributes the insertion code reads (``bits``, ``kind``,
``rowwise``); :func:`kdlsq_pl.quant.modules.make_quantizer` picks one by the ``quantizer`` option of
``quant.weight`` / ``quant.act``, so a baseline is a config (``conf/method/*.yaml``) plus one of these.

Sources (METHODS.md section 2):

* TernaryBERT: Zhang et al., arXiv 2009.12812, and its released code
  (``huawei-noah/Pretrained-Language-Model/TernaryBERT``, ``TwnQuantizer`` and ``SymQuantizer``).
* Q8BERT: Zafrir et al., arXiv 1910.06188, and ``IntelLabs/nlp-architect``
  (``FakeLinearQuantizationWithSTE``, the EMA threshold of ``QuantizedLayer``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TWN_THRESHOLD", "DynamicMaxQuantizer", "EMAMaxQuantizer", "TWNQuantizer", "ternarize"]

#: TWN threshold factor: ``delta = 0.7 * mean|W|`` (Li & Liu 2016; TernaryBERT Eq. 4).
TWN_THRESHOLD = 0.7


def _ste(x: Tensor, x_hat: Tensor) -> Tensor:
    """``x_hat`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return x + (x_hat - x).detach()


def ternarize(w: Tensor, per_row: bool = False, factor: float = TWN_THRESHOLD) -> tuple[Tensor, Tensor, Tensor]:
    """Ternary Weight Network approximation ``W_hat = alpha * sign(W) * [|W| > delta]``.

    ``delta = factor * mean|W|`` and ``alpha = mean(|W| where |W| > delta)``, over the whole
    tensor, or over each row (the last dimension) if ``per_row`` (TernaryBERT: rows of the word embedding).

    Args:
        w: weight ``[R, K]``, or looked-up embedding rows ``[B, T, K]`` when ``per_row``.
    Returns:
        ``(w_hat, delta, alpha)``: ``w_hat`` shaped like ``w``; ``delta`` and ``alpha`` ``[]``, or
        ``[..., 1]`` per row. A row with no entry above ``delta`` (all zeros) gets ``alpha = 0``.
    """
    a = w.detach().abs()
    if per_row:
        delta = factor * a.mean(dim=-1, keepdim=True)
        mask = a > delta
        alpha = (a * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp_min(1)
    else:
        delta = factor * a.mean()
        mask = a > delta
        alpha = (a * mask).sum() / mask.sum().clamp_min(1)
    return alpha * torch.sign(w.detach()) * mask, delta, alpha


class TWNQuantizer(nn.Module):
    """TernaryBERT's 2-bit weight quantizer: TWN ternarization with a straight-through gradient.

    Args:
        per_row: one ``(delta, alpha)`` per row (the word embedding) instead of per tensor.
    Shapes: ``w`` ``[R, K]`` -> same. Gradient: identity (the released ``TwnQuantizer.backward``).
    """

    bits = 2
    kind = "weight"

    def __init__(self, per_row: bool = False):
        super().__init__()
        self.per_row = bool(per_row)
        self.rowwise = self.per_row  # rows are quantized independently: embeddings may quantize looked-up rows only

    def forward(self, w: Tensor, numel: int | None = None) -> Tensor:
        return _ste(w, ternarize(w, self.per_row)[0])

    def extra_repr(self) -> str:
        return f"bits=2, per_row={self.per_row}"


class _ClipZeroGrad(torch.autograd.Function):
    """``clamp(x, -c, c)`` whose gradient is 1 strictly inside ``(-c, c)`` and 0 at and beyond the bounds
    (TernaryBERT's ``SymQuantizer.backward`` zeroes ``x >= c`` and ``x <= -c``)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: float) -> Tensor:  # type: ignore[override]
        inside = (x > -c) & (x < c)
        ctx.save_for_backward(inside)
        return x.clamp(-c, c)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class DynamicMaxQuantizer(nn.Module):
    """Symmetric linear quantizer whose range is the current tensor's max, recomputed every call.

    ``x_c = clamp(x, -clip, clip)`` (gradient 0 outside, if ``clip`` is set), ``s = max|x_c| / Q_P``
    with ``Q_P = 2^(b-1) - 1`` (127 levels each side at 8 bits), ``x_hat = round(x_c / s) * s``;
    the rounding has a straight-through gradient and ``s`` is treated as a constant.
    TernaryBERT: activations and 8-bit weights with ``clip = 2.5``; Q8BERT: weights with no clip.

    Args:
        bits: 2..8. clip: positive clip value, or ``None`` for none. kind: ``"weight"`` or ``"activation"``.
    Raises:
        ValueError: bits outside 2..8 or a non-positive clip.
    """

    rowwise = False

    def __init__(self, bits: int, clip: float | None = None, kind: str = "activation"):
        super().__init__()
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"bits={bits!r} is out of range; allowed: 2..8")
        if clip is not None and not float(clip) > 0:
            raise ValueError(f"clip={clip!r} is out of range; allowed: > 0 or None")
        self.bits, self.kind = int(bits), kind
        self.clip = None if clip is None else float(clip)
        self.Q_P = 2 ** (self.bits - 1) - 1

    def forward(self, x: Tensor, numel: int | None = None) -> Tensor:
        xc = x if self.clip is None else _ClipZeroGrad.apply(x, self.clip)
        s = (xc.detach().abs().amax() / self.Q_P).clamp_min(1e-8)
        return _ste(xc, torch.round(xc.detach() / s) * s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, clip={self.clip}, kind={self.kind}"


class EMAMaxQuantizer(nn.Module):
    """Q8BERT's activation quantizer: symmetric linear, range = an exponential moving average of max|x|.

    In training each call first updates ``ema = max|x|`` (first call) or
    ``ema <- ema - (1 - decay) * (ema - max|x|)``, then quantizes with ``s = ema / Q_P``:
    ``x_hat = clamp(round(x / s), -Q_P, Q_P) * s``. In eval the EMA is frozen (before any training
    call, eval uses the batch's own max and leaves the state alone). The gradient is the
    plain straight-through estimator (identity everywhere, as ``FakeLinearQuantizationWithSTE``).

    Args:
        bits: 2..8. decay: EMA decay in [0, 1) (nlp-architect: 0.9999).
    State: buffers ``ema`` ``[]`` and ``initialized`` (both in the state dict).
    Raises:
        ValueError: bits outside 2..8 or decay outside [0, 1).
    """

    rowwise = False
    kind = "activation"

    def __init__(self, bits: int = 8, decay: float = 0.9999):
        super().__init__()
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"bits={bits!r} is out of range; allowed: 2..8")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay={decay!r} is out of range; allowed: [0, 1)")
        self.bits, self.decay = int(bits), float(decay)
        self.Q_P = 2 ** (self.bits - 1) - 1
        self.register_buffer("ema", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """One EMA step from ``x`` (any shape)."""
        m = x.detach().abs().amax().to(self.ema)
        if not bool(self.initialized):
            self.ema.copy_(m)
            self.initialized.fill_(True)
        else:
            self.ema.sub_((1.0 - self.decay) * (self.ema - m))

    def forward(self, x: Tensor, numel: int | None = None) -> Tensor:
        if self.training:
            self.update(x)
        # eval before any training step (e.g. Lightning's sanity check): this batch's max, state untouched
        rng = self.ema if bool(self.initialized) else x.detach().abs().amax()
        s = (rng / self.Q_P).clamp_min(1e-8)
        return _ste(x, torch.clamp(torch.round(x.detach() / s), -self.Q_P, self.Q_P) * s)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, decay={self.decay}"
