"""Quantizer insertion into the real MiniLM: count, placement, calibration, size, checkpoint round-trip."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import CONF
from kdlsq_pl.callbacks.quantization import StepSizeFreeze, calibrate
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.quant.modules import QuantEmbedding, QuantLinear, model_size_bytes, quantize_, lsq_quantizers

TASK = {"labels": ["entailment", "not_entailment"]}


def quant_cfg(name: str = "w2a8") -> dict:
    with_defaults = OmegaConf.merge(OmegaConf.load(CONF / "quant" / "_lsq.yaml"), OmegaConf.load(CONF / "quant" / f"{name}.yaml"))
    cfg = OmegaConf.to_container(with_defaults, resolve=True)
    cfg.pop("defaults", None)
    return cfg


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def batch(tokenizer):
    return dict(tokenizer(["A man is playing a guitar on the stage tonight.", "A cat."],
                          ["Someone plays music.", "An animal sleeps on the sofa."], padding=True, return_tensors="pt"))


def student(minilm_path):
    torch.manual_seed(0)
    return load_classifier(minilm_path, TASK, attn_implementation=ATTN_IMPLEMENTATION)


def test_count_and_placement(minilm_path):
    model = student(minilm_path)
    ins = quantize_(model, quant_cfg())
    n_layers = model.config.num_hidden_layers
    # weights: 6 Linears per layer + pooler + word and position embeddings
    assert len(ins.weight) == 6 * n_layers + 1 + 2
    # activations: the input of each of those 6*L + 1 Linears, plus Q, K, V, probs per layer
    assert len(ins.act) == 6 * n_layers + 1 + 4 * n_layers
    assert all(q.bits == 2 for q in ins.weight.values()) and all(q.bits == 8 for q in ins.act.values())
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {f"bert.encoder.layer.{i}.{s}" for i in range(n_layers) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")} | {"bert.pooler.dense"}
    assert linears == expected
    assert {n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)} == {
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"}
    # full precision: classifier head, token-type embedding, LayerNorm
    assert type(model.classifier) is nn.Linear and type(model.bert.embeddings.token_type_embeddings) is nn.Embedding
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for n, m in model.named_modules() if "LayerNorm" in n)
    for i in range(n_layers):
        attn = model.bert.encoder.layer[i].attention.self
        assert set(attn.kdlsq_act_quant) == {"query", "key", "value", "probs"}
    # the original parameters are kept (same names, same tensors): HF state-dict keys are a subset
    keys = set(model.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys and "classifier.weight" in keys
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, quant_cfg())


def test_fp32_inserts_nothing_and_w8a8_bits(minilm_path):
    model = student(minilm_path)
    assert not quantize_(model, quant_cfg("fp32")).all()
    model = student(minilm_path)
    ins = quantize_(model, quant_cfg("w8a8"))
    assert {q.bits for q in ins.all().values()} == {8}


def test_calibration_initialises_everything_and_averages(minilm_path, batch):
    model = student(minilm_path)
    quantize_(model, quant_cfg())
    calibrate(model, [batch])
    qs = lsq_quantizers(model)
    assert all(q.is_initialized for q in qs.values())
    one = {n: q.scale.detach().clone() for n, q in qs.items()}
    # averaging over two identical batches gives the same activation step sizes
    for q in qs.values():
        if q.kind == "activation":
            q.reset()
    calibrate(model, [batch, batch])
    for n, q in qs.items():
        torch.testing.assert_close(q.scale.detach(), one[n])
    # the word-embedding clip value equals the LSQ init rule applied to the table (released form alpha = s*Q_P)
    emb_q = model.bert.embeddings.word_embeddings.weight_quantizer
    w = model.bert.embeddings.word_embeddings.weight.detach()
    assert emb_q.scale.item() == pytest.approx((2 * w.abs().mean() / 1.0).item() * 1, rel=1e-5)


def test_quantized_logits_differ_and_w8_is_close(minilm_path, batch):
    ref = student(minilm_path).eval()
    with torch.no_grad():
        fp = ref(**batch).logits
    out = {}
    for name in ("w8a8", "w2a8"):
        model = student(minilm_path).eval()
        model.load_state_dict(ref.state_dict())
        quantize_(model, quant_cfg(name))
        calibrate(model, [batch])
        with torch.no_grad():
            out[name] = model(**batch).logits
    err8, err2 = (out["w8a8"] - fp).abs().max().item(), (out["w2a8"] - fp).abs().max().item()
    assert 0 < err8 < err2


def test_model_size_by_hand(minilm_path):
    model = student(minilm_path)
    quantize_(model, quant_cfg())
    qs = lsq_quantizers(model)
    quantized_numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    total_numel = sum(p.numel() for p in model.parameters()) - len(qs)  # scalar step sizes are not model weights
    size = model_size_bytes(model)
    assert size["fp32_bytes"] == 4 * total_numel
    assert size["size_bytes"] == quantized_numel * 2 / 8 + 4 * (total_numel - quantized_numel) + 4 * len(qs)
    assert 14 < size["compression_ratio"] < 17


LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
MIXED = {"*.embeddings.*": 4, "*.layer.0.*": 4, "*.layer.0.intermediate.*": 8,  # the last matching pattern wins
         "bert.encoder.layer.5.output.dense": 8, "bert.pooler.dense": 32}


def mixed_expected_bits(n_layers: int) -> dict[str, int]:
    """MIXED's weight bits per module, written out by hand."""
    bits = {"bert.embeddings.word_embeddings": 4, "bert.embeddings.position_embeddings": 4, "bert.pooler.dense": 32}
    for i in range(n_layers):
        for s in LAYER_LINEARS:
            bits[f"bert.encoder.layer.{i}.{s}"] = 4 if i == 0 else 2
    bits["bert.encoder.layer.0.intermediate.dense"] = 8
    bits["bert.encoder.layer.5.output.dense"] = 8
    return bits


def test_overrides_put_the_stated_bits_on_exactly_the_matching_modules(minilm_path):
    model = student(minilm_path)
    ins = quantize_(model, quant_cfg() | {"overrides": MIXED})
    expected = mixed_expected_bits(model.config.num_hidden_layers)
    got = {n: getattr(m.weight_quantizer, "bits", 32) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert got == expected
    # the pooler's weight stays FP32 (no weight quantizer), its input is still quantized at act_bits
    assert isinstance(model.bert.pooler.dense.weight_quantizer, nn.Identity) and model.bert.pooler.dense.input_quantizer.bits == 8
    assert "bert.pooler.dense.weight_quantizer" not in ins.weight and len(ins.weight) == len(expected) - 1
    assert all(q.bits == 8 for q in ins.act.values())  # activations keep act_bits


def test_mixed_size_and_average_bits_by_hand(minilm_path):
    model = student(minilm_path)
    quantize_(model, quant_cfg() | {"overrides": MIXED})
    d, vocab, pos, ffn, L = 384, 30522, 512, 1536, 6
    emb = (vocab + pos) * d
    attn, inter, out = 4 * d * d, ffn * d, d * ffn
    # values per bit-width as MIXED states them: 4 bits = embeddings + layer 0's Q, K, V, O and output.dense;
    # 8 bits = layer 0's intermediate.dense + layer 5's output.dense; 2 bits = the rest of layers 1-5
    coded = {4: emb + attn + out, 8: inter + out, 2: (L - 1) * (attn + inter + out) - out}
    pooler = d * d
    total = emb + L * (attn + inter + out) + pooler
    assert sum(coded.values()) + pooler == total
    size = model_size_bytes(model)
    assert size["avg_weight_bits"] == pytest.approx((sum(b * n for b, n in coded.items()) + 32 * pooler) / total, rel=1e-12)
    qs = lsq_quantizers(model)
    rest = sum(p.numel() for p in model.parameters()) - len(qs) - sum(coded.values())  # FP32 values (pooler included)
    assert size["size_bytes"] == sum(b * n / 8 for b, n in coded.items()) + 4 * rest + 4 * len(qs)


def test_override_matching_nothing_is_an_error_naming_it(minilm_path):
    with pytest.raises(ConfigError, match=r"quant.overrides: pattern '\*.layer.6.\*' matches no quantized module"):
        quantize_(student(minilm_path), quant_cfg() | {"overrides": {"*.layer.0.*": 4, "*.layer.6.*": 4}})


def test_step_size_freeze(minilm_path):
    model = student(minilm_path)
    quantize_(model, quant_cfg())

    class T:  # the two trainer attributes the callback reads
        global_step, current_epoch = 5, 0

    class M:
        student = model

    cb = StepSizeFreeze(at_step=5)
    cb.on_train_batch_start(T, M, None, 0)
    assert all(not q.scale.requires_grad for q in lsq_quantizers(model).values())
    assert all(p.requires_grad for n, p in model.named_parameters() if "quantizer" not in n and "kdlsq_act_quant" not in n)


@pytest.mark.parametrize("grad_scale", [False, True])
def test_embedding_row_quantization_equals_table_quantization(grad_scale):
    """QuantEmbedding quantizes only looked-up rows; values and gradients equal quantizing the whole table."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=0)
    ids = torch.tensor([[3, 7, 7, 0], [49, 3, 1, 0]])
    opts = {"grid": "symmetric", "param": "clip", "grad_scale": grad_scale, "ste_clip": False,
            "range_test": "unrounded", "init": "lsq", "percentile": 97.5}
    from kdlsq_pl.quant.modules import make_quantizer
    fast = QuantEmbedding(emb, make_quantizer(2, opts, "weight"))
    ref_q = make_quantizer(2, opts, "weight")
    ref_w = emb.weight.detach().clone().requires_grad_(True)
    upstream = torch.randn(2, 4, 8)
    out = fast(ids)
    (out * upstream).sum().backward()
    ref = torch.nn.functional.embedding(ids, ref_q(ref_w), 0)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fast.weight.grad, ref_w.grad)
    torch.testing.assert_close(fast.weight_quantizer.scale.grad, ref_q.scale.grad)
