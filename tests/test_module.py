"""KDLSQModule: frozen teacher, optimizer parameter groups as released, loss terms wired to real outputs."""

from __future__ import annotations

import pytest
import torch

from kdlsq_pl.distill.losses import KDLoss
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.models.modules import KDLSQModule
from kdlsq_pl.quant.modules import quantize_, lsq_quantizers
from test_quant_insert import quant_cfg

TASK = {"labels": ["0", "1"], "metrics": ["f1", "acc"], "metric": "f1", "dev_files": {"dev": "dev.tsv"}}
OPTIM = {"lr": 5e-5, "weight_decay": 0.01, "weight_step_lr": 1e-3, "weight_step_weight_decay": 2e-5,
         "act_step_lr": 3e-2, "act_step_weight_decay": 1e-4, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def module(minilm_path):
    teacher = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION)
    student = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION)
    student.load_state_dict(teacher.state_dict())
    quantize_(student, quant_cfg("w2a8"))
    return KDLSQModule(teacher, student, TASK, KDLoss(pred=1, attn=1, hidden=1), OPTIM)


def test_parameter_groups_as_released(module):
    groups = module.parameter_groups()
    settings = sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in groups)
    qs = lsq_quantizers(module.student)
    n_weight_q = sum(q.kind == "weight" for q in qs.values())
    n_act_q = sum(q.kind == "activation" for q in qs.values())
    no_decay = [n for n, p in module.student.named_parameters() if ("bias" in n or "LayerNorm" in n) and "quantizer" not in n]
    assert (1e-3, 2e-5, n_weight_q) in settings and (3e-2, 1e-4, n_act_q) in settings
    assert (5e-5, 0.0, len(no_decay)) in settings
    # every trainable student parameter exactly once, no teacher parameter
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in module.student.parameters())
    assert not set(ids) & {id(p) for p in module.teacher.parameters()}


def test_teacher_frozen_and_eval(module):
    module.train()
    assert not module.teacher.training and module.student.training
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_training_step_loss_parts_match_kdloss(module, minilm_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(["The cat sat on the mat.", "A much longer sentence about a dog in the park today."],
                     ["A cat sits.", "A dog."], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    module.eval()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    total = module.training_step(batch, 0)
    t = module._outputs(module.teacher, batch)
    s = module._outputs(module.student, batch)
    assert len(s["attention_scores"]) == 6 and len(s["hidden_states"]) == 7
    # the three released terms by hand (METHODS.md section 1): soft CE averaged over B x C entries, the sum over
    # layers of the MSE of attention scores (entries <= -100, i.e. masked keys, zeroed in each model), the sum
    # over the L + 1 hidden states of their MSE
    pred = (-torch.softmax(t["logits"], -1) * torch.log_softmax(s["logits"], -1)).mean()
    zero_masked = lambda x: torch.where(x <= -100.0, torch.zeros_like(x), x)  # noqa: E731
    attn = sum(((zero_masked(a) - zero_masked(b)) ** 2).mean() for a, b in zip(s["attention_scores"], t["attention_scores"]))
    hidden = sum(((a - b) ** 2).mean() for a, b in zip(s["hidden_states"], t["hidden_states"]))
    assert logged["train/loss_pred"] == pytest.approx(pred.item(), rel=1e-5)
    assert logged["train/loss_attn"] == pytest.approx(attn.item(), rel=1e-5) and attn > 0
    assert logged["train/loss_hidden"] == pytest.approx(hidden.item(), rel=1e-5) and hidden > 0
    assert total.item() == pytest.approx((pred + attn + hidden).item(), rel=1e-5)
    assert total.requires_grad


def test_best_metrics_are_one_evaluation_row():
    """``best_row`` holds every metric of the evaluation with the best task metric (F1 here), not the running
    maximum of each metric: hand-made predictions where accuracy peaks in one evaluation and F1 in another."""
    from types import SimpleNamespace

    from kdlsq_pl.models.modules import GLUEModule

    m = GLUEModule(TASK)
    m._trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, global_step=0)
    m.log = lambda *a, **k: None
    labels = torch.tensor([1, 1, 1, 0, 0, 0])

    def evaluate(preds):
        m.eval_logits = lambda batch: torch.nn.functional.one_hot(torch.tensor(preds), 2).float()
        m.validation_step({"labels": labels}, 0)
        m.on_validation_epoch_end()

    evaluate([1, 0, 0, 0, 0, 0])  # acc 4/6 = 66.67; F1: P 1, R 1/3 -> 50.00
    evaluate([1, 1, 1, 1, 1, 1])  # acc 3/6 = 50.00; F1: P 1/2, R 1 -> 66.67
    evaluate([1, 1, 0, 1, 1, 1])  # acc 2/6 = 33.33; F1: P 2/5, R 2/3 -> 50.00
    assert m.best_row == pytest.approx({"f1": 200 / 3, "acc": 50.0})
    assert m.best == pytest.approx({"f1": 200 / 3, "acc": 200 / 3})  # running maxima from different evaluations
    assert m.last == pytest.approx({"f1": 50.0, "acc": 100 / 3})


@pytest.mark.parametrize("mask_padding", [False, True])
def test_streamed_attention_terms_equal_the_whole_list_loss(minilm_path, mask_padding):
    """The training step computes each layer's attention term while the student's forward runs (no layer's scores
    outlive it). On real MRPC rows, in training mode (dropout on, the same draws), its loss and every student
    gradient equal those of the loss over the whole captured score lists bit for bit, and the teacher's score
    list is released entry by entry."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from conftest import CONF, GLUE
    from kdlsq_pl.data.tsv import read_glue_tsv, task_files

    mrpc = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "mrpc.yaml"))
    rows = read_glue_tsv(task_files(mrpc, GLUE)["dev"], mrpc)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(rows["text_a"][:4], rows["text_b"][:4], padding=True, return_tensors="pt"))
    labels = torch.tensor(rows["label"][:4])
    teacher = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION).eval()
    student = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION)
    student.load_state_dict(teacher.state_dict())
    quantize_(student, quant_cfg("w2a8"))
    student.train()
    loss = KDLoss(pred=1, attn=1, hidden=1, mask_padding=mask_padding)
    module = KDLSQModule(teacher, student, TASK, loss, OPTIM)
    module._outputs(student, batch)  # initialises the activation step sizes
    results = []
    for streamed in (False, True):
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = module._outputs(teacher, batch)
        t["mask"] = batch["attention_mask"].bool()
        torch.manual_seed(3)
        consume = loss.attention_consumer(t, 6) if streamed else None
        s = module._outputs(student, batch, consume=consume)
        assert (s["attention_terms"] is not None) is streamed and (s["attention_scores"] is None) is streamed
        if streamed:
            assert t["attention_scores"] == [None] * 6  # each teacher layer released once used
        total, parts = loss(s, t, labels)
        total.backward()
        results.append((total.detach(), parts["attn"].detach(),
                        {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (t0, a0, g0), (t1, a1, g1) = results
    assert torch.equal(t0, t1) and torch.equal(a0, a1) and a0 > 0
    assert g0.keys() == g1.keys() and len(g0) > 100
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_bfloat16_teacher_forward_is_an_option_close_to_float32(module, minilm_path, make_cfg):
    """teacher.forward_dtype=bfloat16 runs the live teacher under autocast: its outputs come back as float32, within
    bfloat16's rounding of the float32 teacher's on real MRPC rows (logits to 2e-2, each hidden state and attention
    score tensor to 3% relative norm), and the default float32 path is the plain forward. A bad value is one line."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from conftest import CONF, GLUE
    from kdlsq_pl.config import validate
    from kdlsq_pl.data.tsv import read_glue_tsv, task_files
    from kdlsq_pl.errors import ConfigError

    mrpc = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "mrpc.yaml"))
    rows = read_glue_tsv(task_files(mrpc, GLUE)["dev"], mrpc)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(rows["text_a"][:8], rows["text_b"][:8], padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = module._teacher_outputs(batch, None, False)
        module.teacher_dtype = "bfloat16"
        try:
            got = module._teacher_outputs(batch, None, False)
        finally:
            module.teacher_dtype = "float32"
    assert got["logits"].dtype == torch.float32 and (got["logits"] - want["logits"]).abs().max() < 2e-2
    for key in ("hidden_states", "attention_scores"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            w = torch.where(w <= -100, 0.0, w)  # the additive padding mask is the same huge value in both
            g = torch.where(g <= -100, 0.0, g)
            assert g.dtype == torch.float32 and float((g - w).norm() / w.norm()) < 0.03, key
        assert not torch.equal(got[key][-1], want[key][-1])  # the top layer did run in bfloat16 (the embeddings do not)
    with pytest.raises(ValueError, match="teacher_dtype='float16' is not supported; allowed: float32, bfloat16"):
        KDLSQModule(module.teacher, module.student, TASK, module.loss, OPTIM, teacher_dtype="float16")
    with pytest.raises(ConfigError, match="teacher.forward_dtype"):
        validate(make_cfg("teacher.forward_dtype=float16"))


def test_foreach_adamw_is_torchs_loop_bit_for_bit_and_fused_an_option(minilm_path, make_cfg):
    """optim.adamw=foreach (the default) is a pure speed-up: over three steps of real KD gradients on MRPC dev rows
    (a W2A8 student, all four parameter groups: weights, biases and LayerNorms, weight step sizes, activation step sizes), every
    parameter and AdamW state equals torch's per-tensor loop (``foreach=False``) bit for bit. ``fused`` stays within
    float32 rounding of it (1e-6 relative) without being required equal. A bad value is one line."""
    import copy

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from conftest import CONF, GLUE
    from kdlsq_pl.config import validate
    from kdlsq_pl.data.tsv import read_glue_tsv, task_files
    from kdlsq_pl.errors import ConfigError

    mrpc = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "mrpc.yaml"))
    rows = read_glue_tsv(task_files(mrpc, GLUE)["dev"], mrpc)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    teacher = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION).eval()
    student = load_classifier(minilm_path, TASK, ATTN_IMPLEMENTATION)
    student.load_state_dict(teacher.state_dict())
    quantize_(student, quant_cfg("w2a8"))
    loss = KDLoss(pred=1, attn=1, hidden=1)
    first = dict(tok(rows["text_a"][:4], rows["text_b"][:4], padding=True, return_tensors="pt"))
    kd = KDLSQModule(teacher, student, TASK, loss, OPTIM)
    kd._outputs(student, first)  # initialises the activation step sizes
    copies = {impl: copy.deepcopy(student) for impl in ("loop", "foreach", "fused")}
    opts = {}
    for impl, model in copies.items():
        module = KDLSQModule(teacher, model, TASK, loss, {**OPTIM, "adamw": "foreach" if impl == "loop" else impl})
        opts[impl] = (module.build_optimizer() if impl != "loop" else
                      torch.optim.AdamW(module.parameter_groups(), foreach=False))  # torch's per-tensor path
    assert opts["foreach"].defaults["foreach"] and opts["fused"].defaults["fused"] and len(opts["loop"].param_groups) == 4
    ref = copies["loop"]
    for step in range(3):
        lo = 4 * (step + 1)
        batch = dict(tok(rows["text_a"][lo:lo + 4], rows["text_b"][lo:lo + 4], padding=True, return_tensors="pt"))
        ref.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = kd._outputs(teacher, batch)
        loss(kd._outputs(ref, batch), t, torch.tensor(rows["label"][lo:lo + 4]))[0].backward()
        grads = {n: p.grad for n, p in ref.named_parameters()}
        assert sum(g is not None for g in grads.values()) > 150
        for impl, model in copies.items():
            for n, p in model.named_parameters():
                p.grad = None if grads[n] is None else grads[n].clone()
            opts[impl].step()
    for (n, want), got, fused in zip(ref.named_parameters(), copies["foreach"].parameters(), copies["fused"].parameters()):
        assert torch.equal(got, want), n
        assert float((fused - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1.0), n
        s_want, s_got = opts["loop"].state[want], opts["foreach"].state[got]
        assert s_want.keys() == s_got.keys() and all(torch.equal(s_want[k], s_got[k]) for k in s_want), n
    assert not torch.equal(ref.get_parameter("bert.encoder.layer.0.attention.self.query.weight"),
                           teacher.get_parameter("bert.encoder.layer.0.attention.self.query.weight"))  # the steps moved it
    with pytest.raises(ValueError, match="optim.adamw='adam' is not supported; allowed: foreach, fused"):
        KDLSQModule(teacher, student, TASK, loss, {**OPTIM, "adamw": "adam"})
    with pytest.raises(ConfigError, match="optim.adamw"):
        validate(make_cfg("optim.adamw=adam"))
