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
    assert "fused CPU kernels kdlsq_cpu_kernels unavailable" in caplog.text
    assert_same(got, run(v, s, 3, 3, False, grad))


def test_integer_kernels_need_the_onednn_wheel(monkeypatch, caplog):
    """Without the wheel that ships libdnnl.so.3 the integer kernels are unavailable with one warning (the integer
    engine then runs its torch reference operators)."""
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "ONEDNN_WHEEL", "no-such-onednn-wheel")
    with caplog.at_level("WARNING", logger="kdlsq_pl.kernels"):
        assert kernels.integer_kernels() is None
    assert "integer kernels unavailable: no libdnnl.so.3 (pip install no-such-onednn-wheel==2023.2.0)" in caplog.text


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



def _attention(fused: bool, q, k, v, mask, quantizer, p_drop, training, seed, monkeypatch):
    """(output, probabilities, d/dq, d/dk, d/dv, d/ds) of kdlsq_attention_forward with the one-node probability path
    (fused) or the composite softmax -> dropout -> quantizer -> matmul, the dropout draw from ``seed``."""
    from types import SimpleNamespace

    from kdlsq_pl.models import attention

    calls = []
    real = attention._QuantizedProbsTimesValue.apply
    monkeypatch.setattr(attention._QuantizedProbsTimesValue, "apply", lambda *a: calls.append(1) or real(*a))
    if not fused:
        monkeypatch.setattr(attention, "_fused_probs_quantizer", lambda *a: None)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    quantizer.scale.grad = None
    module = SimpleNamespace(kdlsq_act_quant=torch.nn.ModuleDict({"probs": quantizer}), training=training)
    torch.manual_seed(seed)
    out, probs = attention.kdlsq_attention_forward(module, leaves[0] * 1.0, leaves[1] * 1.0, leaves[2].transpose(1, 2),
                                                   mask, dropout=p_drop)
    assert len(calls) == int(fused)  # the path asked for is the one that ran
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)))
    monkeypatch.undo()
    grad_s = None if quantizer.scale.grad is None else quantizer.scale.grad.clone()
    return out.detach(), probs.detach(), *[x.grad for x in leaves], grad_s


@needs_compiler
@pytest.mark.parametrize("training,p_drop", [(True, 0.1), (True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("range_test", ["unrounded", "rounded"])
@pytest.mark.parametrize("ste_clip,grad_scale,frozen", [(True, False, False), (False, True, False), (True, False, True)])
def test_attention_probability_path_matches_the_composite(training, p_drop, range_test, ste_clip, grad_scale, frozen,
                                                           monkeypatch):
    """softmax -> dropout -> LSQ -> P @ V as one autograd node (three [B, H, T, T] tensors less kept) gives the
    composite path's output, probabilities and gradients for Q, K, V and the step size bit for bit, on a padded
    batch whose probabilities partly clip, with the same dropout draws."""
    torch.manual_seed(0)
    b, h, t_len, d = 3, 4, 11, 8
    q, k = torch.randn(b, h, t_len, d) * 2, torch.randn(b, h, t_len, d) * 2
    v = torch.randn(b, t_len, h, d)  # the model's V is a transposed view
    real = torch.ones(b, t_len, dtype=torch.bool)
    real[1, 7:] = False
    mask = torch.where(real, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    quantizer = LSQQuantizer(bits=8, kind="activation", ste_clip=ste_clip, grad_scale=grad_scale, range_test=range_test)
    with torch.no_grad():
        quantizer.scale.fill_(0.6)  # param "clip": s = 0.6 / 127, so dropped probabilities above 0.6 clip
        quantizer.initialized.fill_(True)
    if frozen:
        quantizer.freeze()
    want = _attention(False, q, k, v, mask, quantizer, p_drop, training, 7, monkeypatch)
    got = _attention(True, q, k, v, mask, quantizer, p_drop, training, 7, monkeypatch)
    for name, x, y in zip(("output", "probs", "dq", "dk", "dv", "ds"), got, want):
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape and torch.equal(x, y), (name, (x - y).abs().max())
    probs = want[1]
    assert (probs >= 0.6 - 1e-6).any() or p_drop == 0  # some clipped entries were exercised
    if training and p_drop:
        assert (probs == 0).float().mean() > 0.05  # and dropped ones
