"""I-BERT's integer operators against exact arithmetic, closed forms and torch's float operators; no float op inside."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdlsq_pl.integer.ops import INT, IntGELU, IntLayerNorm, IntSoftmax, Requantize, bit_length, dyadic, int_sqrt


class NoFloat(TorchDispatchMode):
    """Fails on any aten op that takes or returns a floating-point tensor (the integer path must have none)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = list(args) + list(kwargs.values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
        for t in flat:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                raise AssertionError(f"floating-point tensor in {func}: {t.dtype}")
        return out


def test_no_float_guard_catches_a_float_op():
    with pytest.raises(AssertionError, match="floating-point"):
        with NoFloat():
            torch.ones(3, dtype=INT).float()


@pytest.mark.parametrize("ratio", [1e-7, 3.3e-4, 0.5, 0.75, 1.0, 1.9999999999, 123.456, 2.0 ** 33 + 5])
def test_dyadic_mantissa_and_error(ratio):
    m, e = dyadic(ratio)
    assert 2 ** 30 <= int(m) < 2 ** 31
    assert abs(Fraction(int(m)) / Fraction(2) ** int(e) - Fraction(ratio)) <= Fraction(ratio) * Fraction(1, 2 ** 30)


def test_dyadic_rejects_non_positive():
    with pytest.raises(ValueError, match="positive finite"):
        dyadic(torch.tensor([0.5, 0.0]))


def test_requantize_equals_exact_rounding():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-(2 ** 31), 2 ** 31, (4000,), generator=g, dtype=INT)
    for s_in, s_out in [(3.1e-5, 0.0123), (0.02, 0.0199), (1.0, 3e-3)]:
        rq = Requantize(s_in, s_out)
        m, e = int(rq.m), int(rq.e)
        with NoFloat():
            got = rq(q)
        # round(q * m / 2^e), halves up, in exact rational arithmetic
        want = [math.floor(Fraction(int(v) * m, 2 ** e) + Fraction(1, 2)) for v in q]
        assert got.tolist() == want
        # and the dyadic ratio is the float ratio to 31 bits: round(q * s_in / s_out) within a relative 2^-30, +-1
        exact = torch.tensor([round(Fraction(int(v)) * Fraction(s_in) / Fraction(s_out)) for v in q[:200]])
        assert bool(((got[:200] - exact).abs() <= exact.abs() // 2 ** 30 + 1).all())


def test_requantize_per_channel_and_clamp():
    rq = Requantize(torch.tensor([0.1, 0.2, 0.4]), 0.1, lo=-127, hi=127)
    q = torch.tensor([[10, 10, 10], [1000, -1000, 3]], dtype=INT)
    assert rq(q).tolist() == [[10, 20, 40], [127, -127, 12]]


def test_bit_length_equals_pythons_and_uses_no_float():
    g = torch.Generator().manual_seed(2)
    vals = [0, 1, 2, 3, 4, 7, 8, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1]
    vals += [v >> int(s) for v, s in zip(torch.randint(0, 2 ** 63 - 1, (3000,), generator=g, dtype=INT).tolist(),
                                          torch.randint(0, 63, (3000,), generator=g).tolist())]
    with NoFloat():
        got = bit_length(torch.tensor(vals, dtype=INT))
    assert got.tolist() == [v.bit_length() for v in vals]


def test_int_sqrt_equals_isqrt_and_uses_no_float():
    g = torch.Generator().manual_seed(1)
    vals = [0, 1, 2, 3, 4, 15, 16, 17, 2 ** 31 - 1, 2 ** 31, (2 ** 31 - 1) ** 2, (2 ** 31 - 1) ** 2 - 1, 2 ** 62 - 1]
    vals += torch.randint(0, 2 ** 62, (2000,), generator=g, dtype=INT).tolist()
    vals += torch.randint(0, 1000, (500,), generator=g, dtype=INT).tolist()
    n = torch.tensor(vals, dtype=INT)
    with NoFloat():
        got = int_sqrt(n)
    assert got.tolist() == [math.isqrt(v) for v in vals]
    with pytest.raises(ValueError, match="non-negative"):
        int_sqrt(torch.tensor([-4], dtype=INT))


def erf_poly(u: torch.Tensor) -> torch.Tensor:
    """I-BERT's L(u) in float64, from the paper's equation."""
    a, b = -0.2888, -1.769
    return torch.sign(u) * (a * (torch.clamp(u.abs(), max=-b) + b) ** 2 + 1)


@pytest.mark.parametrize("scale", [1e-3, 1e-2, 0.03])
def test_int_gelu_matches_the_polynomial_and_gelu(scale):
    x = torch.linspace(-5, 5, 4001, dtype=torch.float64)
    q = torch.round(x / scale).to(INT)
    op = IntGELU(scale)
    with NoFloat():
        out = op(q)
    got = out.to(torch.float64) * op.scale_out
    xq = q.to(torch.float64) * scale
    poly = xq / 2 * (1 + erf_poly(xq / math.sqrt(2)))
    exact = torch.nn.functional.gelu(xq)
    # against the polynomial: only the integer floors differ (about the input step at most, over [-5, 5])
    assert (got - poly).abs().max() <= 3 * scale + 1e-3
    # against the exact GELU: the polynomial's own error (about 0.02, the paper's) plus that rounding
    poly_err = float((poly - exact).abs().max())
    assert 0.005 < poly_err < 0.025
    assert float((got - exact).abs().max()) <= poly_err + 3 * scale + 1e-3


@pytest.mark.parametrize("scale", [2e-4, 2e-3, 2e-2])
def test_int_softmax_matches_softmax_and_masks_exactly(scale):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 3, 9, 37, generator=g, dtype=torch.float64) * 4
    q = torch.round(scores / scale).to(INT)
    mask = torch.ones(4, 1, 1, 37, dtype=torch.bool)
    mask[1, ..., 30:] = False
    mask[3, ..., 5:] = False
    op = IntSoftmax(scale, out_bits=16)
    with NoFloat():
        out = op(q, mask)
    p = out.to(torch.float64) * op.scale_out
    ref = torch.softmax((q.to(torch.float64) * scale).masked_fill(~mask, float("-inf")), dim=-1)
    assert bool((out[~mask.expand_as(out)] == 0).all())
    assert float((p - ref).abs().max()) < 0.01  # the exp polynomial's relative error (< 0.5%) and the floors
    # rows sum to 1 up to the floors: each entry's output floor, at most one unit of 2^-16, plus the two 2^-24 floors
    assert bool(((2 ** 16 - out.sum(-1)) >= 0).all()) and int((2 ** 16 - out.sum(-1)).max()) <= 37 + 1


def test_int_softmax_refuses_a_coarse_scale():
    with pytest.raises(ValueError, match="too coarse"):
        IntSoftmax(0.05)


def test_int_layernorm_matches_layer_norm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 11, 384, generator=g, dtype=torch.float64) * 3 + 0.7
    x[0, 0] *= 40  # an outlier row
    s_in, s_out = float(x.abs().max()) / 2 ** 21, 2.0 ** -14
    q = torch.round(x / s_in).to(INT)
    gamma = torch.rand(384, generator=g, dtype=torch.float64) * 2 - 0.3
    beta = torch.randn(384, generator=g, dtype=torch.float64) * 0.1
    op = IntLayerNorm(gamma, beta, s_out)
    with NoFloat():
        out = op(q)
    got = out.to(torch.float64) * s_out
    ref = torch.nn.functional.layer_norm(q.to(torch.float64) * s_in, (384,), gamma, beta, eps=1e-12)
    assert float((got - ref).abs().max()) < 2e-3


def test_float_simulations_equal_the_integer_operators():
    from kdlsq_pl.integer.ops import ibert_gelu, ibert_softmax
    scale = 1e-4
    x = torch.linspace(-6, 6, 3001, dtype=torch.float64)
    q = torch.round(x / scale).to(INT)
    op = IntGELU(scale)
    assert float((op(q).double() * op.scale_out - ibert_gelu(q.double() * scale)).abs().max()) < 3e-4
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 4, 21, generator=g, dtype=torch.float64) * 3
    visible = torch.rand(3, 1, 21, generator=g) > 0.3
    sq = torch.round(s / 1e-3).to(INT)
    sm = IntSoftmax(1e-3)
    p_int = sm(sq, visible).double() * sm.scale_out
    p_sim = ibert_softmax(sq.double() * 1e-3, visible)
    # the integer version floors b, c and each 2^-z shift: within 0.2% of the largest probability
    assert float((p_int - p_sim).abs().max()) < 2e-3 and bool((p_sim[~visible.expand_as(p_sim)] == 0).all())
    # the polynomial softmax is close to the exact one (the exp polynomial's error, well under 1%)
    exact = torch.softmax((sq.double() * 1e-3).masked_fill(~visible, float("-inf")), -1)
    assert float((p_sim - exact).abs().max()) < 5e-3


def test_float_simulations_have_correct_gradients():
    from kdlsq_pl.integer.ops import ibert_gelu, ibert_softmax
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(40, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(ibert_gelu, (x,), eps=1e-6, atol=1e-5)
    s = (torch.randn(2, 7, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    visible = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    assert torch.autograd.gradcheck(lambda t: ibert_softmax(t, visible), (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale_in, s_a", [(1.0 / 2 ** 18, 0.01), (4.0 / 2 ** 19, 0.05)])
def test_gelu_then_requantize_equals_exact_integers_up_to_the_clamp(scale_in, s_a):
    """The GELU output (up to 2^38 at the engine's 2^21 input clamp) times the next dyadic multiplier stays in int64:
    the codes equal exact Python-integer arithmetic on the same constants."""
    gelu = IntGELU(scale_in)
    rq = Requantize(gelu.scale_out, s_a, -127, 127, in_bits=gelu.out_bits(23))
    q = torch.tensor([-(2 ** 21), -(2 ** 18), -12345, -1, 0, 1, 777, 2 ** 15, 2 ** 18, 2 ** 20, 2 ** 21], dtype=INT)
    g = gelu(q)
    m, e = int(rq.m), int(rq.e)
    for qi, gi, ci in zip(q.tolist(), g.tolist(), rq(g).tolist()):
        clipped = min(abs(qi), -gelu.b_int)
        sign = (qi > 0) - (qi < 0)
        y = (sign * ((clipped + gelu.b_int) ** 2 + gelu.c_int)) >> gelu.shift
        assert gi == -qi * (y + gelu.one)  # Python ints: no overflow
        assert ci == max(-127, min(127, (gi * m + (1 << (e - 1))) >> e))
        # and the code is the real GELU's: within one code of round(GELU(x) / s_a) up to the polynomial's 0.02
        x = qi * scale_in
        assert abs(ci - max(-127, min(127, round(float(torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64))) / s_a)))) <= 1 + 0.025 / s_a
