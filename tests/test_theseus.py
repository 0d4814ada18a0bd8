"""BERT-of-Theseus (kdlsq_pl/models/theseus.py) on the real MiniLM and a real RTE batch: the replacing rate is the
paper's formula, p = 0 is exactly the predecessor, p = 1 exactly the successor (itself exactly the predecessor's
first layers at initialisation), only successor layers get gradients, and bad layer counts are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import GLUE
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.models.theseus import TheseusEncoder, replacing_rate, successor_model, theseus_


@pytest.fixture(scope="module")
def batch(minilm_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [line.split("\t") for line in (GLUE / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:9]]
    return dict(tok([r[1] for r in rows], [r[2] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt"))


@pytest.fixture(scope="module")
def predecessor(minilm_path):
    torch.manual_seed(0)
    model = load_classifier(minilm_path, {"labels": ["a", "b"]})
    for m in model.modules():  # dropout off, so training-mode forwards are deterministic
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.eval()


def test_replacing_rate_is_the_curriculum_formula():
    # p = min(1, k t + b) by hand: k = 0.0025, b = 0.3
    assert [replacing_rate(t, 0.0025, 0.3) for t in (0, 100, 279, 280, 5000)] == pytest.approx([0.3, 0.55, 0.9975, 1.0, 1.0])
    assert replacing_rate(0, 0.01, 0.1) == pytest.approx(0.1) and replacing_rate(50, 0.01, 0.1) == pytest.approx(0.6)
    assert replacing_rate(12345, 0.0025, 0.3, constant=0.5) == 0.5


def test_encoder_counts_steps_and_draws_one_module_choice_per_batch(predecessor, batch):
    model = copy.deepcopy(predecessor)
    enc = theseus_(model, 3, k=0.1, b=0.2)
    model.train()
    rates = []
    for _ in range(4):
        rates.append(enc.rate)
        model(**batch)
        assert len(enc.last_replaced) == 3
    assert rates == pytest.approx([0.2, 0.3, 0.4, 0.5]) and int(enc.step) == 4
    model.eval()
    model(**batch)
    assert enc.last_replaced == [True, True, True] and int(enc.step) == 4  # eval: the successor alone, no step


def test_p0_is_the_predecessor_and_p1_the_successor_exactly(predecessor, batch):
    with torch.no_grad():
        want_pred = predecessor(**batch).logits
        # the successor at initialisation, by hand: the predecessor with only its first 3 layers
        first3 = copy.deepcopy(predecessor)
        first3.bert.encoder.layer = first3.bert.encoder.layer[:3]
        want_succ = first3(**batch).logits
    never = copy.deepcopy(predecessor)
    theseus_(never, 3, k=0.0, b=0.0, constant=0.0)
    always = copy.deepcopy(predecessor)
    theseus_(always, 3, k=0.0, b=0.0, constant=1.0)
    with torch.no_grad():
        never.train(), always.train()
        assert torch.equal(never(**batch).logits, want_pred)
        assert torch.equal(always(**batch).logits, want_succ)
        always.eval()
        assert torch.equal(always(**batch).logits, want_succ)
        plain = successor_model(always).eval()  # the successor cut out as a plain 3-layer classifier
        assert plain.config.num_hidden_layers == 3 and len(plain.bert.encoder.layer) == 3
        assert torch.equal(plain(**batch).logits, want_succ)
    assert not torch.equal(want_pred, want_succ)  # the two paths differ, so the checks above can fail


def test_only_replaced_successor_layers_get_gradients(predecessor, batch):
    model = copy.deepcopy(predecessor)
    enc = theseus_(model, 3, k=0.0, b=0.0, constant=0.5)
    model.train()
    torch.manual_seed(3)
    while True:  # a batch with some modules replaced and some not
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=torch.tensor([0, 1] * 4))
        if 0 < sum(enc.last_replaced) < 3:
            break
    out.loss.backward()
    frozen = [p for n, p in model.named_parameters() if not n.startswith("bert.encoder.successor.")]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)  # predecessor, embeddings, pooler, classifier
    for i, used in enumerate(enc.last_replaced):
        grads = [p.grad for p in enc.successor[i].parameters()]
        assert all(g is not None for g in grads) if used else all(g is None for g in grads)


def test_successor_layers_must_divide_the_predecessor(predecessor):
    with pytest.raises(ConfigError, match=r"successor_layers=4 does not divide the predecessor's 6 layers; allowed: 1, 2, 3, 6"):
        theseus_(copy.deepcopy(predecessor), 4, k=0.0, b=0.3)
    assert isinstance(theseus_(copy.deepcopy(predecessor), 2, k=0.0, b=0.3), TheseusEncoder)


# --- the shallow students of the paper's baselines and of depth + bits (student.init, student.layers) ---

def test_shallow_student_is_the_pretrained_models_bottom_layers(minilm_path, batch, tmp_path):
    """``student.init=pretrained student.layers=3``: the encoder is the checkpoint's first three layers, read back from
    the safetensors file, and its output is the full pretrained model's hidden state after layer 3 (a peer forward of
    Hugging Face's untouched 6-layer model); the new head pools as the task's teacher recipe."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from conftest import compose_cfg
    from kdlsq_pl.models.loading import init_student

    cfg = compose_cfg(tmp_path, "task=rte", "method=shallow_kd")
    assert cfg.student.init == "pretrained" and cfg.student.layers == 3 and cfg.quant.name == "fp32"
    student = init_student(cfg, teacher_dir="unused: the pretrained checkpoint is read").eval()
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    raw = load_file(f"{minilm_path}/model.safetensors")
    prefix = "" if any(k.startswith("encoder.") for k in raw) else "bert."
    for name, p in student.bert.encoder.named_parameters():
        assert torch.equal(p, raw[f"{prefix}encoder.{name}"]), name
    assert not any(k.startswith(f"{prefix}encoder.layer.3.") for k, _ in student.state_dict().items())
    full = AutoModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = full(**batch, output_hidden_states=True).hidden_states[3]
        got = student.bert(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_student_init_and_layers_refused_in_one_line(tmp_path):
    from conftest import compose_cfg
    from kdlsq_pl.models.loading import init_student

    with pytest.raises(ConfigError, match=r"^student.layers=7 is out of range; allowed: 1..6"):
        init_student(compose_cfg(tmp_path, "task=rte", "method=shallow_kd", "student.layers=7"), teacher_dir="unused")
    with pytest.raises(ConfigError, match=r"^student.init='/nonexistent/successor' is not allowed; allowed: teacher, pretrained or a saved model"):
        init_student(compose_cfg(tmp_path, "task=rte", "student.init=/nonexistent/successor"), teacher_dir="unused")
    from kdlsq_pl.config import validate
    with pytest.raises(ConfigError, match=r"^student.layers=0 is out of range"):
        validate(compose_cfg(tmp_path, "task=rte", "student.layers=0"))
    with pytest.raises(ConfigError, match=r"^student.init='/nonexistent/successor' is not allowed"):  # before any teacher trains
        validate(compose_cfg(tmp_path, "task=rte", "student.init=/nonexistent/successor"))
    with pytest.raises(ConfigError, match=r"^student.init=teacher student.layers=2 do not apply to method=theseus"):
        validate(compose_cfg(tmp_path, "task=rte", "method=theseus", "student.layers=2"))
    with pytest.raises(ConfigError, match=r"^student.layers=4 does not divide the teacher's 6 layers.*allowed: 1, 2, 3, 6, or loss.hidden=0"):
        validate(compose_cfg(tmp_path, "task=rte", "quant=w2a8", "student.layers=4"))
    validate(compose_cfg(tmp_path, "task=rte", "method=shallow_kd", "student.layers=4"))  # logits only: any depth
    with pytest.raises(ConfigError, match=r"^student.layers=9 is out of range; allowed: 1..6"):
        validate(compose_cfg(tmp_path, "task=rte", "student.layers=9"))
    with pytest.raises(ConfigError, match=r"^student.init=teacher student.layers=3 need a trained student; method=ptq"):
        validate(compose_cfg(tmp_path, "task=rte", "method=ptq", "student.layers=3"))


def test_shallow_kd_distils_regression_from_the_teacher(tmp_path):
    """On STS-B the vanilla-KD baseline's prediction term is the MSE to the teacher's score, so it loads a teacher
    (with the default ``regression_target: label`` it would be the fine-tuning baseline under another name)."""
    from conftest import compose_cfg
    from kdlsq_pl.distill.losses import KDLoss

    cfg = compose_cfg(tmp_path, "task=stsb", "method=shallow_kd")
    loss = KDLoss(pred=cfg.loss.pred, attn=cfg.loss.attn, hidden=cfg.loss.hidden, gt=cfg.loss.gt, is_regression=True,
                  regression_target=cfg.loss.regression_target)
    assert loss.uses_teacher
    ft = compose_cfg(tmp_path, "task=stsb", "method=shallow_ft")
    assert not KDLoss(pred=ft.loss.pred, attn=ft.loss.attn, hidden=ft.loss.hidden, gt=ft.loss.gt, is_regression=True,
                      regression_target=ft.loss.regression_target).uses_teacher
