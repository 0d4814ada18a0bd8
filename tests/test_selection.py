"""Minimal hidden-state knowledge (Liu et al., ACL 2021): depth map, token and width selections against hand
computations on a real batch (attention probabilities from Hugging Face's own ``output_attentions``), and a cached
compressed selection giving the live teacher's loss with the same selection."""

from __future__ import annotations

import math

import pytest
import torch

from kdlsq_pl.distill.losses import KDLoss
from kdlsq_pl.distill.selection import HiddenSelection, depth_map, selection_masks, token_ranking
from kdlsq_pl.distill.teacher_cache import TeacherCache, build_teacher_cache
from kdlsq_pl.errors import ConfigError
from kdlsq_pl.models.modules import KDLSQModule
from test_teacher_cache import setup  # noqa: F401  (fixture: teacher folder, 32 real RTE rows, W2A8 student)


def test_depth_map_by_hand():
    assert depth_map(6, 6) == [0, 1, 2, 3, 4, 5, 6]
    # student i -> round(i * 5 / 6): 0, 0.83, 1.67, 2.5, 3.33, 4.17, 5
    assert depth_map(6, 6, map_top=5) == [0, 1, 2, 3, 3, 4, 5]
    assert depth_map(3, 6) == [0, 2, 4, 6]
    assert depth_map(6, 6, top_layers=2) == [None, None, None, None, None, 5, 6]
    with pytest.raises(ConfigError, match=r"map_top=7 is out of range; allowed: 1..6"):
        depth_map(6, 6, map_top=7)
    with pytest.raises(ConfigError, match=r"top_layers=8 is out of range; allowed: 1..7"):
        depth_map(6, 6, top_layers=8)


def test_bad_selection_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="token_rule='middle' is not allowed; allowed: first, cls_attention"):
        HiddenSelection(tokens=4, token_rule="middle")
    with pytest.raises(ConfigError, match=r"width=1.5 is out of range"):
        HiddenSelection(width=1.5)


def test_first_k_tokens_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert token_ranking(mask, 3, "first").tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


@torch.no_grad()
def test_token_and_width_selection_by_hand_on_a_real_batch(setup):  # noqa: F811
    """Top-k tokens by the teacher's [CLS] attention row averaged over heads, [SEP] and padding excluded, and the
    largest-magnitude dimensions of each kept vector, recomputed in plain Python from Hugging Face's attention
    probabilities (``output_attentions=True``, a path independent of our captured scores)."""
    from kdlsq_pl.models.attention import capture_attention_scores

    root, cfg, teacher, dm, student = setup
    batch = next(iter(dm.train_dataloader()))
    sep_id = dm.tokenizer.sep_token_id
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with capture_attention_scores() as scores:
        out = teacher(**inputs, output_hidden_states=True)
    probs = teacher(**inputs, output_attentions=True).attentions  # L x [B, H, T, T], Hugging Face's softmax
    k, width = 5, 0.1
    sel = HiddenSelection(tokens=k, token_rule="cls_attention", keep_sep=False, width=width)
    masks = selection_masks(sel, out.hidden_states, batch["attention_mask"], scores, batch["input_ids"] == sep_id)
    L, D = len(probs), out.hidden_states[0].shape[-1]
    m = math.ceil(width * D)
    for j in (0, 3, L):
        layer = min(j, L - 1)
        for b in range(batch["input_ids"].shape[0]):
            ids, real = batch["input_ids"][b].tolist(), batch["attention_mask"][b].tolist()
            row = probs[layer][b, :, 0, :].mean(0).tolist()  # [CLS] query row, mean over heads
            eligible = [t for t in range(len(ids)) if real[t] and ids[t] != sep_id]
            kept = sorted(sorted(eligible, key=lambda t: (-row[t], t))[:k])
            got = masks[j][b].any(-1).nonzero().flatten().tolist()
            assert got == kept
            assert all(ids[t] != sep_id for t in got)
            for t in kept:
                h = out.hidden_states[j][b, t].tolist()
                dims = sorted(sorted(range(D), key=lambda d: (-abs(h[d]), d))[:m])
                assert masks[j][b, t].nonzero().flatten().tolist() == dims


@pytest.mark.parametrize("sel", [HiddenSelection(tokens=4, token_rule="cls_attention", width=0.1, map_top=5, top_layers=3),
                                 HiddenSelection(tokens=6, token_rule="first", keep_sep=True),
                                 HiddenSelection(width=0.25, width_rule="random", seed=3)])
def test_cached_selection_gives_the_live_loss(setup, sel):  # noqa: F811
    """The compressed cache (float32) read back gives the same hidden-state term as the live teacher with the same
    selection, on a padded real batch; the selection actually changes the term (it is not the full one)."""
    root, cfg, teacher, dm, student = setup
    L = teacher.config.num_hidden_layers
    hmap = depth_map(L, L, sel.map_top, sel.top_layers)
    states = sorted({j for j in hmap if j is not None})
    folder = root / f"sel{len(list(root.iterdir()))}"
    cache = TeacherCache(build_teacher_cache(teacher, dm.splits["train"], dm.collator, folder, hidden_layers=states, attn_layers=[],
                                             dtype="float32", selection=sel, sep_token_id=dm.tokenizer.sep_token_id))
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].float().mean() < 1
    loss = KDLoss(pred=1, attn=0, hidden=1, mask_padding=True, hidden_map=hmap)
    live_module = KDLSQModule(teacher, student, dict(cfg.task), loss, {}, selection=sel, sep_token_id=dm.tokenizer.sep_token_id)
    with torch.no_grad():
        live_module.teacher.eval()
        s = live_module._outputs(student, batch)
        t = live_module._outputs(teacher, batch, scores_for_selection=sel.needs_attention)
        t["mask"] = batch["attention_mask"].bool()
        sep = batch["input_ids"] == dm.tokenizer.sep_token_id
        t["hidden_masks"] = selection_masks(sel, t["hidden_states"], batch["attention_mask"], t["attention_scores"], sep, layers=states)
        cached = cache.lookup(batch["idx"], batch["input_ids"].shape[1])
        _, live_parts = loss(s, t, batch["labels"])
        _, cached_parts = loss(s, cached, batch["labels"])
        full = KDLoss(pred=1, attn=0, hidden=1, mask_padding=True)(s, {**t, "hidden_masks": None}, batch["labels"])[1]
    assert cached_parts["hidden"].item() == pytest.approx(live_parts["hidden"].item(), rel=1e-6)
    assert cached_parts["pred"].item() == pytest.approx(live_parts["pred"].item(), rel=1e-6)
    assert abs(live_parts["hidden"].item() - full["hidden"].item()) > 1e-4
    for j in states:  # the stored entries are exactly the kept ones, and hold the teacher's values there
        assert torch.equal(cached["hidden_masks"][j], t["hidden_masks"][j])
        keep = t["hidden_masks"][j] if t["hidden_masks"][j].dim() == 3 else t["hidden_masks"][j][..., None].expand_as(t["hidden_states"][j])
        assert torch.equal(cached["hidden_states"][j][keep], t["hidden_states"][j][keep])


def test_fraction_of_the_knowledge_by_hand():
    sel = HiddenSelection(top_layers=1, tokens=10, token_rule="cls_attention", width=0.3)
    # 1 state of 7, tokens min(20, 10) + min(5, 10) = 15 of 25, ceil(0.3 * 384) = 116 of 384 dimensions
    assert sel.fraction(6, 6, [20, 5], 384) == pytest.approx(1 * 15 * 116 / (7 * 25 * 384))
    assert HiddenSelection().fraction(6, 6, [20, 5], 384) == 1.0


@pytest.mark.parametrize("preset, kept", [
    ("full", 1.0),
    ("top1", 1 / 7),                                   # the top state of 7
    ("len5_first", (5 + 5) / 25), ("len5_cls", (5 + 5) / 25),          # 5 of 20 tokens and all 5 of the second
    ("width10_mag", 39 / 384), ("width10_rand", 39 / 384),           # ceil(38.4) = 39 dimensions
    ("min_cls_mag", 1 / 7 * (10 + 5) / 25 * 116 / 384), ("min_first_rand", 1 / 7 * (10 + 5) / 25 * 116 / 384),
    ("min_width_mag", 3 / 384), ("min_width_rand", 3 / 384),         # 0.0078125 * 384 = 3 dimensions, every state, token
    ("min_cls_all_mag", (1 + 1) / 25 * 96 / 384),                    # every state, the first token of each, 96 dimensions
])
def test_every_hkd_preset_keeps_its_share_by_hand(preset, kept):
    """Each ``conf/hkd`` preset, loaded as Hydra composes it, on a 6-layer pair of examples of 20 and 5 real tokens."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import CONF
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hkd={preset}"])
    sel = HiddenSelection.from_config(OmegaConf.to_container(cfg.loss.selection))
    assert cfg.loss.selection.name == preset
    assert sel.fraction(6, 6, [20, 5], 384) == pytest.approx(kept, rel=1e-12)


def test_selection_study_table_by_hand(tmp_path, monkeypatch):
    from kdlsq_pl.report import plot_selection, selection_table

    def rec(name, source, best, seed, frac, cache=None, t=100.0):
        return {"status": "finished", "task": "mrpc", "metric": "f1", "best": best, "seed": seed, "teacher_source": source,
                "hidden_selection": {"name": name}, "hidden_fraction": frac, "teacher_cache_bytes": cache, "fit_time_per_epoch_s": t}

    records = [rec("full", "cached", 86.0, 1, 1.0, 400e6, 300.0), rec("full", "cached", 85.0, 2, 1.0, 400e6, 320.0),
               rec("min_cls_mag", "cached", 85.7, 1, 0.008, 4e6, 250.0), rec("full", "live", 85.9, 1, 1.0, None, 465.0),
               {"status": "finished", "task": "mrpc", "best": 80.0},  # a record of another study: left out
               # no hidden-state term, written before records carried the study's fields: known by its config
               {"status": "finished", "task": "mrpc", "metric": "f1", "best": 84.0, "seed": 1,
                "config": {"loss": {"hidden": 0, "pred": 1.0, "selection": {"name": "none"}}, "teacher_cache": {"enabled": True},
                           "task": {"labels": ["0", "1"]}, "method": {"train": True}}},
               {"status": "finished", "task": "mrpc", "metric": "f1", "best": 84.5, "seed": 2, "teacher_source": "cached",
                "hidden_selection": {"name": "none"}, "hidden_fraction": 0.0, "teacher_cache_bytes": 1e6, "fit_time_per_epoch_s": 200.0},
               # the same written with the live teacher (its own row); and a regression task's with the gold score as
               # the prediction term's target: it reads no teacher at all
               {"status": "finished", "task": "mrpc", "metric": "f1", "best": 83.0, "seed": 1,
                "config": {"loss": {"hidden": 0, "pred": 1.0, "selection": {"name": "none"}}, "teacher_cache": None,
                           "task": {"labels": ["0", "1"]}, "method": {"train": True}}},
               {"status": "finished", "task": "stsb", "metric": "pearson", "best": 75.0, "seed": 1,
                "config": {"loss": {"hidden": 0, "pred": 1.0, "attn": 0.0, "regression_target": "label", "selection": {"name": "none"}},
                           "teacher_cache": {"enabled": True}, "task": {"labels": []}, "method": {"train": True}}},
               # not the study's: post-training quantization (no training; its config has loss.hidden 0 too), and
               # an old record without a hidden-state term that is not a study cell (its selection is not "none")
               {"status": "finished", "task": "mrpc", "metric": "f1", "best": 70.0, "seed": 1,
                "config": {"loss": {"hidden": 0, "selection": {"name": "none"}}, "method": {"train": False}}},
               {"status": "finished", "task": "mrpc", "metric": "f1", "best": 71.0, "seed": 1,
                "config": {"loss": {"hidden": 0, "selection": {"name": "full"}}, "method": {"train": True}}}]
    header, rows, info = selection_table(records)
    assert len(rows) == 6 and [r[0] for r in rows] == ["MRPC"] * 5 + ["STS-B"]
    by = {(r[1], r[2]): dict(zip(header, r)) for r in rows if r[0] == "MRPC"}
    none = by[("none", "cached")]  # mean of 84.0 and 84.5 against the full mean 85.5; one record without a time
    assert none["kept (%)"] == "0.00" and none["metric"] == "84.25 +- 0.35 (n=2) (f1)" and none["vs full"] == "-1.25"
    assert none["s / epoch"] == "200" and none["cache vs full"] == "400x smaller" and none["speed-up vs live"] == "2.33x"
    assert [r[1:3] for r in rows[3:5]] == [["none", "cached"], ["none", "live"]]  # after every kept share, by source
    assert by[("none", "live")]["metric"] == "83.00 (n=1) (f1)" and by[("none", "live")]["s / epoch"] == "-"
    assert rows[5][1:5] == ["none", "none", "0.00", "75.00 (n=1) (pearson)"] and rows[5][5] == "-"  # no full STS-B row
    full = by[("full", "cached")]
    assert full["kept (%)"] == "100.00" and full["metric"] == "85.50 +- 0.71 (n=2) (f1)" and full["vs full"] == "+0.00"
    assert full["cache (MB)"] == "400.0" and full["s / epoch"] == "310" and full["speed-up vs live"] == "1.50x"
    small = by[("min_cls_mag", "cached")]
    assert small["kept (%)"] == "0.80" and small["vs full"] == "+0.20" and small["cache vs full"] == "100x smaller"
    assert small["speed-up vs live"] == "1.86x"
    assert by[("full", "live")]["cache (MB)"] == "-"
    # the plot's points: (selection, source, kept %, metric, std, cache MB, s / epoch)
    assert sorted(p[:2] + p[5:] for p in info["points"]["mrpc"] if p[1] == "cached") == [("full", "cached", 400.0, 310.0),
                                                                                        ("min_cls_mag", "cached", 4.0, 250.0),
                                                                                        ("none", "cached", 1.0, 200.0)]
    # drawn: the 0% rows as dotted lines at their means (none on the log axis as a point), the others as points
    import matplotlib.axes
    drawn = {"lines": [], "points": []}
    axhline, errorbar = matplotlib.axes.Axes.axhline, matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda ax, y, **k: drawn["lines"].append((round(y, 4), k.get("linestyle"))) or axhline(ax, y, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, **k: drawn["points"].append((x[0], y[0])) or errorbar(ax, x, y, **k))
    plot_selection(info, tmp_path / "selection.png")
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(y for y, style in drawn["lines"] if style == ":") == [75.0, 83.0, 84.25]
    assert sorted(drawn["points"]) == [(0.8, 85.7), (100.0, 85.5), (100.0, 85.9)]  # min_cls_mag, full (mean of two), full (live)


def test_selection_table_names_the_method_when_several():
    from kdlsq_pl.report import selection_table

    def rec(method, name, best):
        return {"status": "finished", "task": "mrpc", "metric": "f1", "best": best, "seed": 1, "method": method, "teacher_source": "cached",
                "hidden_selection": {"name": name}, "hidden_fraction": 1.0 if name == "full" else 0.0}

    header, rows, _ = selection_table([rec("kdlsq_per_channel", "full", 84.0), rec("kdlsq_per_channel", "none", 82.0), rec("lsq", "none", 80.0)])
    got = {r[1]: r[5] for r in rows}  # the lsq row is not compared with the other method's full knowledge
    assert got == {"full (kdlsq_per_channel)": "+0.00", "none (kdlsq_per_channel)": "-2.00", "none (lsq)": "-"}


def test_study_experiment_names_each_cell_by_its_selection():
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=minimal_knowledge", "hkd=min_cls_mag", "method=kdlsq_per_channel", "seed=1"],
                      return_hydra_config=True)
    from omegaconf import OmegaConf
    assert cfg.hydra.sweep.subdir == "kdlsq_per_channel_w2a8_mrpc_s1_min_cls_mag_cached"
    sel = HiddenSelection.from_config(OmegaConf.to_container(cfg.loss.selection))
    assert (sel.top_layers, sel.tokens, sel.token_rule, sel.width) == (1, 10, "cls_attention", 0.3)
    assert cfg.teacher_cache.enabled and cfg.loss.attn == 0.0
    # without a hidden-state term the cell is the "none" one whatever the selection: it never lands in the full cell
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for extra in ([], ["loss.selection.name=none"]):
            cfg = compose("config", overrides=["experiment=minimal_knowledge", "hkd=full", "method=kdlsq_per_channel", "seed=2",
                                               "loss.hidden=0", *extra], return_hydra_config=True)
            assert cfg.hydra.sweep.subdir == "kdlsq_per_channel_w2a8_mrpc_s2_none_cached"
