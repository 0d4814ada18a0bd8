"""Learned Step size Quantization (LSQ) fake quantizer.

Sources
-------
* LSQ: S. K. Esser et al., "Learned Step Size Quantization", ICLR 2020,
  arXiv:1902.08153. Forward is Eq. (1)-(2), the step-size gradient Eq. (3),
  the gradient scale ``g`` Section 2.2.
* KDLSQ-BERT: J. Jin et al., arXiv:2101.05938, and its released code
  (``beyondliangcai/kdlsq``): restricted symmetric grid ``Q_N = Q_P = 2^(b-1)-1``,
  clip-value parametrisation ``alpha = s * Q_P``, weight STE that is not zeroed
  where clipped, percentile / entropy (KL) initialisation.

Fake quantization (all tensors real-valued, ``s > 0`` is the step size in the
units of ``v``)::

    v_hat = clamp(round(v / s), -Q_N, Q_P) * s

which equals ``round(clamp(v / s, -Q_N, Q_P)) * s`` because the bounds are
integers. ``round`` is ``torch.round``: round-half-to-even (``round(0.5) = 0``,
``round(1.5) = 2``), as in PyTorch's own fake-quantize kernels.

Backward (hand-written, :class:`_LSQFakeQuantFunction`)::

    d v_hat / d s = round(v/s) - v/s   inside the range
                  = -Q_N               below
                  =  Q_P               above
    d v_hat / d v = 1 inside, 0 outside (STE), or 1 everywhere if ste_clip=False

``d/ds`` is multiplied by the gradient scale ``g`` and summed over the elements
that share one step size (all elements per-tensor, one channel per-channel).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdlsq_pl import options
from kdlsq_pl.kernels import cpu_kernels, lsq_kernel_applies
from kdlsq_pl.options import allowed

__all__ = [
    "ALLOWED_GRIDS",
    "ALLOWED_INITS",
    "ALLOWED_KINDS",
    "ALLOWED_PARAMS",
    "ALLOWED_RANGE_TESTS",
    "DEFAULT_EPS",
    "LSQQuantizer",
    "fake_quantize",
    "kl_clip_value",
    "kl_clip_values",
    "quant_range",
]

# the allowed values are the config's (kdlsq_pl.options, checked by kdlsq_pl.schema): the CLI and the library agree
ALLOWED_GRIDS = allowed(options.Grid)
ALLOWED_PARAMS = allowed(options.Param)
ALLOWED_RANGE_TESTS = allowed(options.RangeTest)
ALLOWED_INITS = allowed(options.Init)
ALLOWED_KINDS = allowed(options.Kind)
MIN_BITS, MAX_BITS = options.MIN_BITS, options.MAX_BITS

#: Lower bound on the effective step size ``s`` (see :func:`fake_quantize`).
DEFAULT_EPS = 1e-8
#: Step size used when the calibration tensor is all zeros.
ZERO_INPUT_STEP = 1e-3
#: Number of histogram bins for the KL (entropy) calibration.
KL_BINS = 2048
#: torch.quantile refuses inputs with more elements than this.
_QUANTILE_MAX_NUMEL = 1 << 24


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def quant_range(bits: int, signed: bool = True, grid: str = "symmetric") -> tuple[int, int]:
    """Integer range ``(Q_N, Q_P)`` of a ``bits``-bit grid; levels are ``-Q_N .. Q_P``.

    Args:
        bits: bit-width, an int in 2..8.
        signed: signed grid (weights, pre-activation values) or unsigned (``Q_N = 0``).
        grid: ``"lsq"`` (LSQ paper, Sec. 2: signed ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1)-1``)
            or ``"symmetric"`` (released KDLSQ code: signed ``Q_N = Q_P = 2^(b-1)-1``,
            so 2 bits is ternary). Unsigned is ``Q_N = 0, Q_P = 2^b - 1`` for both grids.

    Returns:
        ``(Q_N, Q_P)`` as Python ints.

    Raises:
        ValueError: bits not an int in 2..8, or unknown grid.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is out of range; allowed: {MIN_BITS}..{MAX_BITS}")
    _check_choice("grid", grid, ALLOWED_GRIDS)
    if not signed:
        return 0, 2**bits - 1
    if grid == "lsq":
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1


class _LSQFakeQuantFunction(torch.autograd.Function):
    """LSQ fake quantization with the LSQ gradients (Esser et al. 2020, Eq. 1-3).

    Forward and backward live here and nowhere else. Call through :func:`fake_quantize`. ``fused`` picks the one-pass
    C++ kernel (:mod:`kdlsq_pl.kernels`); the torch formula below is the same arithmetic in the same order.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        v: Tensor,
        s: Tensor,
        q_n: int,
        q_p: int,
        grad_scale: float,
        ste_clip: bool,
        range_test: str,
        eps: float,
        fused: bool,
    ) -> Tensor:
        s_eff = s.clamp_min(eps)
        ctx.fused = fused = fused and lsq_kernel_applies(v, s_eff) and (ops := cpu_kernels()) is not None
        # What backward reads: v itself (weights are kept anyway; the fused kernel recomputes v / s for free, and
        # an activation v is often kept by its producer too, softmax's probabilities or the Q/K/V Linears' shared
        # input) or, for the torch formula on an activation, v / s, which saves a division pass.
        ctx.saved_ratio = not v.is_leaf and not fused
        if fused:
            out = ops.lsq_forward(v, s_eff, q_n, q_p)
            ctx.save_for_backward(v, s_eff)
        elif ctx.saved_ratio:
            ratio = torch.div(v, s_eff)
            out = torch.round(ratio).clamp_(-q_n, q_p).mul_(s_eff)  # round-half-to-even
            ctx.save_for_backward(ratio, s_eff)
        else:
            out = torch.div(v, s_eff).round_().clamp_(-q_n, q_p).mul_(s_eff)  # in place: no copy of the weight kept
            ctx.save_for_backward(v, s_eff)
        ctx.q_n, ctx.q_p = q_n, q_p
        ctx.grad_scale, ctx.ste_clip, ctx.range_test = grad_scale, ste_clip, range_test
        ctx.s_shape = s.shape
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # Elementwise passes over the tensor are the cost (they outnumber the matmuls' time on CPU): the torch
        # formula reads an activation's saved ratio rather than dividing again, and no temporary is allocated that
        # is not needed. The arithmetic (and the order of the sum) is the same either way: results are bit-identical.
        saved, s_eff = ctx.saved_tensors
        q_n, q_p = ctx.q_n, ctx.q_p
        need_v = ctx.needs_input_grad[0] and ctx.ste_clip
        need_s = ctx.needs_input_grad[1]
        if ctx.fused:
            grad_v, g = cpu_kernels().lsq_backward(grad_out, saved, s_eff, q_n, q_p,
                                                  ctx.range_test == "rounded", ctx.grad_scale, need_v, need_s)
        else:
            grad_v, g = _backward_torch(ctx, grad_out, saved, s_eff, need_v, need_s)
        if ctx.needs_input_grad[0] and not ctx.ste_clip:
            grad_v = grad_out
        grad_s = g.sum_to_size(s_eff.shape).reshape(ctx.s_shape).to(s_eff.dtype) if need_s else None
        return (grad_v if ctx.needs_input_grad[0] else None), grad_s, None, None, None, None, None, None, None


def _backward_torch(ctx, grad_out: Tensor, saved: Tensor, s_eff: Tensor, need_v: bool, need_s: bool):
    """(d/dv with the STE mask, elementwise d/ds times the gradient scale) by the unfused formula."""
    ratio = saved if ctx.saved_ratio else saved / s_eff
    q_n, q_p = ctx.q_n, ctx.q_p
    rounded = None
    if ctx.range_test == "unrounded":
        below = ratio <= -q_n
        above = ratio >= q_p
    else:  # "rounded", as PyTorch's _fake_quantize_learnable_per_tensor_affine
        rounded = torch.round(ratio)
        below = rounded < -q_n
        above = rounded > q_p
    grad_v = g = None
    if need_v:
        grad_v = torch.where(below | above, 0.0, grad_out)
    if need_s:
        ds = (torch.round(ratio) if rounded is None else rounded).sub_(ratio)  # inside: round(v/s) - v/s
        ds.masked_fill_(below, -float(q_n)).masked_fill_(above, float(q_p))
        g = ds.mul_(grad_out)
        if ctx.grad_scale != 1.0:
            g.mul_(ctx.grad_scale)
    return grad_v, g


def fake_quantize(
    x: Tensor,
    s: Tensor,
    q_n: int,
    q_p: int,
    grad_scale: float = 1.0,
    ste_clip: bool = True,
    range_test: str = "unrounded",
    eps: float = DEFAULT_EPS,
    fused: bool = True,
) -> Tensor:
    """LSQ fake quantization ``clamp(round(x/s), -q_n, q_p) * s`` with LSQ gradients.

    Source: Esser et al. 2020 (arXiv:1902.08153), Eq. (1)-(2) forward, Eq. (3) for
    ``d/ds``, STE for ``d/dx``; ``ste_clip=False`` is the released KDLSQ weight STE.

    Args:
        x: input, any shape ``[*]``, floating point.
        s: step size, shape ``[]`` or broadcastable to ``x`` (per-channel: e.g.
            ``[C, 1]`` for ``x`` of shape ``[C, K]``). Its gradient has ``s``'s shape
            (summed over the broadcast elements).
        q_n: number of negative levels (levels are ``-q_n .. q_p``), ``>= 0``.
        q_p: number of positive levels, ``>= 1``.
        grad_scale: multiplier ``g`` on ``d/ds`` (LSQ Sec. 2.2 uses
            ``1/sqrt(N * Q_P)``); 1.0 disables it.
        ste_clip: if True ``d/dx = 1`` inside the range and 0 outside; if False
            ``d/dx = 1`` everywhere (released KDLSQ weight STE).
        range_test: how inside/outside is decided for both gradients.
            ``"unrounded"`` (paper): inside iff ``-q_n < x/s < q_p``.
            ``"rounded"`` (PyTorch's fused ``_fake_quantize_learnable_per_tensor_affine``):
            inside iff ``-q_n <= round(x/s) <= q_p``. They differ only for ``x/s``
            within half a step of either edge: e.g. ``x/s = q_p + 0.3`` is outside
            (``d/ds = q_p``, ``d/dx = 0``) for "unrounded" but inside
            (``d/ds = q_p - (q_p + 0.3) = -0.3``, ``d/dx = 1``) for "rounded".
        eps: the effective step is ``max(s, eps)`` so a zero or negative ``s`` never
            yields NaN/Inf. The clamp is straight-through for the gradient: ``d/ds``
            is evaluated at ``max(s, eps)`` and passed to ``s`` unchanged, so a
            step driven below ``eps`` can still recover.
        fused: use the one-pass C++ kernel (:mod:`kdlsq_pl.kernels`) where it applies (float32 CPU,
            one step size or one per row of a 2-D ``x``); the result and both gradients are bit-identical to
            the torch formula, which is used otherwise.

    Returns:
        Tensor of ``x``'s shape and dtype.

    Raises:
        ValueError: unknown ``range_test`` or invalid ``q_n`` / ``q_p``.
    """
    _check_choice("range_test", range_test, ALLOWED_RANGE_TESTS)
    if q_n < 0 or q_p < 1:
        raise ValueError(f"q_n={q_n}, q_p={q_p} are invalid; need q_n >= 0 and q_p >= 1")
    if not torch.is_tensor(s):
        s = torch.tensor(float(s), dtype=x.dtype, device=x.device)
    return _LSQFakeQuantFunction.apply(
        x, s, int(q_n), int(q_p), float(grad_scale), bool(ste_clip), range_test, float(eps), bool(fused)
    )


def kl_clip_value(x: Tensor, q_p: int, bins: int = KL_BINS) -> float:
    """Clip value by entropy calibration in the style of the released KDLSQ code.

    TensorRT-style search (Migacz, "8-bit Inference with TensorRT", GTC 2017).
    Histogram ``h`` of ``x`` (pass ``|x|`` for signed grids) with ``bins`` bins over
    ``[0, max x]`` (bin ``floor(x / max x * bins)``, the maximum in the last bin);
    ``n = Q_P + 1`` levels. For each candidate threshold bin ``i`` in ``n .. bins``:

    * ``p = h[:i]`` with the mass beyond ``i`` added to ``p[i-1]`` (clipped outliers);
    * ``q``: ``h[:i]`` (without the outlier mass) merged into ``n`` groups of
      ``i // n`` consecutive bins (the last group also takes the remainder
      ``i - n * (i // n)``), each group's mass spread uniformly over the bins of
      the group where ``p`` is non-zero (0 elsewhere);
    * divergence: symmetric (Jeffreys) ``KL(p||q) + KL(q||p)
      = sum_j (p_j - q_j) * (log(p_j + e) - log(q_j + e))`` of the normalised
      distributions, ``e = 1e-10``.

    The chosen ``i`` minimises it (first one on ties). ``q`` is built from ``h[:i]``
    rather than from ``p``: with ``p`` the candidate ``i = n`` has one bin per group,
    so ``q == p``, the divergence is exactly 0 there, and the search would always
    return the smallest threshold.

    Note: the released KDLSQ code's ``kl_divergence_initilization`` differs in detail
    (``np.histogram(bins='sqrt')`` and a Jeffreys divergence of interpolated
    cumulative histograms); this is the project's specified variant.

    Args:
        x: non-negative values, any shape.
        q_p: positive levels of the grid (``Q_P``), >= 1.
        bins: number of histogram bins (default 2048).

    Returns:
        Clip value ``alpha = i * max(x) / bins`` in ``(0, max x]``; 0.0 if ``max x <= 0``
        or ``x`` is empty.
    """
    x = x.detach().reshape(1, -1)
    if x.numel() == 0:
        return 0.0
    return float(kl_clip_values(x, q_p, bins)[0])


def kl_clip_values(rows: Tensor, q_p: int, bins: int = KL_BINS) -> Tensor:
    """Row-wise :func:`kl_clip_value`: one clip value per row of ``rows``.

    All candidates (and a chunk of rows) are evaluated at once in
    ``O(rows * n_candidates * n)`` with prefix sums over the bins: the sum over the
    bins of one group, except the outlier bin ``i-1``, depends on the candidate
    only through the group's bin range.

    Args:
        rows: ``[R, K]`` non-negative values (one row per channel).
        q_p: positive levels of the grid (``Q_P``), >= 1.
        bins: number of histogram bins.

    Returns:
        ``[R]`` float64 clip values (0 for rows whose maximum is <= 0).
    """
    rows = rows.detach().to(torch.float64)
    n = q_p + 1
    mx = rows.amax(dim=1).clamp_min(0.0)
    if n >= bins:
        return mx
    cand = torch.arange(n, bins + 1, device=rows.device)  # [M]
    chunk = max(1, 4_000_000 // (cand.numel() * n))
    out = [
        _kl_chunk(rows[i : i + chunk], mx[i : i + chunk], cand, n, bins)
        for i in range(0, rows.shape[0], chunk)
    ]
    return torch.cat(out)


def _kl_chunk(rows: Tensor, mx: Tensor, cand: Tensor, n: int, bins: int) -> Tensor:
    r = rows.shape[0]
    valid = mx > 0
    safe = torch.where(valid, mx, torch.ones_like(mx))
    idx = (rows.clamp_min(0.0) / safe[:, None] * bins).floor().clamp(0, bins - 1).long()
    hist = torch.zeros(r, bins, dtype=torch.float64, device=rows.device)
    hist.scatter_add_(1, idx, torch.ones_like(rows))
    total = hist.sum(1, keepdim=True)  # [R, 1]
    e = 1e-10
    a = hist / total  # normalised p for every bin except the outlier bin
    nz = (hist > 0).to(torch.float64)
    log_a = torch.log(a + e) * nz  # log(p + e) on non-zero bins only

    def prefix(t: Tensor) -> Tensor:
        return torch.cat([t.new_zeros(r, 1), torch.cumsum(t, 1)], dim=1)  # [R, B+1]

    c_h, c_a, c_nz, c_log = prefix(hist), prefix(a), prefix(nz), prefix(log_a)
    c_f = prefix(a * torch.log(a + e))

    m_c = cand.numel()
    per = (cand // n)[:, None]  # bins per group, >= 1
    g = torch.arange(n, device=rows.device)[None, :]  # [1, n]
    start = g * per  # [M, n]
    end = torch.where(g == n - 1, cand[:, None], start + per)  # group bin ranges [start, end)
    reg_end = torch.where(g == n - 1, cand[:, None] - 1, end)  # without the outlier bin i-1

    def seg(c: Tensor, lo: Tensor, hi: Tensor) -> Tensor:  # [R, M, n] sums over [lo, hi)
        return (c[:, hi.reshape(-1)] - c[:, lo.reshape(-1)]).view(r, m_c, n)

    p_last = (hist[:, cand - 1] + (total - c_h[:, cand])) / total  # [R, M], outliers folded in
    last_nz = (p_last > 0).to(torch.float64)
    k = seg(c_nz, start, reg_end)  # non-zero p bins per group, outlier bin excluded
    count = k.clone()
    count[..., -1] += last_nz
    zq = c_h[:, cand][..., None]  # [R, M, 1]: mass of h[:i]
    mass = seg(c_h, start, end) / zq.clamp_min(1.0)  # normalised q mass per group
    cq = torch.where(count > 0, mass / count.clamp_min(1.0), torch.zeros((), dtype=mass.dtype))
    log_cq = torch.log(cq + e)
    # sum over the non-zero bins j of a group (outlier bin excluded) of
    # (a_j - c)(log(a_j + e) - log(c + e)) = F - log_c * A - c * L + k * c * log_c
    div = (
        seg(c_f, start, reg_end)
        - log_cq * seg(c_a, start, reg_end)
        - cq * seg(c_log, start, reg_end)
        + k * cq * log_cq
    ).sum(2)
    c_last = cq[..., -1]
    div = div + last_nz * (p_last - c_last) * (torch.log(p_last + e) - torch.log(c_last + e))
    best = cand[torch.argmin(div, dim=1)].to(torch.float64)  # [R]
    return torch.where(valid, best * mx / bins, torch.zeros_like(mx))


def _quantile(rows: Tensor, q: float) -> Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation) by two ``kthvalue`` selections; ``[R]``."""
    n = rows.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    a = rows.kthvalue(lo + 1, dim=1).values
    if frac == 0.0 or lo + 1 >= n:
        return a
    b = rows.kthvalue(lo + 2, dim=1).values
    return a + (b - a) * frac


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer with one learnable step (or clip) parameter.

    Sources: Esser et al. 2020 (arXiv:1902.08153) for the quantizer and its
    gradients; Jin et al. 2021 (arXiv:2101.05938) and the released KDLSQ code for
    the symmetric grid, the clip parametrisation and the initialisation rules.

    Args:
        bits: bit-width, int in 2..8.
        signed: signed grid, or unsigned (``Q_N = 0``).
        grid: ``"symmetric"`` (``Q_N = Q_P = 2^(b-1)-1``; 2 bits = ternary
            ``{-s, 0, s}``) or ``"lsq"`` (``Q_N = 2^(b-1)``). See :func:`quant_range`.
        param: ``"clip"``: ``scale`` holds the clip value ``alpha`` and
            ``s = alpha / Q_P`` (so ``d/dalpha = (d/ds) / Q_P``); ``"step"``:
            ``scale`` holds ``s``.
        per_channel: one step per slice along ``channel_dim`` (``scale`` has shape
            ``[num_channels]``); otherwise ``scale`` has shape ``[]``.
        channel_dim: dimension of the input that indexes channels.
        grad_scale: multiply ``d/ds`` by ``g = 1/sqrt(N * Q_P)`` (LSQ Sec. 2.2) where
            ``N`` is the number of elements sharing one step: ``x.numel()`` per-tensor
            (for activations this includes the batch and sequence dimensions of the
            current call, not only the feature count), ``x.numel() / C`` per-channel.
        ste_clip: see :func:`fake_quantize`; False = released KDLSQ weight STE.
        range_test: ``"unrounded"`` or ``"rounded"``, see :func:`fake_quantize`.
        init: rule used by :meth:`initialize`: ``"lsq"``, ``"percentile"``, ``"kl"``,
            ``"minmax"``.
        percentile: upper percentile ``p`` in (50, 100] for ``init="percentile"``.
        kind: ``"weight"`` or ``"activation"``. It decides how the quantizer is treated: the
            optimizer group of its step size (``optim.weight_step_lr`` or ``optim.act_step_lr``) and
            whether calibration re-initialises it from activation batches (``calibrate``).
        num_channels: number of channels; required when ``per_channel=True``.
        eps: lower bound on the effective step size.
        fused_kernel: use the fused C++ kernel on CPU (bit-identical, faster); see :func:`fake_quantize`.

    State:
        ``bits``, ``signed``, ``Q_N``, ``Q_P`` (Python ints/bools); parameter ``scale``
        (shape ``[]`` or ``[num_channels]``; holds ``s`` for param="step", ``alpha``
        for param="clip"); persistent 0-dim bool buffer ``initialized``. Both are in
        ``state_dict``, so a freshly built quantizer with the same arguments that
        loads it is initialised and does not re-initialise from data. A Python-side
        copy of ``initialized`` avoids a device sync per forward; it is refreshed by
        :meth:`initialize` and ``load_state_dict``, and read from the buffer while
        False (so setting the buffer to True by hand works, setting it back to
        False by hand does not: load a state dict instead).

    Shapes:
        forward input ``x``: any shape (``x.shape[channel_dim] == num_channels``
        per-channel); output: same shape and dtype.

    Raises:
        ValueError: any argument outside its allowed set (message names the value
            and the allowed set), or ``per_channel`` without ``num_channels``.
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        grid: str = "symmetric",
        param: str = "clip",
        per_channel: bool = False,
        channel_dim: int = 0,
        grad_scale: bool = False,
        ste_clip: bool = True,
        range_test: str = "unrounded",
        init: str = "lsq",
        percentile: float = 97.5,
        kind: str = "weight",
        num_channels: int | None = None,
        eps: float = DEFAULT_EPS,
        fused_kernel: bool = True,
    ) -> None:
        super().__init__()
        q_n, q_p = quant_range(bits, signed, grid)
        _check_choice("param", param, ALLOWED_PARAMS)
        _check_choice("range_test", range_test, ALLOWED_RANGE_TESTS)
        _check_choice("init", init, ALLOWED_INITS)
        _check_choice("kind", kind, ALLOWED_KINDS)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile={percentile!r} is out of range; allowed: (50, 100]")
        if not eps > 0.0:
            raise ValueError(f"eps={eps!r} is out of range; allowed: > 0")
        if per_channel:
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ValueError(
                    f"num_channels={num_channels!r} is invalid; per_channel=True needs an int >= 1"
                )
        self.bits = int(bits)
        self.signed = bool(signed)
        self.grid = grid
        self.param = param
        self.Q_N = q_n
        self.Q_P = q_p
        self.per_channel = bool(per_channel)
        self.channel_dim = int(channel_dim)
        self.num_channels = num_channels if per_channel else None
        self.grad_scale = bool(grad_scale)
        self.ste_clip = bool(ste_clip)
        self.range_test = range_test
        self.init = init
        self.percentile = float(percentile)
        self.kind = kind
        self.eps = float(eps)
        self.fused_kernel = bool(fused_kernel)
        shape = (num_channels,) if per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape))
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        # Python-side mirror of `initialized` so forward does not sync with the device
        # on every call; None = unknown (read the buffer once).
        self._init_cache: bool | None = False

    # ------------------------------------------------------------------ helpers
    @property
    def is_initialized(self) -> bool:
        """Whether :meth:`initialize` has run (or an initialised state was loaded)."""
        if not self._init_cache:
            self._init_cache = bool(self.initialized)
        return self._init_cache

    def reset(self) -> None:
        """Mark the quantizer uninitialised: the next forward re-initialises ``scale`` from its input."""
        self.initialized.fill_(False)
        self._init_cache = False

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - nn.Module hook
        super()._load_from_state_dict(*args, **kwargs)
        self._init_cache = None  # re-read the loaded buffer on next use

    def _step_from_scale(self) -> Tensor:
        """Differentiable step size ``s`` of ``scale``'s shape (before the eps clamp)."""
        return self.scale if self.param == "step" else self.scale / self.Q_P

    @property
    def step_size(self) -> Tensor:
        """Effective step size ``s = max(scale or scale/Q_P, eps)``, detached; shape ``[]`` or ``[C]``."""
        return self._step_from_scale().detach().clamp_min(self.eps)

    def _broadcast_shape(self, x: Tensor) -> tuple[int, ...]:
        if not self.per_channel:
            return ()
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.num_channels:
            raise ValueError(
                f"input has {x.shape[dim]} channels along dim {self.channel_dim}; "
                f"quantizer was built for num_channels={self.num_channels}"
            )
        shape = [1] * x.dim()
        shape[dim] = self.num_channels
        return tuple(shape)

    def _per_row(self, x: Tensor) -> Tensor:
        """``x`` as ``[rows, K]``: one row per step size (1 row per-tensor)."""
        if not self.per_channel:
            return x.reshape(1, -1)
        self._broadcast_shape(x)
        return x.movedim(self.channel_dim % x.dim(), 0).reshape(self.num_channels, -1)

    # --------------------------------------------------------------- initialise
    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``scale`` from ``x`` by the rule ``self.init`` and mark the quantizer initialised.

        Rules (per row = the whole tensor, or one channel when per-channel):

        * ``lsq`` (LSQ paper, Sec. 2.1): ``s = 2 * mean|x| / sqrt(Q_P)``.
        * ``minmax``: ``alpha = max|x|`` (signed) or ``max(x)`` (unsigned).
        * ``percentile`` (released KDLSQ code, ``reset_wgt_alpha``): signed
          ``alpha = max(|q_(100-p)|, |q_p|)``; unsigned ``alpha = q_p``, where ``q_p``
          is the ``torch.quantile`` (linear interpolation) at ``p/100``. Inputs above
          2^24 elements are subsampled with a fixed stride first.
        * ``kl``: :func:`kl_clip_value` of ``|x|`` (signed) or ``max(x, 0)`` (unsigned);
          entropy calibration in the style of the released KDLSQ code. Per-channel
          searches all channels at once (:func:`kl_clip_values`).

        Clip rules give ``s = alpha / Q_P``. A row whose statistic is 0 (all-zero
        input) gets ``s = 1e-3``. ``scale`` receives ``s`` (param="step") or
        ``s * Q_P`` (param="clip").

        Args:
            x: calibration tensor (weight, or an activation batch), any shape;
                ``x.shape[channel_dim] == num_channels`` when per-channel.

        Raises:
            ValueError: channel count mismatch (per-channel).
        """
        rows = self._per_row(x.detach()).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        q_p = self.Q_P
        if self.init == "lsq":
            s = 2.0 * rows.abs().mean(dim=1) / math.sqrt(q_p)
        elif self.init == "minmax":
            alpha = rows.abs().amax(dim=1) if self.signed else rows.amax(dim=1).clamp_min(0.0)
            s = alpha / q_p
        elif self.init == "percentile":
            s = self._percentile_alpha(rows) / q_p
        else:  # kl
            vals = rows.abs() if self.signed else rows.clamp_min(0.0)
            s = kl_clip_values(vals, q_p).to(rows.dtype) / q_p
        s = torch.where(s > 0, s, torch.full_like(s, ZERO_INPUT_STEP))
        value = s if self.param == "step" else s * q_p
        self.scale.data.copy_(value.reshape(self.scale.shape).to(self.scale))
        self.initialized.fill_(True)
        self._init_cache = True

    def _percentile_alpha(self, rows: Tensor) -> Tensor:
        """Percentile clip value per row of ``rows`` ``[R, K]``; returns ``[R]``.

        Equals ``torch.quantile`` (linear interpolation) but selects with ``torch.kthvalue``
        instead of sorting, which is ~50x faster on activation-sized tensors.
        """
        r, k = rows.shape
        stride = max(1, math.ceil(r * k / _QUANTILE_MAX_NUMEL))
        sub = rows[:, ::stride]
        hi = _quantile(sub, self.percentile / 100.0)
        if not self.signed:
            return hi.clamp_min(0.0)
        lo = _quantile(sub, 1.0 - self.percentile / 100.0)
        return torch.maximum(lo.abs(), hi.abs())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, numel: int | None = None) -> Tensor:
        """Fake-quantize ``x`` (any shape) -> same shape and dtype.

        Initialises ``scale`` from ``x`` (under no_grad) on the first call if no
        initialised state exists. ``numel`` overrides the element count N of the gradient
        scale ``g = 1/sqrt(N * Q_P)`` (used when ``x`` holds only the looked-up rows of an
        embedding table whose full size is N).
        """
        if not self.is_initialized:
            self.initialize(x)
        s = self._step_from_scale().reshape(self._broadcast_shape(x))
        g = 1.0
        if self.grad_scale:
            n = (numel or x.numel()) // (self.num_channels if self.per_channel else 1)
            g = 1.0 / math.sqrt(max(n, 1) * self.Q_P)
        return fake_quantize(x, s, self.Q_N, self.Q_P, g, self.ste_clip, self.range_test, self.eps, self.fused_kernel)

    def freeze(self) -> None:
        """Stop learning the step/clip parameter (``scale.requires_grad = False``)."""
        self.scale.requires_grad_(False)

    def unfreeze(self) -> None:
        """Resume learning the step/clip parameter (``scale.requires_grad = True``)."""
        self.scale.requires_grad_(True)

    def extra_repr(self) -> str:
        """One-line summary: bits, signed, grid, param, Q_N, Q_P and the other options."""
        s = (
            f"bits={self.bits}, signed={self.signed}, grid={self.grid}, param={self.param}, "
            f"Q_N={self.Q_N}, Q_P={self.Q_P}, kind={self.kind}, init={self.init}"
        )
        if self.per_channel:
            s += f", per_channel=True, channel_dim={self.channel_dim}, num_channels={self.num_channels}"
        return s
