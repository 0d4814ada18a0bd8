"""The baselines' quantizers against hand computations, PTQ calibration on real RTE activations, and
every method's student stage (``method=``) on real RTE rows."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import GLUE, compose_cfg
from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.data.tsv import read_glue_tsv
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.pipeline import run
from kdlsq_pl.quant.baselines import DynamicMaxQuantizer, EMAMaxQuantizer, TWNQuantizer, ternarize
from kdlsq_pl.quant.modules import QuantEmbedding, model_size_bytes, quantize_, lsq_quantizers

W = torch.tensor([[0.1, -0.5, 0.9], [-0.05, 0.3, -1.2]])


def test_twn_per_tensor_by_hand():
    # mean|W| = 3.05 / 6; delta = 0.7 * that = 0.355833; entries above: 0.5, 0.9, 1.2 -> alpha = 2.6 / 3
    w_hat, delta, alpha = ternarize(W)
    assert delta.item() == pytest.approx(0.7 * 3.05 / 6) and alpha.item() == pytest.approx(2.6 / 3)
    a = 2.6 / 3
    torch.testing.assert_close(w_hat, torch.tensor([[0.0, -a, a], [0.0, 0.0, -a]]))


def test_twn_per_row_by_hand():
    # row 0: mean 0.5, delta 0.35, kept 0.5, 0.9 -> alpha 0.7; row 1: mean 1.55/3, delta 0.3617, kept 1.2 -> alpha 1.2
    w_hat, delta, alpha = ternarize(W, per_row=True)
    torch.testing.assert_close(delta.flatten(), torch.tensor([0.35, 0.7 * 1.55 / 3]))
    torch.testing.assert_close(alpha.flatten(), torch.tensor([0.7, 1.2]))
    torch.testing.assert_close(w_hat, torch.tensor([[0.0, -0.7, 0.7], [0.0, 0.0, -1.2]]))


def test_twn_straight_through_gradient_and_row_lookup():
    w = W.clone().requires_grad_(True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    TWNQuantizer()(w).backward(g)
    torch.testing.assert_close(w.grad, g)  # identity, as the released TwnQuantizer.backward
    # per-row TWN on looked-up rows equals the looked-up rows of the quantized table
    emb = torch.nn.Embedding(50, 8)
    q = QuantEmbedding(emb, TWNQuantizer(per_row=True))
    ids = torch.tensor([[3, 7, 3], [49, 0, 12]])
    torch.testing.assert_close(q(ids), ternarize(emb.weight.detach(), per_row=True)[0][ids])


def test_ternarybert_clip_zeroes_gradients_outside():
    x = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.2, 2.4, 2.5, 4.0], requires_grad=True)
    q = DynamicMaxQuantizer(8, clip=2.5)
    y = q(x)
    s = 2.5 / 127  # max |clamp(x)| / Q_P
    expected = torch.round(x.detach().clamp(-2.5, 2.5) / s) * s
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    # no clip (Q8BERT weights): the range is the tensor's own max and every gradient passes
    w = torch.tensor([0.3, -1.7, 0.05], requires_grad=True)
    out = DynamicMaxQuantizer(8)(w)
    torch.testing.assert_close(out, torch.round(w.detach() / (1.7 / 127)) * (1.7 / 127))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3))


def test_q8bert_ema_update_rule_and_eval_freeze():
    q = EMAMaxQuantizer(8, decay=0.9).train()
    batches = [torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5]), torch.tensor([-1.0, 0.2])]
    expected = []
    ema = None
    for x in batches:  # first call fills with max|x|, then ema <- ema - (1 - decay) * (ema - max|x|)
        m = x.abs().max().item()
        ema = m if ema is None else ema - 0.1 * (ema - m)
        expected.append(ema)
        y = q(x)
        assert q.ema.item() == pytest.approx(ema)
        s = ema / 127
        torch.testing.assert_close(y, torch.clamp(torch.round(x / s), -127, 127) * s)
    assert expected == pytest.approx([2.0, 2.2, 2.08])
    q.eval()
    big = torch.tensor([100.0, -3.0], requires_grad=True)
    y = q(big)
    assert q.ema.item() == pytest.approx(2.08)  # frozen in eval
    assert y[0].item() == pytest.approx(2.08)  # clamped to the EMA range
    y.sum().backward()
    torch.testing.assert_close(big.grad, torch.ones(2))  # plain STE


def rte_batch(minilm_path, rows: slice) -> dict:
    from transformers import AutoTokenizer
    task = OmegaConf.to_container(compose_cfg(GLUE, "task=rte").task, resolve=True)
    data = read_glue_tsv(GLUE / "RTE" / "train.tsv", task)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    return dict(tok(data["text_a"][rows], data["text_b"][rows], padding=True, truncation=True, max_length=64, return_tensors="pt"))


def ptq_model(minilm_path, init: str):
    cfg = compose_cfg(GLUE, "method=ptq", "quant=w4a8", f"quant.act.init={init}", f"quant.weight.init={init}")
    model = load_classifier(minilm_path, {"labels": ["entailment", "not_entailment"]}, attn_implementation=ATTN_IMPLEMENTATION)
    quantize_(model, OmegaConf.to_container(cfg.quant, resolve=True))
    return model


def capture_inputs(model, names, batches):
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    qs = lsq_quantizers(model)
    hooks = [qs[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone())) for n in names]
    calibrate(model, batches)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("init", ["minmax", "percentile"])
def test_ptq_calibration_ranges_equal_the_calibration_tensors(minilm_path, init):
    model = ptq_model(minilm_path, init)
    batches = [rte_batch(minilm_path, slice(0, 4)), rte_batch(minilm_path, slice(4, 8))]
    names = ["bert.encoder.layer.0.attention.self.query.input_quantizer",
             "bert.encoder.layer.3.output.dense.input_quantizer",
             "bert.encoder.layer.5.attention.self.kdlsq_act_quant.probs"]
    seen = capture_inputs(model, names, batches)
    qs = lsq_quantizers(model)
    for n in names:
        assert len(seen[n]) == 2  # one input per calibration batch
        if init == "minmax":  # the range of all calibration tensors together
            expected = torch.cat([t.flatten() for t in seen[n]]).abs().max()
        else:  # the mean over batches of each batch's |percentile| clip value
            p = qs[n].percentile / 100
            expected = torch.stack([torch.maximum(torch.quantile(t.flatten().double(), p).abs(),
                                                  torch.quantile(t.flatten().double(), 1 - p).abs()) for t in seen[n]]).mean()
        assert qs[n].scale.item() == pytest.approx(expected.item(), rel=1e-5)  # scale holds the clip value alpha
    w = model.bert.encoder.layer[2].intermediate.dense
    if init == "minmax":  # weights: max |W|
        assert w.weight_quantizer.scale.item() == pytest.approx(w.weight.abs().max().item())


def test_baseline_sizes(minilm_path):
    """TernaryBERT W2A8 costs what the LSQ W2A8 student costs, bar the per-row embedding scales."""
    sizes = {}
    for method in ("kdlsq", "ternarybert", "q8bert"):
        cfg = compose_cfg(GLUE, f"method={method}", "quant=w2a8")
        model = load_classifier(minilm_path, {"labels": ["a", "b"]}, attn_implementation=ATTN_IMPLEMENTATION)
        quantize_(model, OmegaConf.to_container(cfg.quant, resolve=True))
        sizes[method] = model_size_bytes(model)
    rows = model.bert.embeddings.word_embeddings.num_embeddings
    n_lsq_scales = 39 + 61  # weight and activation step sizes of the LSQ student, 4 bytes each
    n_twn_scales = 38 + rows  # one per Linear/position table, one per word-embedding row
    diff = sizes["ternarybert"]["size_bytes"] - sizes["kdlsq"]["size_bytes"]
    assert diff == pytest.approx(4 * (n_twn_scales - n_lsq_scales))
    assert 3.9 < sizes["q8bert"]["compression_ratio"] < 4.0  # Q8BERT: "4x smaller"


FAST = ("task=rte", "data.limit_train_examples=32", "data.limit_eval_examples=32", "data.batch_size=16",
        "trainer.fast_dev_run=true", "quant=w2a8")


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    """One fast_dev_run teacher on real RTE rows, shared by the methods below."""
    root = tmp_path_factory.mktemp("store")
    run(compose_cfg(root, *FAST, "stage=teacher"))
    return root / "teachers"


@pytest.mark.parametrize("method", ["ternarybert", "q8bert", "lsq", "ptq"])
def test_each_method_runs_on_real_rte(tmp_path, smoke_store, method, monkeypatch):
    from kdlsq_pl.stages import student as student_stage
    seen = {}
    build_module, build_trainer = student_stage.build_student_module, student_stage.build_trainer
    monkeypatch.setattr(student_stage, "build_student_module", lambda *a, **k: seen.setdefault("module", build_module(*a, **k)))
    monkeypatch.setattr(student_stage, "build_trainer", lambda *a, **k: seen.setdefault("trainer", build_trainer(*a, **k)))
    record = run(compose_cfg(tmp_path, *FAST, f"method={method}", f"teacher.store={smoke_store}"))
    # lsq, q8bert and ptq use no teacher term: no teacher is loaded; ptq takes no training step
    assert (seen["module"].teacher is None) == (method in ("q8bert", "lsq", "ptq"))
    assert (seen["trainer"].global_step == 0) == (method == "ptq")
    assert record["teacher_dir"].startswith(str(smoke_store))
    assert record["status"] == "finished" and record["method"] == method
    # one evaluation (fast_dev_run) of the 32 dev rows in one batch: the recorded accuracy is the final
    # student's, counted by hand one pair at a time (TernaryBERT: as that one batch, its activation ranges being
    # the batch's own maximum)
    from test_stages import hand_dev_accuracy
    hand = hand_dev_accuracy(seen["module"].student, record["teacher_dir"], batched=method == "ternarybert")
    assert record["best"] == pytest.approx(hand, abs=1e-6)
    assert record["quant"] == ("w8a8" if method == "q8bert" else "w2a8")
    assert record["config"]["method"]["name"] == method
    # the minimal-knowledge study's fields: a trained loss without a hidden-state term keeps 0% (TernaryBERT: all)
    if method != "ptq":
        kept = {"ternarybert": ("full", 1.0, "live"), "q8bert": ("none", 0.0, "none"), "lsq": ("none", 0.0, "none")}[method]
        assert (record["hidden_selection"]["name"], record["hidden_fraction"], record["teacher_source"]) == kept
    else:
        assert "hidden_fraction" not in record
    assert 0 < record["size_bytes"] < record["fp32_bytes"]
