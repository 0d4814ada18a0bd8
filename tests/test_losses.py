"""Hand-computed checks for the KDLSQ / TinyBERT distillation loss terms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdlsq_pl.distill.losses import (
    KDLoss,
    attention_score_mse,
    hidden_state_mse,
    layer_map,
    regression_mse,
    soft_cross_entropy,
)

F32_MIN = torch.finfo(torch.float32).min


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def _log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def _soft_ce_entries(s_rows, t_rows, T):
    """Per-(b, c) entries -p_T * log p_S, by explicit loops."""
    out = []
    for s, t in zip(s_rows, t_rows):
        p = _softmax([x / T for x in t])
        lq = _log_softmax([x / T for x in s])
        out.append([-p[c] * lq[c] for c in range(len(s))])
    return out


S_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_LOGITS = [[2.0, 1.0, 0.0], [0.5, 0.5, 1.5]]


# ----------------------------------------------------------------------------- soft CE
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_soft_cross_entropy_mean_matches_hand(T):
    entries = _soft_ce_entries(S_LOGITS, T_LOGITS, T)
    hand_mean = sum(sum(r) for r in entries) / (2 * 3)
    got = soft_cross_entropy(torch.tensor(S_LOGITS), torch.tensor(T_LOGITS), temperature=T)
    assert got.item() == pytest.approx(hand_mean, rel=1e-6)


def test_soft_cross_entropy_known_number():
    # uniform teacher & student over 2 classes: -0.5*log(0.5)*2 per example = log 2; mean over B*C = log(2)/2
    z = torch.zeros(3, 2)
    assert soft_cross_entropy(z, z).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert soft_cross_entropy(z, z, reduction="batchmean").item() == pytest.approx(math.log(2), rel=1e-6)


def test_soft_cross_entropy_batchmean_and_factor_C():
    entries = _soft_ce_entries(S_LOGITS, T_LOGITS, 1.0)
    hand_batchmean = sum(sum(r) for r in entries) / 2
    s, t = torch.tensor(S_LOGITS), torch.tensor(T_LOGITS)
    bm = soft_cross_entropy(s, t, reduction="batchmean")
    m = soft_cross_entropy(s, t, reduction="mean")
    assert bm.item() == pytest.approx(hand_batchmean, rel=1e-6)
    assert bm.item() == pytest.approx(3 * m.item(), rel=1e-6)  # C = 3


def test_soft_cross_entropy_bad_reduction():
    with pytest.raises(ValueError, match=r"'sum'.*mean.*batchmean"):
        soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), reduction="sum")


def test_kdloss_gradients_reach_the_student_only_and_equal_closed_forms():
    """Teacher tensors that require grad (KDLoss must detach them itself) get no gradient; the student's
    gradients equal the closed forms: soft CE (mean over B x C) d/dz_S = (softmax(z_S) - softmax(z_T)) / (B C);
    MSE over N elements d/dh_S = 2 (h_S - h_T) / N per layer (attention entries above the threshold)."""
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 4, 5
    s_logits = torch.tensor(S_LOGITS, requires_grad=True)
    t_logits = torch.tensor(T_LOGITS, requires_grad=True)
    s_hid = [torch.randn(B, T, D, requires_grad=True) for _ in range(3)]
    t_hid = [torch.randn(B, T, D, requires_grad=True) for _ in range(3)]
    s_att = [torch.randn(B, H, T, T, requires_grad=True) for _ in range(2)]
    t_att = [torch.randn(B, H, T, T, requires_grad=True) for _ in range(2)]
    loss = KDLoss(pred=1.0, attn=1.0, hidden=1.0, gt=0.0)
    total, _ = loss({"logits": s_logits, "hidden_states": s_hid, "attention_scores": s_att},
                    {"logits": t_logits, "hidden_states": t_hid, "attention_scores": t_att}, labels=None)
    total.backward()
    assert all(t.grad is None for t in [t_logits, *t_hid, *t_att])
    expected = (torch.softmax(s_logits.detach(), -1) - torch.softmax(t_logits.detach(), -1)) / (2 * 3)
    assert torch.allclose(s_logits.grad, expected, atol=1e-7)
    for s, t in zip(s_hid, t_hid):
        assert torch.allclose(s.grad, 2 * (s.detach() - t.detach()) / s.numel(), atol=1e-7)
    for s, t in zip(s_att, t_att):
        assert torch.allclose(s.grad, 2 * (s.detach() - t.detach()) / s.numel(), atol=1e-7)


# ----------------------------------------------------------------------------- attention
def test_attention_score_mse_threshold_and_float32_min_mask():
    # [B=1, H=1, T=2, T=2]; key 1 masked with float32 min (finite, huge)
    s = torch.tensor([[[[1.0, F32_MIN], [3.0, F32_MIN]]]])
    t = torch.tensor([[[[0.0, F32_MIN], [1.0, F32_MIN + 5.0]]]])
    # masked entries -> 0 in both; remaining diffs: (1-0)^2, (3-1)^2 -> (1 + 4 + 0 + 0) / 4
    got = attention_score_mse([s], [t])
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(5.0 / 4.0, rel=1e-6)


def test_attention_score_mse_independent_threshold_and_layer_sum():
    # entry <= -100 only in the student: student value becomes 0, teacher keeps 2.0
    s1 = torch.tensor([[[[-150.0, 1.0], [2.0, -100.0]]]])  # -100 itself is <= threshold
    t1 = torch.tensor([[[[2.0, 1.0], [0.0, 4.0]]]])
    # zeroed s1 = [0, 1, 2, 0]; diffs^2 = [4, 0, 4, 16] -> 24/4 = 6
    s2 = torch.ones(1, 1, 2, 2)
    t2 = torch.zeros(1, 1, 2, 2)  # 1
    got = attention_score_mse([s1, s2], [t1, t2])
    assert got.item() == pytest.approx(6.0 + 1.0, rel=1e-6)


def test_attention_score_mse_explicit_loops_random():
    g = torch.Generator().manual_seed(0)
    B, H, T = 2, 3, 4
    layers_s = [torch.randn(B, H, T, T, generator=g) for _ in range(2)]
    layers_t = [torch.randn(B, H, T, T, generator=g) for _ in range(2)]
    # pad the last key of batch 0 with the float32-min mask
    for x in layers_s + layers_t:
        x[0, :, :, -1] += F32_MIN
    hand = 0.0
    for s, t in zip(layers_s, layers_t):
        acc = 0.0
        for b in range(B):
            for h in range(H):
                for i in range(T):
                    for j in range(T):
                        sv, tv = float(s[b, h, i, j]), float(t[b, h, i, j])
                        sv = 0.0 if sv <= -100 else sv
                        tv = 0.0 if tv <= -100 else tv
                        acc += (sv - tv) ** 2
        hand += acc / (B * H * T * T)
    got = attention_score_mse(layers_s, layers_t)
    assert got.item() == pytest.approx(hand, rel=1e-5)


def test_attention_score_mse_grad_finite():
    s = torch.tensor([[[[1.0, F32_MIN]]]], requires_grad=True)
    t = torch.tensor([[[[0.5, F32_MIN]]]])
    attention_score_mse([s], [t]).backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 0, 0, 1] == 0


# ----------------------------------------------------------------------------- hidden / regression
def test_hidden_state_mse_hand():
    h_s = [torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])]
    h_t = [torch.tensor([[[1.0, 0.0], [3.0, 5.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])]
    # layer 0: (0 + 4 + 0 + 1)/4 = 1.25; layer 1: (4 + 0 + 0 + 0)/4 = 1.0
    assert hidden_state_mse(h_s, h_t).item() == pytest.approx(2.25, rel=1e-6)


def test_hidden_state_mse_length_mismatch():
    with pytest.raises(ValueError):
        hidden_state_mse([torch.zeros(1, 1, 1)], [torch.zeros(1, 1, 1)] * 2)


def test_regression_mse_shapes():
    target = torch.tensor([1.0, 2.0, 4.0])
    # diffs: 0.5, -1, 1 -> (0.25 + 1 + 1)/3 = 0.75
    assert regression_mse(torch.tensor([[1.5], [1.0], [5.0]]), target).item() == pytest.approx(0.75)
    assert regression_mse(torch.tensor([1.5, 1.0, 5.0]), target).item() == pytest.approx(0.75)


# ----------------------------------------------------------------------------- layer map
def test_layer_map():
    assert layer_map(3, 6) == ([1, 3, 5], [0, 2, 4, 6])
    assert layer_map(6, 6) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6])
    assert layer_map(4, 12) == ([2, 5, 8, 11], [0, 3, 6, 9, 12])
    with pytest.raises(ValueError, match="multiple"):
        layer_map(4, 6)


# ----------------------------------------------------------------------------- KDLoss
def _outputs(logits, n_layers, B=2, H=2, T=3, D=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    att = [torch.randn(B, H, T, T, generator=g) for _ in range(n_layers)]
    hid = [torch.randn(B, T, D, generator=g) for _ in range(n_layers + 1)]
    logits = torch.tensor(logits)
    if requires_grad:
        for x in att + hid + [logits]:
            x.requires_grad_(True)
    return SimpleNamespace(logits=logits, attention_scores=att, hidden_states=hid)


def test_kdloss_classification_all_terms():
    stu = _outputs(S_LOGITS, 2, seed=1, requires_grad=True)
    tea = _outputs(T_LOGITS, 4, seed=2)
    labels = torch.tensor([1, 2])
    loss = KDLoss(pred=1.0, attn=0.5, hidden=2.0, gt=0.25, temperature=2.0)
    total, parts = loss(stu, tea, labels, 2, 4)
    assert set(parts) == {"pred", "attn", "hidden", "gt"}

    hand_pred = sum(sum(r) for r in _soft_ce_entries(S_LOGITS, T_LOGITS, 2.0)) / 6
    assert parts["pred"].item() == pytest.approx(hand_pred, rel=1e-6)
    # gt: -log softmax(s)[label], averaged
    hand_gt = -(_log_softmax(S_LOGITS[0])[1] + _log_softmax(S_LOGITS[1])[2]) / 2
    assert parts["gt"].item() == pytest.approx(hand_gt, rel=1e-6)
    # layer map (2, 4): attention <- teacher [1, 3]; hidden <- teacher [0, 2, 4]
    hand_attn = sum(
        ((s - t) ** 2).mean().item() for s, t in zip(stu.attention_scores, [tea.attention_scores[i] for i in (1, 3)])
    )
    hand_hidden = sum(
        ((s - t) ** 2).mean().item() for s, t in zip(stu.hidden_states, [tea.hidden_states[i] for i in (0, 2, 4)])
    )
    assert parts["attn"].item() == pytest.approx(hand_attn, rel=1e-5)
    assert parts["hidden"].item() == pytest.approx(hand_hidden, rel=1e-5)
    expected_total = 1.0 * hand_pred + 0.5 * hand_attn + 2.0 * hand_hidden + 0.25 * hand_gt
    assert total.item() == pytest.approx(expected_total, rel=1e-5)
    total.backward()
    assert stu.logits.grad is not None and stu.attention_scores[0].grad is not None


def test_kdloss_layer_map_selects_right_teacher_layers():
    tea = _outputs(T_LOGITS, 6, seed=3)
    stu = SimpleNamespace(
        logits=torch.tensor(S_LOGITS),
        attention_scores=[tea.attention_scores[i].clone() for i in (1, 3, 5)],
        hidden_states=[tea.hidden_states[i].clone() for i in (0, 2, 4, 6)],
    )
    _, parts = KDLoss(pred=0.0, attn=1.0, hidden=1.0)(stu, tea, None, 3, 6)
    assert parts["attn"].item() == 0.0 and parts["hidden"].item() == 0.0
    _, parts = KDLoss(pred=0.0, attn=1.0, hidden=1.0)(stu, tea, None, None, None)  # inferred counts
    assert parts["attn"].item() == 0.0 and parts["hidden"].item() == 0.0


def test_kdloss_zero_weight_terms_absent_and_not_needed():
    stu = SimpleNamespace(logits=torch.tensor(S_LOGITS), attention_scores=None, hidden_states=None)
    tea = {"logits": torch.tensor(T_LOGITS)}  # dict form, no attention/hidden at all
    total, parts = KDLoss(pred=1.0, attn=0.0, hidden=0.0, gt=0.0)(stu, tea, None, 6, 6)
    assert set(parts) == {"pred"}
    assert total.item() == pytest.approx(parts["pred"].item())


@pytest.mark.parametrize("field", ["pred", "attn", "hidden", "gt"])
def test_kdloss_negative_weight_raises_with_field(field):
    with pytest.raises(ValueError, match=rf"'{field}'.*-0\.5"):
        KDLoss(**{"pred": 1.0, field: -0.5})


def test_kdloss_bad_options():
    with pytest.raises(ValueError, match="'sum'"):
        KDLoss(pred_reduction="sum")
    with pytest.raises(ValueError, match="'gold'"):
        KDLoss(regression_target="gold")


def test_kdloss_pred_reduction_passthrough():
    stu, tea = SimpleNamespace(logits=torch.tensor(S_LOGITS)), SimpleNamespace(logits=torch.tensor(T_LOGITS))
    _, p_mean = KDLoss(pred=1.0)(stu, tea, None, 1, 1)
    _, p_bm = KDLoss(pred=1.0, pred_reduction="batchmean")(stu, tea, None, 1, 1)
    assert p_bm["pred"].item() == pytest.approx(3 * p_mean["pred"].item(), rel=1e-6)


def test_kdloss_regression_paths():
    stu = SimpleNamespace(logits=torch.tensor([[1.0], [3.0]]))
    tea = SimpleNamespace(logits=torch.tensor([[2.0], [2.0]]))
    labels = torch.tensor([0.0, 5.0])
    # vs label: ((1-0)^2 + (3-5)^2)/2 = 2.5 ; vs teacher: (1 + 1)/2 = 1
    total, parts = KDLoss(pred=1.0, gt=2.0, is_regression=True)(stu, tea, labels, 6, 6)
    assert parts["pred"].item() == pytest.approx(2.5)
    assert parts["gt"].item() == pytest.approx(2.5)
    assert total.item() == pytest.approx(2.5 + 2.0 * 2.5)
    _, parts = KDLoss(pred=1.0, is_regression=True, regression_target="teacher")(stu, tea, labels, 6, 6)
    assert set(parts) == {"pred"}
    assert parts["pred"].item() == pytest.approx(1.0)


def test_kdloss_two_stage_switches_terms_by_epoch():
    """intermediate_epochs=2: epochs 0-1 attn + hidden only (the same values as an attn/hidden-only loss),
    epoch 2 on pred + gt only (the same as a pred/gt-only loss)."""
    stu = _outputs(S_LOGITS, 2, seed=1)
    tea = _outputs(T_LOGITS, 4, seed=2)
    labels = torch.tensor([1, 2])
    staged = KDLoss(pred=1.0, attn=0.5, hidden=2.0, gt=0.25, intermediate_epochs=2)
    inter, _ = KDLoss(pred=0.0, attn=0.5, hidden=2.0, gt=0.0)(stu, tea, labels, 2, 4)
    pred, _ = KDLoss(pred=1.0, attn=0.0, hidden=0.0, gt=0.25)(stu, tea, labels, 2, 4)
    for epoch in (0, 1):
        total, parts = staged(stu, tea, labels, 2, 4, epoch=epoch)
        assert set(parts) == {"attn", "hidden"} and total.item() == inter.item()
    total, parts = staged(stu, tea, labels, 2, 4, epoch=2)
    assert set(parts) == {"pred", "gt"} and total.item() == pred.item()
    _, parts = staged(stu, tea, labels, 2, 4)  # no epoch given: every term
    assert set(parts) == {"pred", "attn", "hidden", "gt"}
    with pytest.raises(ValueError, match="intermediate_epochs > 0 needs an intermediate term"):
        KDLoss(pred=1.0, attn=0.0, hidden=0.0, intermediate_epochs=1)
    with pytest.raises(ValueError, match="intermediate_epochs must be an integer >= 0, got -1"):
        KDLoss(intermediate_epochs=-1)
