"""Tests for kdlsq_pl.quant.lsq (LSQ fake quantizer, Esser et al. 2020; KDLSQ-BERT).

Expected values are computed independently here (closed forms, hand formulas,
finite differences, a loop-based numpy reference for the KL search).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlsq_pl.quant.lsq import LSQQuantizer, fake_quantize, kl_clip_value, kl_clip_values

BITS = list(range(2, 9))


#: (Q_N, Q_P) written out for bits 2..8: the released KDLSQ symmetric grid (2 bits = ternary), the LSQ paper's
#: signed grid (one more negative level), and the unsigned grid (both grids).
RANGES = {
    ("symmetric", True): [(1, 1), (3, 3), (7, 7), (15, 15), (31, 31), (63, 63), (127, 127)],
    ("lsq", True): [(2, 1), (4, 3), (8, 7), (16, 15), (32, 31), (64, 63), (128, 127)],
    ("symmetric", False): [(0, 3), (0, 7), (0, 15), (0, 31), (0, 63), (0, 127), (0, 255)],
    ("lsq", False): [(0, 3), (0, 7), (0, 15), (0, 31), (0, 63), (0, 127), (0, 255)],
}


def expected_range(bits: int, signed: bool, grid: str) -> tuple[int, int]:
    return RANGES[grid, signed][bits - 2]


def set_step(q: LSQQuantizer, s) -> None:
    """Put the step size ``s`` (scalar or [C]) into q.scale and mark q initialised."""
    s = torch.as_tensor(s, dtype=q.scale.dtype)
    with torch.no_grad():
        q.scale.copy_(s if q.param == "step" else s * q.Q_P)
        q.initialized.fill_(True)


# --------------------------------------------------------------------- forward
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("grid", ["symmetric", "lsq"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_closed_form(bits, signed, grid, per_channel):
    gen = torch.Generator().manual_seed(bits * 7 + signed * 3 + per_channel)
    q_n, q_p = expected_range(bits, signed, grid)
    c = 5
    q = LSQQuantizer(bits, signed=signed, grid=grid, param="step", per_channel=per_channel,
                     num_channels=c if per_channel else None)
    assert (q.Q_N, q.Q_P, q.bits, q.signed) == (q_n, q_p, bits, signed)
    s = torch.rand(c, generator=gen) * 0.5 + 0.05 if per_channel else torch.tensor(0.137)
    set_step(q, s)
    # spans well beyond the clipping range on both sides
    x = (torch.rand(c, 300, generator=gen) * 2 - 1) * 1.5 * (q_p + q_n + 1) * s.max()
    sb = s[:, None] if per_channel else s
    want = torch.clamp(torch.round(x / sb), -q_n, q_p) * sb
    got = q(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # outputs lie on the grid and use both clip ends
    lv = got / sb
    torch.testing.assert_close(lv, torch.round(lv), rtol=0, atol=1e-4)
    assert lv.min().round() == -q_n and lv.max().round() == q_p


def test_round_half_to_even():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    out = fake_quantize(x, s, 7, 7)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


def test_two_bit_levels():
    x = torch.linspace(-5, 5, 1001)
    q = LSQQuantizer(2, grid="symmetric", param="step")
    set_step(q, 0.5)
    assert sorted(set(q(x).tolist())) == [-0.5, 0.0, 0.5]  # ternary
    q = LSQQuantizer(2, grid="lsq", param="step")
    set_step(q, 0.5)
    assert sorted(set(q(x).tolist())) == [-1.0, -0.5, 0.0, 0.5]
    q = LSQQuantizer(8, grid="symmetric", param="step")
    set_step(q, 0.01)
    assert len(set(q(torch.linspace(-5, 5, 5001)).tolist())) == 255


# ------------------------------------------------------------ gradient formulas
def edge_values(q_n: int, q_p: int, s: float) -> torch.Tensor:
    """Values whose ratio v/s is near/inside/outside both edges (no exact .5 ties)."""
    r = [q_p + 0.3, q_p + 0.45, q_p - 0.3, q_p + 0.7, q_p + 3.2, 0.2, -0.3, 1.4, -1.6,
         -q_n - 0.3, -q_n - 0.45, -q_n + 0.3, -q_n - 0.7, -q_n - 4.1, q_p - 0.8]
    return torch.tensor(r, dtype=torch.float64) * s


def lsq_grads(v, s, q_n, q_p, w, g, range_test, ste_clip):
    """Hand LSQ gradients (Esser et al. Eq. 3 + STE) for loss sum(w * v_hat)."""
    r = v / s
    rr = torch.round(r)
    if range_test == "unrounded":
        below, above = r <= -q_n, r >= q_p
    else:
        below, above = rr < -q_n, rr > q_p
    inside = ~(below | above)
    ds = torch.where(inside, rr - r, torch.where(below, -float(q_n), float(q_p)))
    dv = w if not ste_clip else w * inside
    return (w * ds).sum() * g, dv


@pytest.mark.parametrize("param", ["step", "clip"])
@pytest.mark.parametrize("grad_scale", [False, True])
@pytest.mark.parametrize("range_test", ["unrounded", "rounded"])
@pytest.mark.parametrize("ste_clip", [True, False])
@pytest.mark.parametrize("bits,signed,grid", [(2, True, "symmetric"), (4, True, "lsq"), (3, False, "lsq"),
                                              (8, True, "symmetric")])
def test_grads_match_lsq_formulas(param, grad_scale, range_test, ste_clip, bits, signed, grid):
    q = LSQQuantizer(bits, signed=signed, grid=grid, param=param, grad_scale=grad_scale,
                     range_test=range_test, ste_clip=ste_clip).double()
    s = 0.37
    set_step(q, s)
    v = edge_values(q.Q_N, q.Q_P, s).requires_grad_()
    w = torch.linspace(0.5, 2.0, v.numel(), dtype=torch.float64)
    (q(v) * w).sum().backward()
    g = 1.0 / math.sqrt(v.numel() * q.Q_P) if grad_scale else 1.0
    ds, dv = lsq_grads(v.detach(), torch.tensor(s, dtype=torch.float64), q.Q_N, q.Q_P, w, g,
                       range_test, ste_clip)
    want_scale = ds if param == "step" else ds / q.Q_P  # d/dalpha = d/ds / Q_P
    torch.testing.assert_close(q.scale.grad, want_scale, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v.grad, dv, rtol=0, atol=0)
    # the other range test gives a different answer on these values
    other = "rounded" if range_test == "unrounded" else "unrounded"
    ds_o, dv_o = lsq_grads(v.detach(), torch.tensor(s, dtype=torch.float64), q.Q_N, q.Q_P, w, g, other, True)
    assert not torch.allclose(ds_o, ds)


@pytest.mark.parametrize("fused", [True, False])  # the C++ kernel (kdlsq_pl.kernels) or the torch formula
@pytest.mark.parametrize("leaf", [True, False])  # a weight (v saved) or an activation (v / s saved)
@pytest.mark.parametrize("range_test", ["unrounded", "rounded"])
def test_large_float32_tensor_matches_formulas(range_test, leaf, fused):
    """An attention-probability-sized float32 tensor ([4, 12, 64, 64]): the forward, d/dx and d/ds equal the
    plain formulas evaluated in the same float32 order bit for bit (and the float64 sum to 1e-6)."""
    torch.manual_seed(0)
    v = (torch.randn(4, 12, 64, 64) * 0.3).requires_grad_()
    w = torch.randn(4, 12, 64, 64)
    s, q_n, q_p = torch.tensor(0.011, requires_grad=True), 127, 127
    g = 1.0 / math.sqrt(v.numel() * q_p)
    out = fake_quantize(v if leaf else v * 1.0, s, q_n, q_p, grad_scale=g, range_test=range_test, fused=fused)
    (out * w).sum().backward()
    assert torch.equal(out, torch.clamp(torch.round(v.detach() / s.detach()), -q_n, q_p) * s.detach())
    ds, dv = lsq_grads(v.detach().double(), s.detach().double(), q_n, q_p, w.double(), g, range_test, True)
    assert torch.equal(v.grad, dv.float())
    assert s.grad.item() == pytest.approx(ds.item(), rel=1e-6)
    r = v.detach() / s.detach()  # the float32 formula, term by term as the backward evaluates it
    below, above = (r <= -q_n, r >= q_p) if range_test == "unrounded" else (torch.round(r) < -q_n, torch.round(r) > q_p)
    terms = torch.where(below, -float(q_n), torch.where(above, float(q_p), torch.round(r) - r)) * w * g
    assert torch.equal(s.grad, terms.sum())


def test_range_tests_disagree_elementwise():
    s = torch.tensor(1.0, dtype=torch.float64)
    # ratio 7.3: unrounded -> outside (ds=7, dv=0); rounded -> round=7 inside (ds=-0.3, dv=1)
    for r, want in [(7.3, {"unrounded": (7.0, 0.0), "rounded": (-0.3, 1.0)}),
                    (-7.4, {"unrounded": (-7.0, 0.0), "rounded": (0.4, 1.0)}),
                    (7.6, {"unrounded": (7.0, 0.0), "rounded": (7.0, 0.0)}),
                    (6.8, {"unrounded": (0.2, 1.0), "rounded": (0.2, 1.0)})]:
        for mode, (ds_w, dv_w) in want.items():
            ss = s.clone().requires_grad_()
            v = torch.tensor([r], dtype=torch.float64, requires_grad=True)
            fake_quantize(v, ss, 7, 7, range_test=mode).sum().backward()
            assert ss.grad.item() == pytest.approx(ds_w, abs=1e-12), (r, mode)
            assert v.grad.item() == dv_w, (r, mode)


# ---------------------------------------------------------- finite differences
def surrogate(v, s, s0, q_n, q_p, v0=None):
    """v_hat with round(u) replaced by u + (round(u0) - u0), u0 = v0/s0 frozen (STE surrogate)."""
    u0 = (v if v0 is None else v0) / s0
    c = torch.round(u0) - u0
    return s * torch.clamp(v / s + c, -q_n, q_p)


@pytest.mark.parametrize("param", ["step", "clip"])
@pytest.mark.parametrize("bits,grid,signed", [(4, "symmetric", True), (3, "lsq", True), (5, "lsq", False),
                                              (2, "symmetric", True)])
def test_finite_difference(param, bits, grid, signed):
    gen = torch.Generator().manual_seed(bits)
    q_n, q_p = expected_range(bits, signed, grid)
    s0 = torch.tensor(0.21, dtype=torch.float64)
    # inside: round(u) strictly inside (-q_n, q_p), u at least 0.1 from a .5 boundary
    ints = torch.randint(-q_n + 1, q_p, (40,), generator=gen).double()
    frac = (torch.rand(40, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    # clipped: at least 1.5 steps beyond either edge
    far = torch.tensor([q_p + 1.7, q_p + 5.2, -q_n - 1.6, -q_n - 3.3], dtype=torch.float64)
    u = torch.cat([ints + frac, far])
    v = u * s0
    w = torch.randn(v.numel(), generator=gen, dtype=torch.float64)

    # sanity: the surrogate equals the forward at the base point
    torch.testing.assert_close(surrogate(v, s0, s0, q_n, q_p), fake_quantize(v, s0, q_n, q_p))

    q = LSQQuantizer(bits, signed=signed, grid=grid, param=param).double()
    set_step(q, s0)
    vv = v.clone().requires_grad_()
    (q(vv) * w).sum().backward()

    h = 1e-6
    f = lambda s: (w * surrogate(v, s, s0, q_n, q_p)).sum()  # noqa: E731
    fd_s = (f(s0 + h) - f(s0 - h)) / (2 * h)
    fd = fd_s if param == "step" else fd_s / q_p  # alpha = s * Q_P
    torch.testing.assert_close(q.scale.grad, fd, rtol=1e-6, atol=1e-8)

    fd_v = (surrogate(v + h, s0, s0, q_n, q_p, v0=v) - surrogate(v - h, s0, s0, q_n, q_p, v0=v)) / (2 * h)
    torch.testing.assert_close(vv.grad, w * fd_v, rtol=1e-6, atol=1e-8)
    n_in = ints.numel()
    assert torch.allclose(fd_v[:n_in], torch.ones(n_in, dtype=torch.float64))
    assert torch.allclose(fd_v[n_in:], torch.zeros(far.numel(), dtype=torch.float64))


def test_ste_clip_false_passes_everywhere():
    v = torch.tensor([-10.0, -0.3, 0.2, 10.0], requires_grad=True)
    fake_quantize(v, torch.tensor(0.5), 1, 1, ste_clip=False).sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    v.grad = None
    fake_quantize(v, torch.tensor(0.5), 1, 1, ste_clip=True).sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------ per-channel
@pytest.mark.parametrize("channel_dim", [0, 1])
@pytest.mark.parametrize("param", ["step", "clip"])
@pytest.mark.parametrize("grad_scale", [False, True])
def test_per_channel_grad(channel_dim, param, grad_scale):
    gen = torch.Generator().manual_seed(3)
    c, k = 6, 50
    shape = (c, k) if channel_dim == 0 else (k, c)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    s = torch.rand(c, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    q = LSQQuantizer(3, grid="lsq", param=param, per_channel=True, num_channels=c, channel_dim=channel_dim,
                     grad_scale=grad_scale).double()
    set_step(q, s)
    xx = x.clone().requires_grad_()
    (q(xx) * w).sum().backward()
    assert q.scale.grad.shape == (c,)
    g = 1.0 / math.sqrt(k * q.Q_P) if grad_scale else 1.0
    for i in range(c):
        xi = x.select(channel_dim, i)
        wi = w.select(channel_dim, i)
        ds, dv = lsq_grads(xi, s[i], q.Q_N, q.Q_P, wi, g, "unrounded", True)
        want = ds if param == "step" else ds / q.Q_P
        torch.testing.assert_close(q.scale.grad[i], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xx.grad.select(channel_dim, i), dv)


def test_per_channel_requires_num_channels_and_matching_input():
    with pytest.raises(ValueError, match="num_channels"):
        LSQQuantizer(4, per_channel=True)
    q = LSQQuantizer(4, per_channel=True, num_channels=3)
    with pytest.raises(ValueError, match="num_channels=3"):
        q(torch.randn(4, 5))


# -------------------------------------------------------------------- init rules
def test_init_lsq_and_minmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    for bits in (2, 4, 8):
        q = LSQQuantizer(bits, init="lsq", param="clip")
        q.initialize(x)
        s = 2 * x.abs().mean() / math.sqrt(q.Q_P)
        torch.testing.assert_close(q.step_size, s)
        torch.testing.assert_close(q.scale.detach(), s * q.Q_P)
        q = LSQQuantizer(bits, init="minmax", param="step")
        q.initialize(x)
        torch.testing.assert_close(q.step_size, x.abs().max() / q.Q_P)
    q = LSQQuantizer(4, signed=False, init="minmax")
    q.initialize(x)
    torch.testing.assert_close(q.step_size, x.max() / 15)
    q = LSQQuantizer(4, init="lsq", per_channel=True, num_channels=64, param="step")
    q.initialize(x)
    torch.testing.assert_close(q.step_size, 2 * x.abs().mean(1) / math.sqrt(7))
    assert bool(q.initialized)


def test_init_percentile():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    xn = x.numpy()
    q = LSQQuantizer(4, init="percentile").double()
    q.initialize(x)
    alpha = max(abs(np.quantile(xn, 0.025)), abs(np.quantile(xn, 0.975)))
    assert q.scale.item() == pytest.approx(alpha, rel=1e-9)
    assert q.step_size.item() == pytest.approx(alpha / 7, rel=1e-9)
    q = LSQQuantizer(4, init="percentile", percentile=99.0, signed=False, param="step").double()
    q.initialize(x)
    assert q.step_size.item() == pytest.approx(np.quantile(xn, 0.99) / 15, rel=1e-9)
    xc = x.reshape(8, 500)
    q = LSQQuantizer(3, init="percentile", per_channel=True, num_channels=8).double()
    q.initialize(xc)
    want = [max(abs(np.quantile(r, 0.025)), abs(np.quantile(r, 0.975))) for r in xc.numpy()]
    np.testing.assert_allclose(q.scale.detach().numpy(), want, rtol=1e-9)


def kl_reference(x: torch.Tensor, q_p: int, bins: int) -> float:
    """Loop-based TensorRT-style search (q merged from h[:i], outliers folded into p[i-1])."""
    x = x.reshape(-1).double().numpy()
    mx = float(x.max())
    h = np.bincount(np.clip(np.floor(x / mx * bins), 0, bins - 1).astype(int), minlength=bins).astype(float)
    n, eps = q_p + 1, 1e-10
    best_i, best_d = None, None
    for i in range(n, bins + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        m = i // n
        q = np.zeros(i)
        for g in range(n):
            a, b = g * m, (i if g == n - 1 else g * m + m)
            nzm = p[a:b] > 0
            if nzm.sum():
                q[a:b][nzm] = h[a:b].sum() / nzm.sum()
        p = p / p.sum()
        q = q / q.sum() if q.sum() > 0 else q
        d = np.sum((p - q) * (np.log(p + eps) - np.log(q + eps)))
        if best_d is None or d < best_d:
            best_i, best_d = i, d
    return best_i * mx / bins


def test_kl_matches_reference_and_clips_outliers():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=gen) * 0.05
    w.view(-1)[:4] = torch.tensor([1.0, -0.9, 0.8, -1.2])
    a = w.abs()
    for q_p in (1, 3, 7, 127):
        assert kl_clip_value(a, q_p, bins=200) == pytest.approx(kl_reference(a, q_p, 200), rel=1e-12)
    r = torch.rand(700, generator=gen, dtype=torch.float64) ** 3
    for q_p in (1, 15):
        assert kl_clip_value(r, q_p, bins=150) == pytest.approx(kl_reference(r, q_p, 150), rel=1e-12)
    for bits in (2, 4, 8):
        q = LSQQuantizer(bits, init="kl")
        q.initialize(w)
        alpha = q.scale.item()
        assert 0.0 < alpha <= a.max().item()
        assert alpha < 0.5 * a.max().item()  # outliers clipped
        torch.testing.assert_close(q.step_size, q.scale.detach() / q.Q_P)
    # per-channel = one search per row
    q = LSQQuantizer(4, init="kl", per_channel=True, num_channels=96)
    q.initialize(w)
    want = torch.tensor([kl_clip_value(row.abs(), 7) for row in w[:5]], dtype=torch.float64)
    torch.testing.assert_close(q.scale.detach()[:5].double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(kl_clip_values(a[:5], 7), want)
    assert kl_clip_value(torch.zeros(10), 7) == 0.0


def test_kl_fast_enough():
    import time

    w = torch.randn(384, 1536, generator=torch.Generator().manual_seed(0)) * 0.05
    t = time.perf_counter()
    kl_clip_value(w.abs(), 127)
    assert time.perf_counter() - t < 2.0  # generous: shared CPU


def test_zero_input_guard():
    for init in ("lsq", "minmax", "percentile", "kl"):
        for param in ("step", "clip"):
            q = LSQQuantizer(4, init=init, param=param)
            out = q(torch.zeros(3, 4))
            assert q.step_size.item() == pytest.approx(1e-3)
            assert torch.equal(out, torch.zeros(3, 4))


# ----------------------------------------------------------------- state, clamp
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip(per_channel):
    gen = torch.Generator().manual_seed(5)
    kw = dict(bits=3, per_channel=per_channel, num_channels=8 if per_channel else None, init="minmax")
    x = torch.randn(8, 20, generator=gen)
    q = LSQQuantizer(**kw)
    y = q(x)
    with torch.no_grad():
        q.scale.mul_(0.7)  # "trained" away from the init value
    y = q(x)
    sd = q.state_dict()
    assert set(sd) == {"scale", "initialized"}
    fresh = LSQQuantizer(**kw)
    assert not fresh.is_initialized
    fresh.load_state_dict(sd)
    assert fresh.is_initialized
    assert torch.equal(fresh(x), y)
    assert torch.equal(fresh.scale, q.scale)
    # without loading, a fresh one would re-initialise to something else
    assert not torch.equal(LSQQuantizer(**kw)(x), y)


def test_forward_initialises_once():
    q = LSQQuantizer(4, init="minmax", param="step")
    q(torch.tensor([1.0, -7.0]))
    assert q.step_size.item() == pytest.approx(1.0)
    q(torch.tensor([100.0]))
    assert q.step_size.item() == pytest.approx(1.0)


@pytest.mark.parametrize("param", ["step", "clip"])
@pytest.mark.parametrize("value", [0.0, -0.5])
def test_nonpositive_scale_is_clamped(param, value):
    q = LSQQuantizer(4, param=param, eps=1e-8)
    with torch.no_grad():
        q.scale.fill_(value)
        q.initialized.fill_(True)
    x = torch.randn(10, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(q.scale.grad).all() and torch.isfinite(x.grad).all()
    eps32 = torch.tensor(1e-8, dtype=q.scale.dtype)
    assert q.step_size >= eps32
    assert q.step_size == eps32


# ---------------------------------------------------------------- API / errors
@pytest.mark.parametrize("bits", [1, 9, 0, 4.0])
def test_bad_bits(bits):
    with pytest.raises(ValueError) as e:
        LSQQuantizer(bits)
    assert f"bits={bits}" in str(e.value) and "2..8" in str(e.value)


@pytest.mark.parametrize("arg,value,allowed", [
    ("init", "foo", "lsq, percentile, kl, minmax"),
    ("grid", "asym", "symmetric, lsq"),
    ("param", "alpha", "clip, step"),
    ("range_test", "x", "unrounded, rounded"),
    ("kind", "bias", "weight, activation"),
])
def test_bad_choices(arg, value, allowed):
    with pytest.raises(ValueError) as e:
        LSQQuantizer(4, **{arg: value})
    msg = str(e.value)
    assert value in msg and allowed in msg and "\n" not in msg


def test_freeze_unfreeze_and_repr():
    q = LSQQuantizer(4, grid="lsq", signed=True, param="step")
    q.freeze()
    assert not q.scale.requires_grad
    q.unfreeze()
    assert q.scale.requires_grad
    r = repr(q)
    for part in ("bits=4", "signed=True", "grid=lsq", "param=step", "Q_N=8", "Q_P=7"):
        assert part in r
