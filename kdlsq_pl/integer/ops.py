"""I-BERT's integer-only operators (Kim et al., ICML 2021, arXiv 2101.01321, sections 3.3-3.5; METHODS.md section 3).

Each operator is built once from the float scale of its input (and, where it has them, float parameters), which
it folds into integer constants; its ``__call__`` then runs on integer tensors only (``torch.int64`` in and out:
integer multiply, add, floor division, shifts, comparisons, sums; no floating-point operation). A value ``q`` of
scale ``S`` stands for the real number ``q * S``; every operator exposes ``scale_out``, the float scale of what
it returns, for the next build-time folding.

- :func:`dyadic` / :class:`Requantize`: ``round(q * S_in / S_out)`` as ``(q * m + 2^(e-1)) >> e`` (I-BERT's
  ``FixedPointMul``: the ratio written as an integer mantissa ``m < 2^31`` and a right shift ``e``).
- :func:`int_sqrt`: ``floor(sqrt(n))`` by Newton's iteration ``x <- floor((x + floor(n / x)) / 2)`` from
  ``2^ceil(bits(n) / 2)`` until it stops decreasing (the paper's algorithm; the reference code calls
  ``torch.sqrt`` instead, I-BERT issue #26).
- :class:`IntGELU`: ``GELU(x) ~ x/2 * (1 + L(x / sqrt 2))``, ``L(u) = sgn(u) * [a (min(|u|, -b) + b)^2 + 1]``,
  ``a = -0.2888``, ``b = -1.769`` (the paper's equation 9).
- :class:`IntSoftmax`: the row max subtracted, ``x = -z ln2 + p``, ``exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344``
  (equations 12-13), shifted right by ``z``; masked positions get exactly 0; normalised by integer division.
- :class:`IntLayerNorm`: integer mean and variance, :func:`int_sqrt` for the standard deviation, the affine
  ``gamma``/``beta`` folded into integers on the output scale.
"""

from __future__ import annotations

import math

import torch

#: The integer dtype every operator takes and returns.
INT = torch.int64
#: Mantissa bits of a dyadic multiplier (I-BERT: 31, so ``m < 2^31``).
MANTISSA_BITS = 31


def _check_int(q: torch.Tensor, what: str) -> None:
    if q.dtype != INT:
        raise TypeError(f"{what} takes {INT} tensors; got {q.dtype}")


def dyadic(ratio: float | torch.Tensor, bits: int = MANTISSA_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """``ratio ~ m / 2^e`` with an integer mantissa ``2^(bits-1) <= m < 2^bits`` (``frexp`` of the ratio).

    Args:
        ratio: a positive float or a float tensor of them (per channel).
        bits: mantissa bits (31: relative error below ``2^-31``).

    Returns:
        ``(m, e)`` as ``int64`` tensors of the ratio's shape; ``e`` may be negative for ratios ``>= 2^bits``.

    Raises:
        ValueError: a ratio that is not positive and finite.
    """
    r = torch.as_tensor(ratio, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()) or bool((r <= 0).any()):
        raise ValueError(f"a dyadic multiplier needs positive finite ratios; got min {float(r.min())}, max {float(r.max())}")
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, 0.5 <= mant < 1
    m = torch.round(mant * 2.0 ** bits).to(INT)
    e = (bits - exp).to(INT)
    carry = m == (1 << bits)  # mant rounded up to 1.0
    m = torch.where(carry, m >> 1, m)
    e = torch.where(carry, e - 1, e)
    return m, e


def shift_round(v: torch.Tensor, e: torch.Tensor | int) -> torch.Tensor:
    """``round(v / 2^e)`` (halves up) for integer ``v`` and shifts ``e`` (a left shift where ``e < 0``)."""
    e = torch.as_tensor(e, dtype=INT)
    right = torch.clamp(e, min=0)
    half = torch.where(right > 0, torch.ones_like(right) << torch.clamp(right - 1, min=0), torch.zeros_like(right))
    return torch.where(e > 0, (v + half) >> right, v << torch.clamp(-e, min=0))


class Requantize:
    """``clamp(round(q * S_in / S_out), lo, hi)`` in integers: ``(q * m + 2^(e-1)) >> e``.

    Args:
        scale_in: the input's scale: a float, or a tensor broadcast against the last dimension (per channel).
        scale_out: the output's scale (float).
        lo, hi: the output range (e.g. ``-127, 127`` for 8-bit codes); ``None``: no clamp.

        in_bits: the input's magnitude bound in bits (``|q| < 2^in_bits``); the mantissa gets
            ``min(31, 62 - in_bits)`` bits so that ``|q| * m < 2^62`` (a GELU output, ``2^38``, gets 24).
    """

    def __init__(self, scale_in, scale_out: float, lo: int | None = None, hi: int | None = None, in_bits: int = 31):
        bits = min(MANTISSA_BITS, 62 - int(in_bits))
        if bits < 8:
            raise ValueError(f"Requantize: in_bits={in_bits} leaves {bits} mantissa bits; allowed: in_bits <= 54")
        self.m, self.e = dyadic(torch.as_tensor(scale_in, dtype=torch.float64) / float(scale_out), bits)
        self.lo, self.hi = lo, hi
        self.scale_out = float(scale_out)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        _check_int(q, "Requantize")
        out = shift_round(q * self.m, self.e)
        if self.lo is not None or self.hi is not None:
            out = torch.clamp(out, min=self.lo, max=self.hi)
        return out


def bit_length(n: torch.Tensor) -> torch.Tensor:
    """The bit length of each non-negative ``int64`` (0 for 0): ``bit_length(5) == 3``. A binary search by shifts
    and comparisons (six halvings of the 64 bits, then the last bit), integer only."""
    out = torch.zeros_like(n)
    for k in (32, 16, 8, 4, 2, 1):
        big = (n >> k) > 0
        n = torch.where(big, n >> k, n)
        out += big.to(INT) * k
    return out + (n > 0).to(INT)


def int_sqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` elementwise for non-negative ``int64`` ``n`` below ``2^62``, by Newton's iteration.

    Starts from ``2^ceil(bits(n) / 2) >= sqrt(n)`` (``bits(n)``: the bit length, counted by comparisons) and
    applies ``x <- floor((x + floor(n / x)) / 2)`` while it decreases (I-BERT section 3.5; the iterates of
    integer Newton from above decrease monotonically to ``floor(sqrt(n))``).

    Raises:
        TypeError: not ``int64``.  ValueError: a negative value.
    """
    _check_int(n, "int_sqrt")
    if n.numel() and int(n.min()) < 0:
        raise ValueError(f"int_sqrt takes non-negative integers; got {int(n.min())}")
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    while True:
        y = (x + n // x.clamp(min=1)) >> 1
        smaller = y < x
        if not bool(smaller.any()):
            return torch.where(n == 0, torch.zeros_like(x), x)
        x = torch.where(smaller, y, x)


class IntGELU:
    """I-BERT's i-GELU on integers of scale ``scale_in`` (the paper's Algorithm 2).

    ``erf(u)`` for ``u = x / sqrt(2)`` is ``L(u) = sgn(u) [a (min(|u|, -b) + b)^2 + 1]`` with ``a = -0.2888``,
    ``b = -1.769``; in integers on the scale ``S' = S / sqrt 2``: ``b_int = floor(b / S')``,
    ``c_int = floor(1 / (a S'^2))``, ``y = sgn(q) ((min(|q|, -b_int) + b_int)^2 + c_int)`` of scale ``a S'^2``,
    shifted right so that about 15 bits remain (I-BERT shifts by a fixed 14 bits, right for its accumulator
    scales near 1e-5 but far too coarse above 1e-3: the shift is chosen from the scale here); then ``GELU = -q (y + floor(1 / S_y))`` of scale ``-S S_y / 2 > 0``.
    Largest error against the exact GELU on ``[-4, 4]``: about 0.02 (the polynomial's own).
    """

    A, B, ERF_BITS = -0.2888, -1.769, 15

    def __init__(self, scale_in: float):
        s = float(scale_in) / math.sqrt(2.0)
        self.b_int = math.floor(self.B / s)
        self.c_int = math.floor(1.0 / (self.A * s * s))
        self.shift = max(0, max(self.b_int ** 2, abs(self.c_int)).bit_length() - self.ERF_BITS)
        self.erf_scale = self.A * s * s * 2.0 ** self.shift  # negative (a < 0)
        self.one = math.floor(1.0 / self.erf_scale)
        self.scale_in = float(scale_in)
        self.scale_out = -float(scale_in) * self.erf_scale / 2.0  # the sign moved into the integers: a positive scale

    def out_bits(self, in_bits: int) -> int:
        """The output's magnitude bound in bits for inputs ``|q| < 2^in_bits`` (for the next :class:`Requantize`)."""
        y_bound = (max(self.b_int ** 2, abs(self.c_int)) >> self.shift) + abs(self.one) + 1
        return int(in_bits) + y_bound.bit_length()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        _check_int(q, "IntGELU")
        clipped = torch.clamp(q.abs(), max=-self.b_int)
        y = torch.sign(q) * ((clipped + self.b_int) ** 2 + self.c_int)
        y = y >> self.shift  # floor
        return -q * (y + self.one)


class IntSoftmax:
    """I-BERT's i-softmax over the last dimension of integers of scale ``scale_in`` (Algorithm 3).

    ``x - max(x) = -z ln2 + p`` with ``p`` in ``(-ln2, 0]`` (inputs clamped at ``-30 ln2``); ``exp(p)`` by the
    polynomial ``0.3585 (p + 1.353)^2 + 0.344`` (``b_int = floor(1.353 / S)``, ``c_int = floor(0.344 / (0.3585 S^2))``),
    widened by ``2^k`` (the most bits, up to 30, that keep a row's sum below ``2^62`` for rows up to ``max_len``
    and each value below ``2^(62 - out_bits)``), shifted right by ``z``. Masked positions (``mask`` false) get
    exactly 0. Output: ``e / sum(e)`` on the scale ``2^-out_bits``, normalised as I-BERT does with one integer
    division per row: ``e`` and the sum shifted right by ``d`` so the sum has 24 bits, then
    ``((e >> d) * floor(2^48 / (sum >> d))) >> (48 - out_bits)`` (below ``2^49``: no overflow; the floors cost at
    most about ``2^-23``, and a row sums to at most ``2^out_bits``; I-BERT's 32-bit numerator left 16 bits to each
    factor, which flipped measurably more 8-bit probability codes). A probability of exactly 1 is ``2^out_bits``
    (int64: no 8-bit wrap-around, I-BERT issue #4; the next requantization clamps to its grid).

    Args:
        scale_in: the scores' scale (e.g. ``s_q * s_k / sqrt(d_head)``).
        out_bits: output precision in bits (16).
        max_len: the longest row the widening must allow (512).
    """

    LN2, N_CLAMP, SUM_BITS, NUM_BITS = math.log(2.0), 30, 24, 48
    P_A, P_B, P_C = 0.3585, 1.353, 0.344

    def __init__(self, scale_in: float, out_bits: int = 16, max_len: int = 512):
        s = float(scale_in)
        self.x0 = math.floor(-self.LN2 / s)  # -ln2 on the input scale (negative)
        if self.x0 > -16:  # fewer than 16 levels per ln2: the polynomial's input is too coarse to mean anything
            raise ValueError(f"IntSoftmax: scale_in={s} is too coarse; allowed: at most ln2 / 16 ({self.LN2 / 16:.4f})")
        self.b_int = math.floor(self.P_B / s)
        self.c_int = math.floor(self.P_C / (self.P_A * s * s))
        y_max = (self.b_int) ** 2 + abs(self.c_int)  # the polynomial's largest value (p = 0)
        self.widen = max(0, min(30, 62 - y_max.bit_length() - max(1, max_len).bit_length(),
                                62 - y_max.bit_length() - int(out_bits)))
        self.out_bits = int(out_bits)
        self.scale_in = s
        self.scale_out = 2.0 ** -self.out_bits

    def __call__(self, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``q``: ``[..., T]`` int64 scores; ``mask``: bool broadcastable to ``q`` (true = attend). Returns ``[..., T]``."""
        _check_int(q, "IntSoftmax")
        if mask is not None:
            q = torch.where(mask, q, torch.full_like(q, torch.iinfo(INT).min // 4))
        x = q - q.max(dim=-1, keepdim=True).values
        x = torch.clamp(x, min=self.N_CLAMP * self.x0)
        z = x // self.x0  # >= 0
        p = x - z * self.x0  # in (x0, 0]
        e = ((p + self.b_int) ** 2 + self.c_int) << self.widen
        e = e >> z
        if mask is not None:
            e = torch.where(mask, e, torch.zeros_like(e))
        total = e.sum(dim=-1, keepdim=True).clamp(min=1)
        down = torch.clamp(bit_length(total) - self.SUM_BITS, min=0)  # the row sum brought to SUM_BITS bits
        factor = (1 << self.NUM_BITS) // (total >> down)  # I-BERT's integer normalisation: one division per row
        return ((e >> down) * factor) >> (self.NUM_BITS - self.out_bits)


class IntLayerNorm:
    """LayerNorm over the last dimension of integers of scale ``scale_in``, output on ``scale_out``.

    ``mean = round(sum(q) / n)``, ``y = q - mean``, ``var = floor(sum(y^2) / n)``, ``std = int_sqrt(var)``;
    ``y_hat = floor(y * 2^12 / std)`` (scale ``2^-12``); then ``gamma`` as integers of scale
    ``max|gamma| / 2^12`` and ``(y_hat * gamma_int)`` requantized onto ``scale_out`` by a dyadic multiplier, plus
    ``beta_int = round(beta / scale_out)``. Input magnitudes must stay below ``2^24`` (the residual stream's
    22-bit range in I-BERT) so that ``sum(y^2)`` fits ``int64`` for rows up to ``2^13`` channels; with 12 bits for
    ``y_hat`` and ``gamma`` their product (below ``2^29`` for rows up to 1024 channels) times the 31-bit mantissa
    stays below ``2^63``.

    Args:
        gamma, beta: float ``[C]`` LayerNorm weight and bias. ``eps`` is ignored: the variance of a row of
            integers of scale ``S`` is 0 or at least ``S^2``, far above BERT's ``1e-12``.
        scale_out: the output's scale.
    """

    NORM_BITS = 12

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor, scale_out: float):
        g = gamma.detach().to(torch.float64)
        self.gamma_scale = float(g.abs().max()) / 2 ** self.NORM_BITS
        self.gamma_int = torch.round(g / self.gamma_scale).to(INT)
        self.beta_int = torch.round(beta.detach().to(torch.float64) / scale_out).to(INT)
        self.requant = Requantize(2.0 ** -self.NORM_BITS * self.gamma_scale, scale_out)
        self.scale_out = float(scale_out)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        _check_int(q, "IntLayerNorm")
        n = q.shape[-1]
        total = q.sum(dim=-1, keepdim=True)
        mean = (2 * total + n) // (2 * n)  # round(total / n)
        y = q - mean
        var = (y * y).sum(dim=-1, keepdim=True) // n
        std = int_sqrt(var).clamp(min=1)
        y_hat = (y << self.NORM_BITS) // std
        return self.requant(y_hat * self.gamma_int) + self.beta_int


# --- The same approximations in float, for training through them (``quant.integer_ops``) --------------------------

def ibert_gelu(x: torch.Tensor) -> torch.Tensor:
    """I-BERT's GELU approximation in float (differentiable): ``x/2 (1 + L(x / sqrt 2))``, ``L`` of :class:`IntGELU`.

    What :class:`IntGELU` computes up to its integer floors; a student trained with it (``quant.integer_ops=true``)
    learns around the polynomial the integer engine runs. Any shape; gradients by autograd (``L`` is piecewise
    quadratic, with zero slope beyond ``|u| = -b``)."""
    u = x / math.sqrt(2.0)
    erf = torch.sign(u) * (IntGELU.A * (torch.clamp(u.abs(), max=-IntGELU.B) + IntGELU.B) ** 2 + 1.0)
    return x / 2.0 * (1.0 + erf)


def ibert_softmax(scores: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """I-BERT's softmax approximation in float over the last dimension (differentiable in ``scores``).

    ``x = scores - max`` clamped at ``-30 ln2``, ``z = floor(-x / ln2)`` (no gradient), ``p = x + z ln2``,
    ``exp(x) ~ (0.3585 (p + 1.353)^2 + 0.344) 2^-z``; positions with ``visible`` false get exactly 0.

    Args:
        scores: ``[..., T]`` float (the pre-softmax scores, an additive mask already added or not).
        visible: bool broadcastable to ``scores``, or ``None`` (all visible).
    """
    x = scores - scores.amax(dim=-1, keepdim=True)  # the polynomial is not exactly shift-invariant: the max has a gradient
    x = torch.clamp(x, min=IntSoftmax.N_CLAMP * -IntSoftmax.LN2)
    z = torch.floor(-x.detach() / IntSoftmax.LN2)
    p = x + z * IntSoftmax.LN2
    e = (IntSoftmax.P_A * (p + IntSoftmax.P_B) ** 2 + IntSoftmax.P_C) * torch.exp2(-z)
    if visible is not None:
        e = torch.where(visible, e, torch.zeros_like(e))
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


class IBertGELU(torch.nn.Module):
    """``nn.Module`` form of :func:`ibert_gelu`: replaces an encoder layer's GELU when ``quant.integer_ops=true``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ibert_gelu(x)
