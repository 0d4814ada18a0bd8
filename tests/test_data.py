"""GLUE loading on the real files (../shared/data/glue) and on official-layout fixtures for QQP/MNLI."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, GLUE
from kdlsq_pl.data.glue import GLUEDataModule, read_glue_tsv, resolve_glue_dir, task_files
from kdlsq_pl.errors import ConfigError

# Official GLUE example counts (train, dev) for the tasks staged here.
OFFICIAL = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
            "rte": (2490, 277), "wnli": (635, 71)}


def task(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "task" / f"{name}.yaml"))


def test_default_glue_dir_is_the_shared_sibling():
    assert resolve_glue_dir(None) == GLUE


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_real_files_row_counts_and_labels(name):
    t = task(name)
    files = task_files(t, GLUE)
    train, dev = read_glue_tsv(files["train"], t), read_glue_tsv(files["dev"], t)
    assert (len(train["idx"]), len(dev["idx"])) == OFFICIAL[name]
    for rows in (train, dev):
        assert all(isinstance(a, str) and a for a in rows["text_a"])
        if t["labels"]:
            assert set(rows["label"]) == set(range(len(t["labels"])))
        else:
            assert min(rows["label"]) >= 0.0 and max(rows["label"]) <= 5.0
        assert (rows["text_b"][0] is None) == ("text_b" not in t["columns"])


def test_quoting_off_and_bom():
    """MRPC starts with a BOM and STS-B has unbalanced quotes; both must still parse row by row."""
    mrpc = read_glue_tsv(GLUE / "MRPC" / "dev.tsv", task("mrpc"))
    assert mrpc["label"][0] == 1 and mrpc["text_a"][0].startswith("He said the foodservice pie business")
    stsb = read_glue_tsv(GLUE / "STS-B" / "dev.tsv", task("stsb"))
    assert len(stsb["idx"]) == 1500 and sum('"' in a + b for a, b in zip(stsb["text_a"], stsb["text_b"])) > 0


def test_qnli_without_train_file_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"task=qnli: missing file .*QNLI/train.tsv"):
        task_files(task("qnli"), GLUE)


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mnli_and_qqp_official_layout(tmp_path):
    """MNLI: label in the last column (12 in train, 16 in dev); QQP: is_duplicate in column 5."""
    mnli_head = "index promptID pairID genre s1bp s2bp s1p s2p sentence1 sentence2 label1 gold_label".split()
    row = lambda i, lab, n: "\t".join([str(i), "1", "1", "fiction", "(", "(", "(", "(", f"premise {i}", f"hyp {i}"] + [lab] * (n - 10))
    _write(tmp_path / "MNLI" / "train.tsv", ["\t".join(mnli_head), row(0, "neutral", 12), row(1, "contradiction", 12)])
    dev_head = mnli_head[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    for split in ("dev_matched", "dev_mismatched"):
        _write(tmp_path / "MNLI" / f"{split}.tsv", ["\t".join(dev_head), row(0, "entailment", 16)])
    t = task("mnli")
    files = task_files(t, tmp_path)
    assert set(files) == {"train", "m", "mm"}
    assert read_glue_tsv(files["train"], t)["label"] == [2, 0]
    assert read_glue_tsv(files["m"], t)["label"] == [1]
    _write(tmp_path / "QQP" / "train.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tA?\tB?\t1"])
    _write(tmp_path / "QQP" / "dev.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tC?\tD?\t0"])
    rows = read_glue_tsv(task_files(task("qqp"), tmp_path)["train"], task("qqp"))
    assert rows == {"text_a": ["A?"], "text_b": ["B?"], "label": [1], "idx": [0]}


@pytest.mark.parametrize("content, message", [
    (b"index\tsentence1\tsentence2\tlabel\n0\tonly two\tcolumns\n", r"rte\.tsv:2: 3 columns, task=rte needs at least 4"),
    (b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", r"rte\.tsv:2: label 'maybe' is not in task=rte labels; allowed: entailment, not_entailment"),
    (b"index\tsentence1\tsentence2\tlabel\n0\ta\t\xff\xfe\tentailment\n", r"not UTF-8"),
    (b"index\tsentence1\tsentence2\tlabel\n", r"no data rows"),
])
def test_bad_tsv_gives_one_line_error(tmp_path, content, message):
    path = tmp_path / "rte.tsv"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        read_glue_tsv(path, task("rte"))
    assert "\n" not in str(err.value)


def test_datamodule_dynamic_padding_and_cache(tmp_path, minilm_path):
    t = task("rte")
    kw = dict(glue_dir=None, cache_dir=str(tmp_path), batch_size=8, eval_batch_size=16, max_length=128,
              limit_train_examples=40, limit_eval_examples=32)
    dm = GLUEDataModule(t, minilm_path, **kw)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 128  # padded to the longest in the batch
    # group_by_length: every training example once per epoch, in batches of similar length
    ids = torch.cat([b["idx"] for b in dm.train_dataloader()])
    assert sorted(ids.tolist()) == list(range(40))
    # HF's length sampler puts the longest example first; calibration must not see only that batch
    longest = max(len(ids) for ids in dm.splits["train"].with_format(None)["input_ids"])
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[1] == longest
    calib = next(iter(dm.calibration_dataloader()))["idx"].tolist()
    assert len(calib) == 8 and calib != next(iter(dm.train_dataloader()))["idx"].tolist()
    assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert batch["labels"].dtype == torch.int64 and len(dm.splits["dev"]) == 32
    cached = sorted((tmp_path / "tokenized" / "rte").glob("*.arrow"))
    assert len(cached) == 2
    dm2 = GLUEDataModule(t, minilm_path, **kw)
    dm2.setup("fit")  # same files, tokenizer and length: reads the cache, writes nothing new
    assert sorted((tmp_path / "tokenized" / "rte").glob("*.arrow")) == cached
    assert torch.equal(dm2.splits["dev"][:]["input_ids"][0], dm.splits["dev"][:]["input_ids"][0])


def test_no_local_copy_offline_says_how_to_point_at_data(tmp_path, monkeypatch, minilm_path):
    """With no local GLUE copy the hub is tried; offline that ends in one line naming GLUE_DIR."""
    import kdlsq_pl.data.tsv as tsv
    monkeypatch.setattr(tsv, "DEFAULT_GLUE_DIRS", (tmp_path / "absent",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
    assert resolve_glue_dir(None) is None
    dm = GLUEDataModule(task("rte"), minilm_path, glue_dir=None, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"task=rte: no local GLUE copy found .* set GLUE_DIR=/path/to/glue or data.glue_dir") as err:
        dm.setup("fit")
    assert "\n" not in str(err.value)


def test_group_by_length_cuts_padding_on_real_mrpc(tmp_path, minilm_path):
    """Length-grouped batches of real MRPC carry far fewer padded tokens than shuffled ones."""
    padded = {}
    for grouped in (False, True):
        dm = GLUEDataModule(task("mrpc"), minilm_path, glue_dir=None, cache_dir=str(tmp_path), batch_size=16,
                            group_by_length=grouped)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert sum(len(b["idx"]) for b in batches) == 3668
        padded[grouped] = sum(b["input_ids"].numel() for b in batches)
    real = sum(len(x) for x in dm.splits["train"].with_format(None)["input_ids"])
    assert padded[True] < 0.85 * padded[False] and padded[True] >= real


def test_hub_class_ids_are_remapped_to_our_label_order(monkeypatch):
    """The hub's MNLI ids are 0 entailment, 1 neutral, 2 contradiction; ours follow the TSV label list
    (contradiction, entailment, neutral): hub [0, 1, 2, 0] -> ours [1, 2, 0, 1]. STS-B scores stay floats."""
    import datasets

    import kdlsq_pl.data.glue as glue
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        if name == "mnli":
            return datasets.Dataset.from_dict({"premise": ["p0", "p1", "p2", "p3"], "hypothesis": ["h0", "h1", "h2", "h3"],
                                               "label": [0, 1, 2, 0]})
        return datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.8]})

    monkeypatch.setattr(glue.datasets, "load_dataset", fake_load)
    rows = glue.load_hub_split(task("mnli"), "validation_matched")
    assert rows == {"text_a": ["p0", "p1", "p2", "p3"], "text_b": ["h0", "h1", "h2", "h3"], "label": [1, 2, 0, 1], "idx": [0, 1, 2, 3]}
    assert glue.load_hub_split(task("stsb"), "validation")["label"] == [3.8]
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"), ("nyu-mll/glue", "stsb", "validation")]


def test_mnli_matched_and_mismatched_dev_give_two_loaders_and_two_metrics(tmp_path, minilm_path):
    """MNLI's two dev files become two validation loaders, reported as val/acc_m and val/acc_mm; the best
    evaluation is chosen by acc_m (task.metric). Predictions are made up by hand per loader."""
    from types import SimpleNamespace

    from kdlsq_pl.models.modules import GLUEModule

    head = "index promptID pairID genre s1bp s2bp s1p s2p sentence1 sentence2 label1 gold_label".split()
    dev_head = head[:10] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    row = lambda i, lab, n: "\t".join([str(i), "1", "1", "fiction", "(", "(", "(", "(", f"premise {i}", f"hyp {i}"] + [lab] * (n - 10))  # noqa: E731
    _write(tmp_path / "MNLI" / "train.tsv", ["\t".join(head), row(0, "neutral", 12)])
    _write(tmp_path / "MNLI" / "dev_matched.tsv", ["\t".join(dev_head)] + [row(i, lab, 16) for i, lab in enumerate(
        ["entailment", "neutral", "contradiction", "entailment"])])  # ids 1, 2, 0, 1
    _write(tmp_path / "MNLI" / "dev_mismatched.tsv", ["\t".join(dev_head)] + [row(i, lab, 16) for i, lab in enumerate(
        ["contradiction", "contradiction"])])  # ids 0, 0
    t = task("mnli")
    dm = GLUEDataModule(t, minilm_path, glue_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), eval_batch_size=8)
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    batches = [next(iter(loader)) for loader in loaders]
    assert sorted(batches[0]["labels"].tolist()) == [0, 1, 1, 2] and batches[1]["labels"].tolist() == [0, 0]

    m = GLUEModule(t)
    m._trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, global_step=0)
    m.log = lambda *a, **k: None

    def evaluate(pred_m, pred_mm):  # predicted class per example, in each batch's order
        for i, (batch, preds) in enumerate(zip(batches, (pred_m, pred_mm))):
            m.eval_logits = lambda b, preds=preds: torch.nn.functional.one_hot(torch.tensor(preds), 3).float()
            m.validation_step(batch, 0, dataloader_idx=i)
        m.on_validation_epoch_end()

    y_m = batches[0]["labels"].tolist()
    evaluate(y_m[:3] + [(y_m[3] + 1) % 3], [1, 1])  # acc_m 3/4, acc_mm 0/2
    assert m.last == pytest.approx({"acc_m": 75.0, "acc_mm": 0.0})
    evaluate([(y + 1) % 3 for y in y_m[:2]] + y_m[2:], [0, 0])  # acc_m 2/4, acc_mm 2/2
    assert m.last == pytest.approx({"acc_m": 50.0, "acc_mm": 100.0})
    assert m.best_row == pytest.approx({"acc_m": 75.0, "acc_mm": 0.0})  # chosen by acc_m, one row
