"""The fused C++ LSQ kernel (kdlsq_pl/csrc/lsq_cpu.cpp) against the torch formula: bit-identical forward
output, d/dv and d/ds on the layouts the model feeds it, and the fallback when it cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch

from kdlsq_pl import kernels
from kdlsq_pl.distill.losses import _AttentionMSE, attention_score_mse
from kdlsq_pl.quant.lsq import LSQQuantizer, fake_quantize

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler: the fused kernel cannot be built here")


def run(v, s, q_n, q_p, fused, grad, **kw):
    """(output, d/dv, d/ds) of fake_quantize on copies of v (as a leaf weight or an activation) and s."""
    leaf = kw.pop("leaf", False)
    expect_fused = kw.pop("expect_fused", fused)
    v = v.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out = fake_quantize(v if leaf else v * 1.0, s, q_n, q_p, fused=fused, **kw)
    # the autograd node is the Function's ctx: it records which path ran (a failed build must not turn a
    # kernel-vs-torch comparison into torch-vs-torch)
    assert out.grad_fn.fused is expect_fused, f"fused path ran: {out.grad_fn.fused}, expected {expect_fused}"
    out.backward(grad)
    return out.detach(), v.grad, s.grad


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(x, y), (x - y).abs().max()


@needs_compiler
def test_kernel_builds_and_registers():
    ops = kernels.cpu_kernels()
    assert ops is not None
    out = ops.lsq_forward(torch.tensor([0.24, -0.26, 1.5, -9.0]), torch.tensor(0.5), 1, 1)
    # hand computed: v/s = 0.48, -0.52, 3, -18 -> round 0, -1, 3, -18 -> clamp to [-1, 1] -> times 0.5
    assert out.tolist() == [0.0, -0.5, 0.5, -0.5]


@needs_compiler
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("range_test", ["unrounded", "rounded"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.0123])
def test_attention_layout_matches_torch(bits, range_test, grad_scale):
    """Q/K/V arrive as transposed views [B, H, T, d] of [B, T, H, d]; the gradient arrives in yet another layout."""
    torch.manual_seed(bits)
    q = 2 ** (bits - 1) - 1
    v = torch.randn(3, 17, 4, 8).transpose(1, 2)  # dense, not contiguous
    grad = torch.randn(3, 4, 8, 17).transpose(2, 3)  # same shape, other strides
    s = torch.tensor(0.7 / q)  # about 1/3 of the values clip at 2 bits
    want = run(v, s, q, q, False, grad, range_test=range_test, grad_scale=grad_scale)
    got = run(v, s, q, q, True, grad, range_test=range_test, grad_scale=grad_scale)
    assert_same(got, want)
    assert 0 < int((want[1] == 0).sum()) < v.numel()  # some elements clipped (zero d/dv), some not


@needs_compiler
@pytest.mark.parametrize("ste_clip", [True, False])
def test_per_channel_weight_matches_torch(ste_clip):
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    grad = torch.randn(6, 40)
    s = (torch.rand(6, 1) + 0.1) * 0.5
    want = run(w, s, 1, 1, False, grad, leaf=True, ste_clip=ste_clip)
    got = run(w, s, 1, 1, True, grad, leaf=True, ste_clip=ste_clip)
    assert_same(got, want)


@needs_compiler
@pytest.mark.parametrize("leaf", [True, False])
@pytest.mark.parametrize("ste_clip", [True, False])
@pytest.mark.parametrize("frozen_s", [True, False])
def test_every_backward_variant_matches_torch(leaf, ste_clip, frozen_s):
    """The backward loop is compiled once per flag combination; each must equal the torch formula."""
    torch.manual_seed(3)
    v = torch.randn(5000)  # longer than a vector register, with a remainder
    grad = torch.randn(5000)
    outs = []
    for fused in (True, False):
        vi = v.clone().requires_grad_()
        si = torch.tensor(0.4, requires_grad=not frozen_s)
        out = fake_quantize(vi if leaf else vi * 1.0, si, 1, 1, fused=fused, ste_clip=ste_clip, grad_scale=0.05)
        out.backward(grad)
        outs.append((out.detach(), vi.grad, si.grad if not frozen_s else torch.zeros(())))
    assert_same(outs[0], outs[1])
    assert (outs[0][1] == 0).any() == ste_clip  # the STE mask zeroes clipped elements only with ste_clip


@needs_compiler
def test_quantizer_module_matches_torch_and_nan_passes_through():
    """An activation LSQQuantizer with the kernel and without: same output and gradients, NaN stays NaN."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16)
    x[0, 0, 0] = float("nan")
    grads = []
    for fused in (True, False):
        q = LSQQuantizer(4, kind="activation", init="minmax", grad_scale=True, fused_kernel=fused)
        q.initialize(torch.nan_to_num(x))
        xi = x.clone().requires_grad_()
        out = q(xi * 1.0)
        assert out.grad_fn.fused is fused
        torch.nan_to_num(out).sum().backward()
        grads.append((out.detach(), xi.grad, q.scale.grad))
    assert torch.isnan(grads[0][0][0, 0, 0])
    assert torch.equal(grads[0][0].nan_to_num(), grads[1][0].nan_to_num())
    assert torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[0][2].nan_to_num(), grads[1][2].nan_to_num())


def test_kernel_applies_only_where_it_is_exact():
    v = torch.randn(4, 6)
    assert kernels.lsq_kernel_applies(v, torch.tensor(0.1))
    assert kernels.lsq_kernel_applies(v, torch.rand(4, 1))  # one step per row
    assert not kernels.lsq_kernel_applies(v, torch.rand(1, 6))  # per column
    assert not kernels.lsq_kernel_applies(v.double(), torch.tensor(0.1, dtype=torch.float64))


def test_falls_back_to_torch_when_the_build_fails(monkeypatch, caplog):
    """A build that fails (here: the source is missing) logs one warning; quantization gives the same numbers."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "SOURCES", [kernels.SOURCES[0].with_name("missing.cpp")])
    torch.manual_seed(0)
    v, grad, s = torch.randn(50), torch.randn(50), torch.tensor(0.3)
    with caplog.at_level("WARNING", logger="kdlsq_pl.kernels"):
        got = run(v, s, 3, 3, True, grad, expect_fused=False)
    assert kernels.cpu_kernels() is None
    assert "fused CPU kernels unavailable" in caplog.text
    assert_same(got, run(v, s, 3, 3, False, grad))


@needs_compiler
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weight", [1.0, 0.37])
def test_attention_mse_matches_torch(masked, weight):
    """Live-teacher scores with the additive padding mask (finfo.min) and entries at the threshold: the fused
    attention loss and its gradient equal the torch formula bit for bit; the loss also equals a float64 hand sum."""
    torch.manual_seed(0)
    b, h, t_len = 3, 4, 9
    real = torch.ones(b, t_len, dtype=torch.bool)
    real[0, 6:] = False
    real[2, 4:] = False
    additive = torch.where(real, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    student = [torch.randn(b, h, t_len, t_len) * 3 + additive for _ in range(2)]
    teacher = [torch.randn(b, h, t_len, t_len) * 3 + additive for _ in range(2)]
    student[0][1, 2, 3, 4] = -100.0  # exactly at the threshold: zeroed, no gradient
    mask = real if masked else None
    assert _AttentionMSE.applies(student[0], teacher[0])  # the fused path is the one taken below
    results = []
    for fused in (True, False):
        ss = [x.clone().requires_grad_() for x in student]
        loss = attention_score_mse(ss, teacher, mask=mask, fused=fused) * weight
        loss.backward()
        results.append((loss.detach(), [x.grad for x in ss]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b_ in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b_)
    assert results[0][1][0][1, 2, 3, 4] == 0.0
    want = 0.0
    for s, t in zip(student, teacher):
        d = (torch.where(s <= -100, 0.0, s) - torch.where(t <= -100, 0.0, t)).double()
        if masked:
            pairs = (real[:, None, :, None] & real[:, None, None, :]).double()
            want += float((d.square() * pairs).sum() / (pairs.sum() * h))
        else:
            want += float(d.square().mean())
    assert float(results[0][0]) == pytest.approx(want * weight, rel=1e-6)


def test_keep_freed_memory_applies_on_glibc():
    """Both mallopt calls succeed on glibc Linux (their effect, page faults per training step, is measured by
    benchmarks/train_step.py --default-malloc against the default)."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert kernels.keep_freed_memory() is True
    assert kernels.keep_freed_memory(trim_threshold=2**31) is True
