"""Teacher-output cache: masked losses by hand, cached == live on real RTE batches, selection, size, invalidation."""

from __future__ import annotations

import json
import pickle

import pytest
import pytorch_lightning as pl
import torch

from conftest import compose_cfg
from kdlsq_pl.callbacks.quantization import calibrate
from kdlsq_pl.distill.losses import KDLoss, attention_score_mse, hidden_state_mse
from kdlsq_pl.distill.teacher_cache import TeacherCache, build_teacher_cache, cache_key, ensure_teacher_cache, normalise_selection
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.attention import ATTN_IMPLEMENTATION
from kdlsq_pl.models.loading import load_classifier
from kdlsq_pl.models.modules import KDLSQModule
from kdlsq_pl.stages.common import build_datamodule
from kdlsq_pl.quant.modules import quantize_
from kdlsq_pl.stages.student import build_student_module, quant_callbacks
from test_quant_insert import quant_cfg

SMALL = ("task=rte", "data.limit_train_examples=32", "data.limit_eval_examples=16", "data.batch_size=8")


def test_masked_mse_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[0.0, 1.0], [5.0, 5.0], [7.0, 7.0]]])  # [2, 3, 2]
    t = torch.zeros_like(s)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # kept positions: (1,2), (3,4), (0,1): squares 1+4+9+16+0+1 = 31 over 3 positions x 2 dims
    assert hidden_state_mse([s], [t], mask=mask).item() == pytest.approx(31 / 6)
    a = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3)  # [B, H, T, T]
    expected = sum(float(a[b, h, i, j]) ** 2 for b in range(2) for h in range(2) for i in range(3) for j in range(3)
                   if mask[b, i] and mask[b, j]) / ((4 + 1) * 2)
    assert attention_score_mse([a], [torch.zeros_like(a)], mask=mask).item() == pytest.approx(expected)
    # no mask: the released code's mean over every entry
    assert hidden_state_mse([s], [t]).item() == pytest.approx(float((s ** 2).mean()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    """A teacher folder (MiniLM with a seeded head), the data module on 32 real RTE rows, a quantized student."""
    root = tmp_path_factory.mktemp("cache")
    cfg = compose_cfg(root, *SMALL)
    torch.manual_seed(0)
    teacher = load_classifier(minilm_path, cfg.task, ATTN_IMPLEMENTATION).eval()
    teacher.save_pretrained(root / "teacher")
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "teacher")  # a stored teacher carries its tokenizer
    dm = build_datamodule(cfg, minilm_path, 8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    student = load_classifier(str(root / "teacher"), cfg.task, ATTN_IMPLEMENTATION)
    quantize_(student, quant_cfg("w2a8"))
    calibrate(student, [batch])
    return root, cfg, teacher, dm, student.eval()


def live_and_cached(setup, **selection):
    root, cfg, teacher, dm, student = setup
    folder = root / f"c{len(list(root.iterdir()))}"
    cache = TeacherCache(build_teacher_cache(teacher, dm.splits["train"], dm.collator, folder, **selection))
    batch = next(iter(dm.train_dataloader()))
    module = KDLSQModule(teacher, student, dict(cfg.task), KDLoss(pred=1, attn=1, hidden=1, mask_padding=True), {})
    with torch.no_grad():
        live = module._outputs(teacher, batch)
        live["mask"] = batch["attention_mask"].bool()
        s = module._outputs(student, batch)
    cached = cache.lookup(batch["idx"], batch["input_ids"].shape[1])
    return batch, live, cached, s, cache


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_equals_live_on_real_batch(setup, dtype, rel):
    batch, live, cached, s, cache = live_and_cached(setup, dtype=dtype)
    assert batch["attention_mask"].float().mean() < 1  # the batch has padding: the mask matters
    assert torch.equal(cached["mask"], live["mask"])
    loss = KDLoss(pred=1, attn=1, hidden=1, mask_padding=True)
    total_live, parts_live = loss(s, live, batch["labels"])
    total_cached, parts_cached = loss(s, cached, batch["labels"])
    for k in parts_live:
        assert parts_cached[k].item() == pytest.approx(parts_live[k].item(), rel=rel), k
    # real tokens carry the teacher's values; padding is zero in the cache and ignored by the loss
    m = live["mask"]
    assert torch.allclose(cached["hidden_states"][3][m], live["hidden_states"][3][m], rtol=rel, atol=rel)
    assert cached["hidden_states"][3][~m].abs().sum() == 0
    assert cache.meta["dtype"] == dtype


def test_selection_layers_and_tokens(setup):
    batch, live, cached, s, cache = live_and_cached(setup, hidden_layers=[0, 6], attn_layers=[5], max_tokens=8, dtype="float32")
    assert [h is not None for h in cached["hidden_states"]] == [True, False, False, False, False, False, True]
    assert [a is not None for a in cached["attention_scores"]] == [False] * 5 + [True]
    keep = live["mask"] & (torch.arange(live["mask"].shape[1]) < 8)
    assert torch.equal(cached["mask"], keep)
    _, parts = KDLoss(pred=1, attn=1, hidden=1, mask_padding=True)(s, cached, batch["labels"])
    expect_h = hidden_state_mse([s["hidden_states"][0], s["hidden_states"][6]],
                                [live["hidden_states"][0], live["hidden_states"][6]], mask=keep)
    expect_a = attention_score_mse([s["attention_scores"][5]], [live["attention_scores"][5]], mask=keep)
    assert parts["hidden"].item() == pytest.approx(expect_h.item(), rel=1e-5)
    assert parts["attn"].item() == pytest.approx(expect_a.item(), rel=1e-5)
    # the size on disk: 2 hidden layers x l x 384 + 1 x 12 heads x l^2 values (l = min(length, 8)), float32
    lengths = torch.tensor([len(x) for x in setup[3].splits["train"].with_format(None)["input_ids"]]).clamp(max=8)
    values = int((2 * lengths * 384).sum() + (12 * lengths ** 2).sum())
    on_disk = sum(f.stat().st_size for f in cache.path.glob("*.npy"))
    assert values * 4 < on_disk < values * 4 + 32 * (2 * 4 + 8 + 8) + 5 * 256  # + logits, ids, lengths, npy headers


def test_budget_and_bad_selection_are_one_line_errors(setup):
    root, cfg, teacher, dm, _ = setup
    with pytest.raises(ConfigError, match=r"would take 0\.\d+ GB > teacher_cache.max_gb=1e-06"):
        build_teacher_cache(teacher, dm.splits["train"], dm.collator, root / "big", max_gb=1e-6)
    with pytest.raises(ConfigError, match=r"teacher_cache.hidden_layers=\[9\] is not allowed; allowed: .*0\.\.6"):
        build_teacher_cache(teacher, dm.splits["train"], dm.collator, root / "bad", hidden_layers=[9])
    assert not (root / "big").exists() and not (root / "bad").exists()


def test_invalidated_when_teacher_task_or_length_change(setup, tmp_path, minilm_path):
    root, cfg, teacher, dm, _ = setup
    sel = normalise_selection({"hidden_layers": None, "attn_layers": None, "max_tokens": None, "dtype": "float16"}, 6, 128)
    base = cache_key("abc", "rte", 128, "k1", sel)
    assert len({base, cache_key("abd", "rte", 128, "k1", sel), cache_key("abc", "mrpc", 128, "k1", sel),
                cache_key("abc", "rte", 64, "k1", sel), cache_key("abc", "rte", 128, "k2", sel),
                cache_key("abc", "rte", 128, "k1", {**sel, "max_tokens": 8}), cache_key("abc", "rte", 128, "k1", {**sel, "dtype": "float32"}),
                cache_key("abc", "rte", 128, "k1", {**sel, "hidden_layers": [0, 6]}),
                cache_key("abc", "rte", 128, "k1", {**sel, "attn_layers": []})}) == 9
    # equal selections written differently share one cache
    same = normalise_selection({"hidden_layers": [6, 0, 0], "attn_layers": list(range(6)), "max_tokens": 500, "dtype": "float16"}, 6, 128)
    assert same == {**sel, "hidden_layers": [0, 6]} and same["max_tokens"] is None
    ccfg = {**sel, "dir": str(tmp_path), "max_gb": 1.0}
    built = []

    def load():
        built.append(1)
        return teacher

    first = ensure_teacher_cache(ccfg, root / "teacher", dm, load)
    again = ensure_teacher_cache(ccfg, root / "teacher", dm, load)
    assert first.path == again.path and len(built) == 1  # reused, the teacher not even loaded
    # another teacher (one weight changed on disk) -> another cache, computed anew
    other = tmp_path / "teacher2"
    changed = load_classifier(str(root / "teacher"), cfg.task, ATTN_IMPLEMENTATION)
    with torch.no_grad():
        changed.classifier.bias.add_(1.0)
    changed.save_pretrained(other)
    third = ensure_teacher_cache(ccfg, other, dm, lambda: changed)
    assert third.path != first.path and json.loads((third.path / "meta.json").read_text())["teacher_dir"] == str(other)
    # another max length -> another tokenised split fingerprint -> another cache
    dm64 = build_datamodule(compose_cfg(tmp_path, *SMALL, "task.max_length=64"), minilm_path, 8)  # the same tokenizer as dm
    dm64.setup("fit")
    fourth = ensure_teacher_cache(ccfg, root / "teacher", dm64, load)
    assert fourth.path != first.path and len(built) == 2
    # a loss without the attention term stores no attention scores: another, smaller cache
    fifth = ensure_teacher_cache(ccfg, root / "teacher", dm, load, attn=False)
    assert fifth.meta["attn_layers"] == [] and fifth.meta["bytes"] < first.meta["bytes"] / 2 and len(built) == 3


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lookup_results_do_not_share_memory_between_calls(setup, dtype):
    """lookup reuses its staging blocks: a second call (same shape, other examples) must not change the first's."""
    batch, live, cached, s, cache = live_and_cached(setup, dtype=dtype)
    first = [t.clone() for t in cached["hidden_states"] + cached["attention_scores"]]
    other = cache.lookup(batch["idx"].flip(0), batch["input_ids"].shape[1])
    assert not torch.equal(other["hidden_states"][1], cached["hidden_states"][1])  # other rows, other values
    for a, b in zip(first, cached["hidden_states"] + cached["attention_scores"]):
        assert torch.equal(a, b)


def test_cache_pickles_without_its_memory_maps_and_names_missing_ids(setup):
    batch, live, cached, s, cache = live_and_cached(setup, dtype="float32")
    assert cache._arrays is not None  # opened by the lookup
    clone = pickle.loads(pickle.dumps(cache))  # as DDP's spawn sends the module to each process
    assert clone._arrays is None and len(pickle.dumps(cache)) < 10_000
    again = clone.lookup(batch["idx"], batch["input_ids"].shape[1])
    assert torch.equal(again["hidden_states"][2], cached["hidden_states"][2]) and torch.equal(again["logits"], cached["logits"])
    with pytest.raises(KeyError, match=r"teacher cache .* holds no example id 999999"):
        cache.lookup(torch.tensor([0, 999999]), 8)


class Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def cached_cfg(tmp_path, enabled: bool, *extra: str):
    return compose_cfg(tmp_path / str(enabled), *SMALL, "quant=w2a8", "loss.mask_padding=true", f"teacher_cache.enabled={enabled}",
                       "teacher_cache.dtype=float32", f"teacher_cache.dir={tmp_path}/tc", *extra)


def test_student_with_cache_loads_no_teacher(setup, tmp_path):
    root = setup[0]
    for enabled in (False, True):
        module = build_student_module(cached_cfg(tmp_path, enabled), root / "teacher", build_datamodule(cached_cfg(tmp_path, enabled), str(root / "teacher"), 8))
        assert (module.teacher is None) == enabled and (module.teacher_cache is not None) == enabled
    assert compose_cfg(tmp_path, "teacher_cache.enabled=true").loss.mask_padding is True  # follows the cache by default


@pytest.mark.slow
def test_training_with_cache_matches_live(setup, tmp_path):
    """Three real training steps: the float32 cache and the live teacher (both with mask_padding) give the same losses."""
    root = setup[0]
    losses = {}
    for enabled in (False, True):
        cfg = cached_cfg(tmp_path, enabled)
        pl.seed_everything(0)
        dm = build_datamodule(cfg, str(root / "teacher"), 8)
        module = build_student_module(cfg, root / "teacher", dm)
        rec = Losses()
        trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, callbacks=[*quant_callbacks(cfg), rec])
        trainer.fit(module, datamodule=dm)
        losses[enabled] = rec.values
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-4)
