"""Encoder-agnostic surgery: tiny randomly initialised BERT, RoBERTa and DistilBERT built offline with
``from_config`` (the MiniLM tokenizer's vocabulary), and DeBERTa refused with a one-line error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import compose_cfg
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION, capture_attention_scores
from kdlsq_pl.models.layout import no_decay_parameter_names
from kdlsq_pl.models.modules import decay_groups
from kdlsq_pl.pipeline import run
from kdlsq_pl.quant.modules import QuantEmbedding, QuantLinear, quantize_
from test_quant_insert import quant_cfg

TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=514, pad_token_id=0, type_vocab_size=1),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}
#: Quantized Linears by hand from each architecture's modeling file: 6 per layer plus the head's pooler-role Linear.
EXPECTED_LINEARS = {
    "bert": [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")] + ["bert.pooler.dense"],
    "roberta": [f"roberta.encoder.layer.{i}.{s}" for i in range(2) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")] + ["classifier.dense"],
    "distilbert": [f"distilbert.transformer.layer.{i}.{s}" for i in range(2) for s in (
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")]
    + ["pre_classifier"],
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_path):
    """``{model_type: directory}`` of tiny two-label classifiers saved with the MiniLM tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for model_type, kw in TINY.items():
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, vocab_size=30522, num_labels=2, **kw)
        model = AutoModelForSequenceClassification.from_config(config)
        path = root / model_type
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
        if model_type != "bert":  # RoBERTa and DistilBERT take no segment ids (their own tokenizers emit none)
            tok_cfg = path / "tokenizer_config.json"
            tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_input_names": ["input_ids", "attention_mask"]}))
        out[model_type] = path
    return out


def _load(path):
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION)


def _batch(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    return dict(tok(["A man plays a guitar on the stage.", "A cat."], ["Someone plays music.", "An animal sleeps."],
                    padding=True, return_tensors="pt"))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_quantize_places_every_quantizer_by_the_models_structure(tiny_dirs, model_type):
    model = _load(tiny_dirs[model_type])
    ins = quantize_(model, quant_cfg("w2a8"))
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(linears) == sorted(EXPECTED_LINEARS[model_type])
    base = model.base_model_prefix
    assert {n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)} == {
        f"{base}.embeddings.word_embeddings", f"{base}.embeddings.position_embeddings"}
    assert type(model.classifier if model_type != "roberta" else model.classifier.out_proj) is nn.Linear  # head stays FP32
    assert len(ins.weight) == 13 + 2 and len(ins.act) == 13 + 4 * 2
    # the attention quantizers sit where transformers' attention interface hands them Q, K, V and P
    seen = []
    for path, q in ins.act.items():
        if ".kdlsq_act_quant." in path:
            q.register_forward_hook(lambda m, i, o, path=path: seen.append((path, tuple(i[0].shape))))
    batch = _batch(tiny_dirs[model_type])
    with capture_attention_scores() as scores:
        logits = model(**batch).logits
    B, T = batch["input_ids"].shape
    assert len(seen) == 2 * 4 and all(shape == ((B, 2, T, 16) if not p.endswith("probs") else (B, 2, T, T)) for p, shape in seen)
    assert len(scores) == 2 and logits.shape == (2, 2) and torch.isfinite(logits).all()
    # 2-bit weights really are ternary {-s, 0, s} in the forward
    lin = model.get_submodule(EXPECTED_LINEARS[model_type][0])
    assert lin.weight_quantizer(lin.weight).unique().numel() <= 3


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_weight_decay_skips_biases_and_layernorms_found_by_type(tiny_dirs, model_type):
    model = _load(tiny_dirs[model_type])
    ln = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert ln and (model_type != "distilbert" or any("sa_layer_norm" in n for n in ln))
    expected = {f"{n}.{p}" for n in ln for p in ("weight", "bias")} | {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert no_decay_parameter_names(model) == expected
    decay, no_decay = decay_groups(model, 1e-4, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert len(no_decay["params"]) == len(expected)


def test_deberta_is_refused_with_one_line_naming_the_model_type(tiny_dirs, tmp_path):
    model = _load(tiny_dirs["deberta-v2"])
    with pytest.raises(ConfigError) as e:
        quantize_(model, quant_cfg("w2a8"))
    msg = str(e.value)
    assert "'deberta-v2'" in msg and "attention interface" in msg and "bert, roberta, distilbert" in msg and "\n" not in msg
    # the student stage refuses it before training a teacher
    cfg = compose_cfg(tmp_path, "task=rte", "quant=w2a8", f"model.name_or_path={tiny_dirs['deberta-v2']}", "trainer.fast_dev_run=true")
    with pytest.raises(ConfigError, match="deberta-v2"):
        run(cfg)
    assert not (tmp_path / "teachers").exists()


@pytest.mark.parametrize("model_type,extra", [("bert", ()), ("roberta", ()), ("distilbert", ("teacher_cache.enabled=true",))])
def test_fast_dev_run_student_on_each_encoder(tiny_dirs, tmp_path, model_type, extra):
    """The whole student stage (smoke teacher, insertion by the callback, distillation, packed export) on real RTE rows."""
    # RTE's default head mean-pools into the classifier (tuned on MiniLM), which RoBERTa and DistilBERT refuse in one
    # line (their heads have no BERT pooler): every encoder takes BERT's [CLS] head here
    cfg = compose_cfg(tmp_path, "task=rte", "quant=w2a8", f"model.name_or_path={tiny_dirs[model_type]}",
                      "task.teacher.pooling=cls", "task.teacher.pooler_dense=true",
                      "data.limit_train_examples=16", "data.limit_eval_examples=16", "data.batch_size=8",
                      "trainer.fast_dev_run=true", *extra)
    record = run(cfg)
    assert record["status"] == "finished" and record["stage"] == "student"
    assert math.isfinite(record["best"]) and 0.0 <= record["best"] <= 100.0
    assert 10 < record["compression_ratio"] < 17  # 2-bit weights and embeddings (tiny models: FP32 head and LayerNorms weigh more)


def test_filter_fn_keeps_the_modules_it_rejects_in_full_precision(tiny_dirs):
    """``filter_fn(module, fqn)`` (torchao's signature): layer 0 left out keeps its 6 Linears as nn.Linear and its
    attention without quantizers; everything else is quantized as without a filter."""
    model = _load(tiny_dirs["bert"])
    seen = []

    def keep(module, fqn):
        seen.append((type(module).__name__, fqn))
        return "layer.0." not in fqn

    ins = quantize_(model, quant_cfg("w2a8"), filter_fn=keep)
    layer0 = model.bert.encoder.layer[0]
    assert all(type(m) is nn.Linear for m in layer0.modules() if isinstance(m, nn.Linear))
    assert not hasattr(layer0.attention.self, "kdlsq_act_quant")
    assert hasattr(model.bert.encoder.layer[1].attention.self, "kdlsq_act_quant")
    assert len(ins.weight) == 15 - 6 and len(ins.act) == 21 - 6 - 4
    assert ("Embedding", "bert.embeddings.word_embeddings") in seen and ("BertSelfAttention", "bert.encoder.layer.0.attention.self") in seen
    assert len(seen) == 2 + 13 + 2  # embeddings, Linears, attention modules: each asked once
