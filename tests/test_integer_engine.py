"""The integer engine built from a quantized MiniLM: integer-only, Linears equal to hand integer products, close to
the fake-quantized student, unsupported students refused."""

from __future__ import annotations

import pytest
import torch

from conftest import GLUE
from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.integer.engine import IntegerEngine, IntLinear
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.quant.modules import quantize_
from test_integer_ops import NoFloat
from test_quant_insert import quant_cfg


@pytest.fixture(scope="module")
def batches(minilm_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [line.split("\t") for line in (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:25]]
    return [dict(tok([r[1] for r in rows[i:i + 8]], [r[2] for r in rows[i:i + 8]], padding=True, truncation=True,
                     max_length=128, return_tensors="pt")) for i in range(0, 24, 8)]


def quantized_student(minilm_path, batches, name="w8a8", per_channel=False):
    torch.manual_seed(0)
    student = load_classifier(minilm_path, {"labels": ["a", "b"]}, ATTN_IMPLEMENTATION)
    cfg = quant_cfg(name)
    cfg["weight"]["per_channel"] = per_channel
    quantize_(student, cfg)
    calibrate(student, batches[:1])
    return student.eval()


@pytest.fixture(scope="module")
def w8(minilm_path, batches):
    student = quantized_student(minilm_path, batches)
    return student, IntegerEngine.from_student(student, batches[:2])


def test_engine_runs_no_floating_point_op(w8, batches):
    _, engine = w8
    b = batches[2]
    with NoFloat():
        logits = engine(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert logits.dtype == torch.int64 and logits.shape == (8, 2)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int_linear_equals_the_integer_product_by_hand(minilm_path, batches, per_channel):
    student = quantized_student(minilm_path, batches, "w2a8", per_channel)
    lin = student.bert.encoder.layer[1].intermediate.dense
    s_x = 1e-3
    x = torch.randint(-40000, 40000, (5, 7, 384), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    got = IntLinear(lin, s_x)(x)
    # by hand: input codes round(x s_x / s_a) clamped to +-127; weight codes round(W / s_w) in {-1, 0, 1} at 2 bits;
    # bias round(b / (s_a s_w)); the product in int64
    s_a = float(lin.input_quantizer.step_size)
    s_w = lin.weight_quantizer.step_size.double().reshape(-1, 1) if per_channel else float(lin.weight_quantizer.step_size)
    xc = torch.clamp(torch.floor(x.double() * s_x / s_a + 0.5), -127, 127).long()
    wc = torch.clamp(torch.round(lin.weight.double() / s_w), -1, 1).long()
    assert set(wc.unique().tolist()) <= {-1, 0, 1}
    bias = torch.round(lin.bias.double() / (s_a * torch.as_tensor(s_w, dtype=torch.float64).reshape(-1))).long()
    want = torch.matmul(xc, wc.t()) + bias
    assert torch.equal(got, want)


def test_engine_tracks_the_fake_quantized_student(w8, batches):
    """Layer by layer the integer hidden states stay close to the student's float ones (relative RMS error); the
    differences are I-BERT's polynomial GELU and exp and the codes they flip."""
    student, engine = w8
    b = batches[2]
    with torch.no_grad():
        ref = student(**b, output_hidden_states=True)
    logits, hidden = engine(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=True)
    m = b["attention_mask"].bool()
    rel = [float((h.double() * s - r.double())[m].norm() / r.double()[m].norm())
           for h, s, r in zip(hidden, engine.hidden_scales, ref.hidden_states)]
    assert rel[0] < 1e-3  # the embedding sum and its LayerNorm: integer tables, no polynomial
    assert rel[1] < 0.06 and max(rel) < 0.45
    assert logits.shape == ref.logits.shape


def test_engine_refuses_what_it_cannot_run(minilm_path, batches):
    student = load_classifier(minilm_path, {"labels": ["a", "b"]}, ATTN_IMPLEMENTATION)
    cfg = quant_cfg("w2a8")
    cfg["weight"]["quantizer"] = "twn"
    quantize_(student, cfg)
    with pytest.raises(ConfigError, match="needs an LSQ quantizer"):
        IntegerEngine.from_student(student.eval(), batches[:1])
    with pytest.raises(ConfigError, match="is not quantized"):
        IntegerEngine.from_student(load_classifier(minilm_path, {"labels": ["a", "b"]}).eval(), batches[:1])


def test_integer_ops_option_swaps_gelu_and_softmax(minilm_path, batches):
    from kdlsq_pl.integer.ops import IBertGELU, ibert_softmax
    from kdlsq_pl.models.attention import capture_attention_scores
    torch.manual_seed(0)
    student = load_classifier(minilm_path, {"labels": ["a", "b"]}, ATTN_IMPLEMENTATION)
    quantize_(student, quant_cfg("w8a8") | {"integer_ops": True})
    assert [n for n, m in student.named_modules() if isinstance(m, IBertGELU)] == [
        f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(6)]
    calibrate(student, batches[:1])
    student.eval()
    b = batches[0]
    with torch.no_grad(), capture_attention_scores() as scores:
        out = student(**b, output_attentions=True)
    # the probabilities the student used: the probability quantizer applied to I-BERT's softmax of its scores
    pq = student.bert.encoder.layer[0].attention.self.kdlsq_act_quant["probs"]
    visible = b["attention_mask"].bool()[:, None, None, :]
    with torch.no_grad():
        assert torch.equal(out.attentions[0], pq(ibert_softmax(scores[0], visible)))


@pytest.mark.parametrize("name, per_channel, qkv_apart", [("w8a8", False, True), ("w2a8", True, False)])
def test_fused_kernels_give_the_reference_integers(minilm_path, batches, name, per_channel, qkv_apart):
    """The fused path (C++ kernels, oneDNN products) against the torch reference operators on real RTE batches, logits
    and every hidden state. Calibrated, the query, key and value Linears share one input step size and run as one
    product; with the key's step size moved apart (as training moves them) they run as three."""
    from kdlsq_pl.kernels import integer_kernels
    if integer_kernels() is None:
        from kdlsq_pl.kernels import cpu_kernels
        assert cpu_kernels() is None, "the integer kernels did not build where the training kernels do (see the warning)"
        pytest.skip("the C++ kernels cannot be built here")
    student = quantized_student(minilm_path, batches, name, per_channel)
    if qkv_apart:
        with torch.no_grad():
            for layer in student.bert.encoder.layer:
                layer.attention.self.key.input_quantizer.scale.mul_(1.01)
    ref = IntegerEngine.from_student(student, batches[:2], fused=False)
    fused = IntegerEngine.from_student(student, batches[:2], fused=True)
    assert ref.kernels is None and fused.kernels is not None
    assert all((L.qkv is None) == qkv_apart for L in fused.layers)
    for b in batches:  # padded batches of real RTE pairs
        with NoFloat():  # both paths integer-only
            lr, hr = ref(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=True)
            lf, hf = fused(b["input_ids"], b["attention_mask"], b["token_type_ids"], output_hidden_states=True)
        assert torch.equal(lr, lf) and all(torch.equal(x, y) for x, y in zip(hr, hf))
    # without hidden states every intermediate lives in reused workspace buffers: calls on batches of other lengths
    # in turn (the buffers regrow and shrink) give the reference logits, and leave earlier results untouched
    _, kept = fused(**{k: batches[0][k] for k in ("input_ids", "attention_mask", "token_type_ids")}, output_hidden_states=True)
    kept_copy = [h.clone() for h in kept]
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    for b in batches + batches[::-1]:
        args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
        logits = fused(*args)
        assert torch.equal(logits, ref(*args))
    assert all(torch.equal(x, y) for x, y in zip(kept, kept_copy))


@pytest.mark.parametrize("per_channel", [False, True])
def test_low_bit_word_table_is_codes_and_a_lookup_of_the_same_integers(minilm_path, batches, per_channel):
    """At <= 4 bits the engine keeps the word embeddings as codes plus each row's table of level values: its rows equal
    round(code * s / s_e) computed by hand from the float weights; one byte per entry (the int64 table's eighth) plus
    Q_N + Q_P + 1 level values per row."""
    student = quantized_student(minilm_path, batches, "w2a8", per_channel)
    engine = IntegerEngine.from_student(student, batches[:1])
    emb = student.bert.embeddings.word_embeddings
    q = emb.weight_quantizer
    s = q.step_size.detach().double().reshape(-1, 1)
    w = emb.weight.detach().double()
    ids = torch.cat([b["input_ids"].reshape(-1) for b in batches] + [torch.tensor([0, w.shape[0] - 1])])
    by_hand = torch.round(torch.clamp(torch.round(w[ids] / s[ids if s.shape[0] > 1 else 0]), -q.Q_N, q.Q_P)
                          * s[ids if s.shape[0] > 1 else 0] / engine.embedding_scale).long()
    assert torch.equal(engine._word_rows(ids.reshape(2, -1)).reshape(-1, w.shape[1]), by_hand)
    assert engine.word is None and engine.word_codes.dtype == torch.uint8
    assert engine.word_codes.nbytes == w.numel() and engine.word_lut.shape == (s.shape[0], q.Q_N + q.Q_P + 1)
