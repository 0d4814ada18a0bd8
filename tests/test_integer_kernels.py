"""The integer engine's fast paths against its torch reference operators on edge inputs, integer for integer:
the fused LayerNorm (division-free floor division by the row's integer std) and the int8 codes it writes beside its
output, the fused i-softmax (division-free ``x // x0``), and the fused attention (oneDNN's products per head) against
the reference operators and integer einsums."""

from __future__ import annotations

import pytest
import torch

from kdlsq_pl.integer.ops import INT, IntLayerNorm, IntSoftmax, Requantize

K = None


@pytest.fixture(params=[True, False], ids=["simd", "compiler"])
def simd(request, kernels):
    """Each test using it runs twice: with the hand-written AVX-512 rows where this CPU has them, and with the
    compiler-vectorized rows only (``kdlsq::set_simd``); both must give the reference's integers."""
    before = kernels.set_simd(request.param)
    yield request.param
    kernels.set_simd(before)


@pytest.fixture(scope="module")
def kernels():
    from kdlsq_pl.kernels import integer_kernels
    k = integer_kernels()
    if k is None:
        from kdlsq_pl.kernels import cpu_kernels
        # no compiler: skip; a compiler but no integer kernels (the oneDNN wheel missing or its build broken): fail
        assert cpu_kernels() is None, "the integer kernels did not build where the training kernels do (see the warning)"
        pytest.skip("the C++ kernels cannot be built here")
    return k


def edge_rows(C: int, clamp: int, g: torch.Generator) -> torch.Tensor:
    """Residual sums whose LayerNorm hits the division's corners: constant rows (std 0 -> 1), +-1 (std 1, y_hat =
    +-4096 exactly), the clamp's two ends (the largest |y - mean|, std near 2^23), one outlier in a flat row, values
    that are exact multiples of their std, and random rows of every magnitude."""
    rows = [torch.zeros(C), torch.full((C,), 7.0), torch.tensor([1.0, -1.0]).repeat(C // 2),
            torch.tensor([float(clamp), -float(clamp)]).repeat(C // 2), torch.cat([torch.full((C - 1,), -float(clamp)), torch.tensor([float(clamp)])]),
            torch.cat([torch.zeros(C - 1), torch.tensor([float(clamp)])]), torch.cat([torch.zeros(C - 1), torch.tensor([-1.0])]),
            torch.arange(C, dtype=torch.float64) * 3 - C]
    for bits in (1, 4, 10, 16, 20, 23):
        rows.append(torch.randint(-2 ** bits, 2 ** bits, (C,), generator=g).double())
    return torch.stack(rows).clamp(-clamp, clamp).to(INT)


@pytest.mark.parametrize("h_dtype", [torch.int64, torch.int32])
def test_fused_layernorm_equals_the_reference_on_edge_rows(kernels, simd, h_dtype):
    g = torch.Generator().manual_seed(0)
    C, clamp = 384, 2 ** 23
    ln_w = torch.rand(C, generator=g, dtype=torch.float64) * 2 - 0.5
    ln_b = torch.rand(C, generator=g, dtype=torch.float64) - 0.5
    ln = IntLayerNorm(ln_w, ln_b, 2.0 ** -14)
    res = edge_rows(C, clamp, g)  # [N, C]: the residual sum itself enters as h (identity multiplier, a = 0)
    got = kernels.int_residual_layernorm(torch.zeros(res.shape, dtype=torch.int32), torch.zeros(C, dtype=INT), torch.ones(1, dtype=INT),
                                         torch.zeros(1, dtype=INT), res.to(h_dtype).contiguous(), 1, 0, clamp, ln.gamma_int, ln.beta_int,
                                         ln.NORM_BITS, int(ln.requant.m), int(ln.requant.e), None, [], [])
    assert got.dtype == torch.int32
    assert torch.equal(got.to(INT), ln(res))


def test_fused_layernorm_adds_the_requantized_branches_like_the_reference(kernels, simd):
    g = torch.Generator().manual_seed(1)
    C, N, clamp = 384, 64, 2 ** 23
    ln = IntLayerNorm(torch.rand(C, generator=g) + 0.1, torch.rand(C, generator=g) - 0.5, 2.0 ** -15)
    a = torch.randint(-2 ** 30, 2 ** 30, (N, C), generator=g, dtype=torch.int32)
    bias = torch.randint(-2 ** 20, 2 ** 20, (C,), generator=g, dtype=INT)
    a_rq = Requantize(torch.rand(C, generator=g, dtype=torch.float64) * 1e-7 + 1e-8, 2.0 ** -20)  # per channel
    h = torch.randint(-2 ** 19, 2 ** 19, (N, C), generator=g, dtype=INT)
    h_rq = Requantize(3.3e-6, 2.0 ** -20)
    want = ln(torch.clamp(a_rq(a.to(INT) + bias) + h_rq(h), -clamp, clamp))
    got = kernels.int_residual_layernorm(a, bias, a_rq.m.reshape(-1), a_rq.e.reshape(-1), h.to(torch.int32), int(h_rq.m), int(h_rq.e),
                                         clamp, ln.gamma_int, ln.beta_int, ln.NORM_BITS, int(ln.requant.m), int(ln.requant.e), None, [], [])
    assert torch.equal(got.to(INT), want)


@pytest.mark.parametrize("scale", [1e-3, 3e-5])
def test_fused_softmax_equals_the_reference_on_edge_scores(kernels, simd, scale):
    g = torch.Generator().manual_seed(2)
    B, H, T = 3, 2, 40
    sm = IntSoftmax(scale)
    p_rq = Requantize(sm.scale_out, 1 / 127, 0, 127)
    big = 2 ** 30
    scores = torch.randint(-2 ** 20, 2 ** 20, (B, H, T, T), generator=g, dtype=torch.int32)
    scores[0, 0, 0] = 0  # all ties
    scores[0, 0, 1, ::2], scores[0, 0, 1, 1::2] = big, -big  # differences far beyond the exp clamp
    scores[0, 1, 2] = torch.arange(T, dtype=torch.int32) * (-sm.x0)  # differences at exact multiples of ln2
    scores[0, 1, 3] = torch.arange(T, dtype=torch.int32) * (-sm.x0) - 1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 25:] = False  # padding
    mask[2, 1:] = False  # one visible key
    visible = mask[:, None, None, :]
    want = p_rq(sm(scores.to(INT), visible))
    got = kernels.int_softmax_requant(scores, mask, sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS,
                                      sm.NUM_BITS, int(p_rq.m), int(p_rq.e), p_rq.lo, p_rq.hi)
    assert torch.equal(got.to(INT), want)
    assert (got[2, :, :, 0] == 127).all() and (got[2, :, :, 1:] == 0).all()  # the one visible key takes probability 1


@pytest.mark.parametrize("T, H, threads", [(17, 4, 2), (40, 4, 1), (40, 5, 2), (17, 5, 4)])
def test_fused_attention_equals_the_reference(kernels, simd, T, H, threads):
    """The attention kernel (``q k^T`` and ``p v`` on int8 codes by oneDNN's matmul primitive batched over a group of
    heads, the i-softmax between them, the context onto the next grid) against the reference operators and integer
    einsums, with padded keys, one example with a single visible key, and codes at +-127; on 1, 2 and 4 threads, so
    that the heads run in one group, in equal groups and in unequal ones (5 heads as 3 + 2), and each example alone."""
    g = torch.Generator().manual_seed(3)
    B, d = 3, 32
    D, N = H * d, B * T
    acc = [torch.randint(-2 ** 18, 2 ** 18, (N, D), generator=g, dtype=torch.int32) for _ in range(3)]
    acc[0][:T] = 2 ** 24  # the query codes of example 0 at the clamp
    bias = [torch.randint(-2 ** 12, 2 ** 12, (D,), generator=g, dtype=INT) for _ in range(3)]
    rqs = [Requantize(torch.rand(D, generator=g, dtype=torch.float64) * 2e-4 + 1e-5, 0.05, -127, 127),
           Requantize(3e-4 / 0.05, 1.0, -127, 127), Requantize(torch.rand(D, generator=g, dtype=torch.float64) * 1e-4 + 1e-5, 0.02, -127, 127)]
    sm = IntSoftmax(2e-3)
    p_rq = Requantize(sm.scale_out, 1 / 127, 0, 127)
    o_rq = Requantize(1 / 127 * 0.02, 0.01, -127, 127)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 2:] = False  # padding
    mask[2, 1:] = False  # one visible key
    q, k, v = (r(a.to(INT) + b_).reshape(B, T, H, d) for r, a, b_ in zip(rqs, acc, bias))
    scores = torch.einsum("bthd,bshd->bhts", q, k)  # integer einsum: no float
    probs = p_rq(sm(scores, mask[:, None, None, :]))
    want = o_rq(torch.einsum("bhts,bshd->bthd", probs, v)).reshape(N, D)
    codes = [x.reshape(N, D).to(torch.int8) for x in (q, k, v)]
    sm_args = [sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS, sm.NUM_BITS, int(p_rq.m), int(p_rq.e), 0, 127]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.int_attention(*codes, mask, B, H, sm_args, int(o_rq.m), int(o_rq.e), -127, 127)
        alone = [kernels.int_attention(*(c[b * T:(b + 1) * T] for c in codes), mask[b:b + 1].contiguous(), 1, H, sm_args,
                                       int(o_rq.m), int(o_rq.e), -127, 127) for b in range(B)]
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.int8 and got.shape == (N, D)
    assert torch.equal(got.to(INT), want)
    assert torch.equal(torch.cat(alone).to(INT), want)
    assert want.abs().max() == 127 and (probs[2, :, :, 0] == 127).all()  # the clamp and the single key are reached
    assert q.abs().max() == 127  # query codes at the clamp
    with pytest.raises(RuntimeError, match=f"int_attention: D = {D} is not a multiple of heads = 3"):
        kernels.int_attention(*codes, mask, B, 3, sm_args, int(o_rq.m), int(o_rq.e), -127, 127)


def test_embedding_sum_equals_the_torch_gathers(kernels):
    """The embedding kernel against torch indexing and sums in int64, for each kind of word table (int32, int64, and
    uint8 codes with a shared or per-row level table), with the clamp reached; bad ids give one-line errors."""
    g = torch.Generator().manual_seed(5)
    V, D, P, B, T, clamp = 50, 24, 16, 3, 11, 2 ** 20
    ids = torch.randint(0, V, (B, T), generator=g)
    tt = torch.randint(0, 2, (B, T), generator=g)
    pos = torch.randint(-2 ** 19, 2 ** 19, (P, D), generator=g)
    tok = torch.randint(-2 ** 19, 2 ** 19, (2, D), generator=g)
    codes = torch.randint(0, 4, (V, D), generator=g, dtype=torch.uint8)
    word64 = torch.randint(-2 ** 21, 2 ** 21, (V, D), generator=g)
    for lut_rows in (1, V):
        lut = torch.randint(-2 ** 20, 2 ** 20, (lut_rows, 4), generator=g)
        rows = lut[0][codes.long()] if lut_rows == 1 else torch.gather(lut, 1, codes.long())
        for word, args in ((rows, (codes, lut, None)), (word64, (None, None, word64)), (word64.int(), (None, None, word64.int()))):
            want = torch.clamp(word[ids] + pos[:T] + tok[tt], -clamp, clamp).reshape(B * T, D)
            got = kernels.int_embedding(ids, tt, *args, pos, tok, clamp)
            assert got.dtype == torch.int32 and torch.equal(got.to(INT), want)
            assert want.abs().max() == clamp
    with pytest.raises(RuntimeError, match=f"int_embedding: token id {V} out of range; allowed: 0..{V - 1}"):
        kernels.int_embedding(torch.full((1, 3), V), torch.zeros(1, 3, dtype=torch.long), None, None, word64, pos, tok, clamp)
    with pytest.raises(RuntimeError, match="int_embedding: token type 2 out of range; allowed: 0..1"):
        kernels.int_embedding(ids, torch.full((B, T), 2), None, None, word64, pos, tok, clamp)
    with pytest.raises(RuntimeError, match=f"int_embedding: sequence length 17 > {P} positions"):
        kernels.int_embedding(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 17, dtype=torch.long), None, None, word64, pos, tok, clamp)


def test_packed_weights_multiply_like_int_mm(kernels):
    """oneDNN's matmul on weights packed once (``PackedS8``, the engine's Linears) equals ``torch._int_mm`` and an
    int64 product, for row counts from 1 to 1000 (one primitive each, on one packed layout), odd widths, codes at
    both ends of int8, and more row counts than its primitive cache keeps; bad inputs give one-line errors."""
    g = torch.Generator().manual_seed(11)
    for K, N in ((384, 1536), (37, 19)):
        w = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8)
        w[0], w[1] = 127, -128
        packed = torch.classes.kdlsq.PackedS8(w)
        assert packed.nbytes() >= K * N and packed.impl()
        for M in (1, 7, 128, 1000):
            x = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
            x[0] = -128
            want = x.to(INT) @ w.to(INT)
            assert torch.equal(packed.mm(x, None).to(INT), want)
            out = torch.empty(M, N, dtype=torch.int32)
            assert packed.mm(x, out).data_ptr() == out.data_ptr() and torch.equal(out.to(INT), want)
            if M >= 17:
                assert torch.equal(packed.mm(x, None), torch._int_mm(x, w))
    small = torch.classes.kdlsq.PackedS8(w[:5, :3].contiguous())  # more row counts than the 256 primitives it keeps
    for M in range(1, 300):
        x = torch.randint(-128, 128, (M, 5), generator=g, dtype=torch.int8)
        assert torch.equal(small.mm(x, None).to(INT), x.to(INT) @ w[:5, :3].to(INT))
    with pytest.raises(RuntimeError, match=r"PackedS8.mm: input must be int8 \[M, 37\]"):
        packed.mm(torch.zeros(4, 36, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="PackedS8.mm: input must be int8"):
        packed.mm(torch.zeros(4, 37, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"PackedS8.mm: out must be contiguous int32 \[4, 19\]"):
        packed.mm(torch.zeros(4, 37, dtype=torch.int8), torch.empty(4, 20, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="PackedS8: weights must be a 2-D int8 CPU tensor"):
        torch.classes.kdlsq.PackedS8(torch.zeros(3, 4))


def test_fused_layernorm_writes_the_codes_of_its_output(kernels, simd):
    """The LayerNorm kernel's extra int8 outputs equal ``Requantize`` of its int32 output onto each grid."""
    g = torch.Generator().manual_seed(7)
    N, C = 24, 96
    ln = IntLayerNorm(torch.rand(C, generator=g) + 0.5, torch.rand(C, generator=g) - 0.5, 2.0 ** -18)
    h = torch.randint(-2 ** 22, 2 ** 22, (N, C), generator=g, dtype=torch.int32)
    grids = [Requantize(2.0 ** -18, 0.04, -127, 127), Requantize(2.0 ** -18, 0.3, -7, 7), Requantize(2.0 ** -18, 3e-6, -127, 127)]
    codes = [torch.empty(N, C, dtype=torch.int8) for _ in grids]
    flat = [int(x) for r in grids for x in (r.m, r.e, r.lo, r.hi)]
    out = kernels.int_residual_layernorm(torch.zeros(N, C, dtype=torch.int32), torch.zeros(C, dtype=INT), torch.ones(1, dtype=INT),
                                         torch.zeros(1, dtype=INT), h, 1, 0, 2 ** 23, ln.gamma_int, ln.beta_int, ln.NORM_BITS,
                                         int(ln.requant.m), int(ln.requant.e), None, flat, codes)
    assert torch.equal(out.to(INT), ln(h.to(INT)))
    for r, c in zip(grids, codes):
        assert torch.equal(c.to(INT), r(out.to(INT)))
    assert codes[2].abs().max() == 127 and codes[1].abs().max() == 7  # the clamps are reached
    with pytest.raises(RuntimeError, match="4 requantization constants per code tensor"):
        kernels.int_residual_layernorm(torch.zeros(N, C, dtype=torch.int32), torch.zeros(C, dtype=INT), torch.ones(1, dtype=INT),
                                       torch.zeros(1, dtype=INT), h, 1, 0, 2 ** 23, ln.gamma_int, ln.beta_int, ln.NORM_BITS,
                                       int(ln.requant.m), int(ln.requant.e), None, flat[:4], codes)


def test_fused_requant_equals_the_reference_on_edge_inputs(kernels, simd):
    """int32 products at the ends of their range, biases far beyond int32, per-channel and scalar multipliers with
    right and left shifts: the kernel equals ``Requantize`` of ``x + bias`` in int64, integer for integer; so does
    ``int_requant_split``, which writes column blocks into separate tensors."""
    g = torch.Generator().manual_seed(4)
    N, C = 33, 96
    x = torch.randint(-2 ** 31, 2 ** 31 - 1, (N, C), generator=g, dtype=torch.int64)
    x[0], x[1], x[2, ::2] = 2 ** 31 - 1, -2 ** 31, 0
    x = x.to(torch.int32)
    bias = torch.randint(-2 ** 40, 2 ** 40, (C,), generator=g, dtype=INT)
    scales = [torch.rand(C, generator=g, dtype=torch.float64) * 1e-6 + 1e-9, 3.7e-4, 5.0]  # per channel; e > 0; e < 0
    for scale_in in scales:
        for lo, hi, int8 in ((-127, 127, True), (-2 ** 40, 2 ** 40, False)):
            rq = Requantize(scale_in, 0.01, lo, hi)
            want = rq(x.to(INT) + bias)
            got = kernels.int_requant(x, bias, rq.m.reshape(-1), rq.e.reshape(-1), lo, hi, int8)
            assert got.dtype == (torch.int8 if int8 else INT)
            assert torch.equal(got.to(INT), want)
            if int8:  # the same rows as three column blocks of 32, each into its own tensor (a fused q/k/v product)
                blocks = [torch.full((N, C // 3), 99, dtype=torch.int8) for _ in range(3)]
                kernels.int_requant_split(x, bias, rq.m.reshape(-1).expand(C).contiguous(), rq.e.reshape(-1).expand(C).contiguous(),
                                          lo, hi, blocks)
                assert torch.equal(torch.cat(blocks, dim=1).to(INT), want)
    with pytest.raises(RuntimeError, match="int_requant_split: 96 columns do not split into 5 blocks"):
        kernels.int_requant_split(x, bias, rq.m.reshape(-1), rq.e.reshape(-1), -127, 127, [torch.empty(N, 19, dtype=torch.int8)] * 5)
    with pytest.raises(RuntimeError, match=r"int_requant_split: each out must be a contiguous int8 tensor of shape \[33, 48\]"):
        kernels.int_requant_split(x, bias, rq.m.reshape(-1), rq.e.reshape(-1), -127, 127, [torch.empty(N, 48, dtype=torch.int32)] * 2)


@pytest.mark.parametrize("s_g", [2.0 ** -14, 4e-6])
def test_fused_gelu_equals_the_reference_on_edge_inputs(kernels, simd, s_g):
    """The GELU kernel (requantization onto the GELU scale, i-GELU, requantization onto the next grid) against the
    reference operators, over inputs that reach the clamp, the polynomial's flat end ``|q| >= -b_int`` and zero."""
    from kdlsq_pl.integer.ops import IntGELU
    g = torch.Generator().manual_seed(5)
    N, C, act_bits = 40, 128, 20
    acc = torch.randint(-2 ** 26, 2 ** 26, (N, C), generator=g, dtype=torch.int32)
    acc[0], acc[1], acc[2] = 2 ** 31 - 1, -2 ** 31, 0
    bias = torch.randint(-2 ** 20, 2 ** 20, (C,), generator=g, dtype=INT)
    scale_acc = torch.rand(C, generator=g, dtype=torch.float64) * 1e-6 + 1e-7
    g_rq = Requantize(scale_acc, s_g, -2 ** (act_bits + 1), 2 ** (act_bits + 1))
    gelu = IntGELU(s_g)
    n_rq = Requantize(gelu.scale_out, 0.05, -127, 127, in_bits=gelu.out_bits(act_bits + 2))
    want = n_rq(gelu(g_rq(acc.to(INT) + bias)))
    assert want.min() == -127 or want.max() == 127  # the inputs reach the output clamp
    got = kernels.int_gelu_requant(acc, bias, g_rq.m.reshape(-1), g_rq.e.reshape(-1), g_rq.hi, gelu.b_int, gelu.c_int, gelu.shift,
                                   gelu.one, int(n_rq.m), int(n_rq.e), n_rq.lo, n_rq.hi)
    assert torch.equal(got.to(INT), want)


@pytest.mark.parametrize("s_t", [1e-3, 4e-6])
def test_fused_tanh_equals_the_reference_sigmoid_pair(kernels, s_t):
    """``int_tanh`` (the pooler's tanh as 2 sigmoid(2x) - 1, the sigmoid a two-way i-softmax) against
    ``2 IntSoftmax([x, 0])[0] - 2^15`` integer for integer, over a dense range past the exp's clamp at 30 ln2 and
    the 2^21 clamp of the engine's tanh input, and within 0.01 of ``math.tanh`` (I-BERT's exp polynomial is good to
    about 2e-3 relative; the 15-bit output adds 2^-15)."""
    import math
    sm = IntSoftmax(2.0 * s_t, out_bits=15, max_len=2)
    reach = 2 ** 21
    x = torch.cat([torch.arange(-reach, reach + 1, 997, dtype=INT), torch.arange(-3000, 3001, dtype=INT),
                   torch.tensor([0, 1, -1, reach, -reach, sm.N_CLAMP * sm.x0, sm.N_CLAMP * sm.x0 - 1, -sm.N_CLAMP * sm.x0 + 1])])
    want = 2 * sm(torch.stack([x, torch.zeros_like(x)], dim=-1))[..., 0] - 2 ** 15
    x = x[: x.numel() // 4 * 4]
    want = want[: x.numel()]
    got = kernels.int_tanh(x.reshape(-1, 4), sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS,
                           sm.NUM_BITS)
    assert got.shape == (x.numel() // 4, 4) and torch.equal(got.reshape(-1), want)
    err = max(abs(int(g) * 2.0 ** -15 - math.tanh(float(v) * s_t)) for g, v in zip(got.reshape(-1), x))
    assert err < 0.01, err
    with pytest.raises(RuntimeError, match="int_tanh: x0 = 5"):
        kernels.int_tanh(x, 5, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS, sm.NUM_BITS)


def test_fused_kernels_write_into_a_given_out(kernels):
    """Each fused op given ``out`` writes its result there (the same integers as a new tensor) and refuses an ``out``
    of another shape, dtype or layout with a message naming the op."""
    g = torch.Generator().manual_seed(6)
    N, C = 16, 64
    x = torch.randint(-2 ** 20, 2 ** 20, (N, C), generator=g, dtype=torch.int32)
    bias = torch.randint(-2 ** 10, 2 ** 10, (C,), generator=g, dtype=INT)
    rq = Requantize(1e-3, 0.05, -127, 127)
    args = (x, bias, rq.m.reshape(-1), rq.e.reshape(-1), -127, 127, True)
    want = kernels.int_requant(*args)
    out = torch.full((N, C), 99, dtype=torch.int8)
    assert kernels.int_requant(*args, out).data_ptr() == out.data_ptr() and torch.equal(out, want)
    for bad in (torch.empty(N, C, dtype=torch.int32), torch.empty(N, C + 1, dtype=torch.int8), torch.empty(C, N, dtype=torch.int8).t()):
        with pytest.raises(RuntimeError, match="int_requant: out must be a contiguous"):
            kernels.int_requant(*args, bad)
    ln = IntLayerNorm(torch.ones(C), torch.zeros(C), 2.0 ** -10)
    h = torch.randint(-2 ** 20, 2 ** 20, (N, C), generator=g, dtype=torch.int32)
    ln_args = (x, bias, rq.m.reshape(-1), rq.e.reshape(-1), h, 1, 0, 2 ** 23, ln.gamma_int, ln.beta_int, ln.NORM_BITS,
               int(ln.requant.m), int(ln.requant.e))
    want = kernels.int_residual_layernorm(*ln_args, None, [], [])
    out = torch.zeros(N, C, dtype=torch.int32)
    assert kernels.int_residual_layernorm(*ln_args, out, [], []).data_ptr() == out.data_ptr() and torch.equal(out, want)
    with pytest.raises(RuntimeError, match="int_residual_layernorm: out must be"):
        kernels.int_residual_layernorm(*ln_args, torch.zeros(N, C, dtype=torch.int64), [], [])


def test_simd_rows_equal_the_compiler_rows_where_their_bounds_fail(kernels):
    """Constants the engine never builds but the ops accept, each at the edge of a bound of the AVX-512 rows (a
    one-level ln2 step ``x0 = -1``, negative exp values, a GELU polynomial whose ``y + one`` passes 2^31): the
    kernels must give the compiler rows' integers (and the reference's) with the AVX-512 rows allowed."""
    def both(f):
        before = kernels.set_simd(True)
        try:
            fast = f()
            kernels.set_simd(False)
            plain = f()
        finally:
            kernels.set_simd(before)
        return fast, plain

    one_rq = Requantize(1.0, 1.0, 0, 127)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for x0, b_int, c_int, n_clamp, scores in ((-1, 10, 0, 30, [0, -2]), (-4, 4, -100, 4, [0, -9])):
        sm = IntSoftmax(1e-3)
        sm.x0, sm.b_int, sm.c_int, sm.widen, sm.out_bits, sm.N_CLAMP, sm.SUM_BITS, sm.NUM_BITS = x0, b_int, c_int, 0, 8, n_clamp, 8, 16
        s = torch.tensor(scores, dtype=torch.int32).reshape(1, 1, 1, 2)
        want = torch.clamp(one_rq(sm(s.to(INT), mask[:, None, None, :])), 0, 127)
        fast, plain = both(lambda: kernels.int_softmax_requant(s, mask, x0, b_int, c_int, 0, 8, n_clamp, 8, 16, int(one_rq.m),
                                                               int(one_rq.e), 0, 127))
        assert torch.equal(fast, plain) and torch.equal(fast.to(INT), want)
    from kdlsq_pl.integer.ops import IntGELU
    gelu = IntGELU(1e-3)
    gelu.b_int, gelu.c_int, gelu.shift, gelu.one = -2 ** 20, 2 ** 40, 10, 2 ** 29
    acc = torch.tensor([[1, -1, 0, 5]], dtype=torch.int32)
    ident = Requantize(1.0, 1.0, -2 ** 20, 2 ** 20)
    n_rq = Requantize(1.0, 1.0, -127, 127)
    want = n_rq(gelu(ident(acc.to(INT))))
    fast, plain = both(lambda: kernels.int_gelu_requant(acc, torch.zeros(4, dtype=INT), ident.m.reshape(-1), ident.e.reshape(-1),
                                                        2 ** 20, gelu.b_int, gelu.c_int, gelu.shift, gelu.one, int(n_rq.m),
                                                        int(n_rq.e), -127, 127))
    assert torch.equal(fast, plain) and torch.equal(fast.to(INT), want)


def test_fused_kernels_refuse_inverted_clamps_and_empty_shapes_run(kernels):
    x = torch.zeros(4, 0, dtype=torch.int32)
    rq = Requantize(1.0, 1.0)
    assert kernels.int_requant(x, None, rq.m.reshape(-1), rq.e.reshape(-1), -127, 127, True).shape == (4, 0)
    with pytest.raises(RuntimeError, match="int_requant: lo = 10 > hi = 0"):
        kernels.int_requant(torch.ones(2, 8, dtype=torch.int32), None, rq.m.reshape(-1), rq.e.reshape(-1), 10, 0, True)
    C = 8
    ln = IntLayerNorm(torch.ones(C), torch.zeros(C), 2.0 ** -10)
    with pytest.raises(RuntimeError, match="allowed: 0 <= res_clamp <= 2"):
        kernels.int_residual_layernorm(torch.zeros(2, C, dtype=torch.int32), torch.zeros(C, dtype=INT), torch.ones(1, dtype=INT),
                                       torch.zeros(1, dtype=INT), torch.ones(2, C, dtype=torch.int32), 1, 0, -1, ln.gamma_int,
                                       ln.beta_int, ln.NORM_BITS, int(ln.requant.m), int(ln.requant.e), None, [], [])
    q8 = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int_attention: heads = 0 and B = 2; allowed: both >= 1"):
        kernels.int_attention(q8, q8, q8, torch.ones(2, 2, dtype=torch.bool), 2, 0, [-100, 1, 1, 0, 16, 30, 24, 48, 1, 0, 0, 127], 1, 0, -127, 127)
