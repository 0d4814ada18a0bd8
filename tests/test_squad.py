"""SQuAD data side: lookup, reading (real dev-v1.1.json and malformed files), the offline split by
article, run_qa-style features on real questions, n-best post-processing and the official scores.

Expectations are hand-worked (in the comments) or checked against the raw data independently of the
code under test (answer text vs. the character span its token positions decode to).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from kdlsq_pl.data import squad as S
from kdlsq_pl.errors import ConfigError

SAMPLE_SEED, SAMPLE_SIZE = 0, 1000


def _squad_dir() -> Path | None:
    """``$SQUAD_DIR`` or ``../shared/data/squad`` beside this checkout; in a ``git worktree`` placed
    elsewhere, beside the main checkout (found through git's common directory)."""
    root = S.resolve_squad_dir(None)
    if root is None:
        try:
            common = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
            root = (REPO / common).resolve().parent.parent / "shared" / "data" / "squad"
        except (OSError, subprocess.CalledProcessError):
            return None
    return root if (root / "dev-v1.1.json").is_file() else None


@pytest.fixture(scope="module")
def dev() -> list[dict]:
    root = _squad_dir()
    if root is None:
        pytest.fail("no dev-v1.1.json: set SQUAD_DIR to the folder holding it (../shared/data/squad beside the repo)")
    return S.read_squad_json(root / "dev-v1.1.json")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def sample(dev) -> list[dict]:
    """A fixed-seed sample of questions across all 48 articles."""
    return random.Random(SAMPLE_SEED).sample(dev, SAMPLE_SIZE)


# ------------------------------------------------------------------------------------- lookup / read
def test_lookup_order(tmp_path, monkeypatch):
    explicit, env, default = (tmp_path / n for n in ("explicit", "env", "default"))
    for d in (explicit, env, default):
        d.mkdir()
    monkeypatch.setattr(S, "DEFAULT_SQUAD_DIRS", (default,))
    monkeypatch.setenv("SQUAD_DIR", str(env))
    assert S.resolve_squad_dir(str(explicit)) == explicit
    assert S.resolve_squad_dir(None) == env
    monkeypatch.delenv("SQUAD_DIR")
    assert S.resolve_squad_dir(None) == default
    monkeypatch.setattr(S, "DEFAULT_SQUAD_DIRS", (tmp_path / "absent",))
    assert S.resolve_squad_dir(None) is None  # the caller goes to the hub
    with pytest.raises(ConfigError, match=r"data.squad_dir=.*nope is not a directory"):
        S.resolve_squad_dir(str(tmp_path / "nope"))
    monkeypatch.setenv("SQUAD_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"SQUAD_DIR=.*nope is not a directory"):
        S.resolve_squad_dir(None)


def test_version_and_file_names(tmp_path):
    assert [S.check_version(v) for v in ("1.1", 1.1, "v2.0", 2.0, 2)] == ["1.1", "1.1", "2.0", "2.0", "2.0"]
    with pytest.raises(ConfigError, match=r"squad.version='3.0' is not allowed; allowed: 1.1, 2.0"):
        S.check_version("3.0")
    assert S.squad_file(tmp_path, "2.0", "train") == tmp_path / "train-v2.0.json"
    with pytest.raises(ConfigError, match="split='test'"):
        S.squad_file(tmp_path, "1.1", "test")


def test_real_dev_file(dev):
    # Official SQuAD v1.1 dev: 10,570 questions over 48 Wikipedia articles, all answerable.
    assert len(dev) == 10570
    assert len({r["title"] for r in dev}) == 48
    assert len({r["id"] for r in dev}) == 10570
    assert not any(r["is_impossible"] for r in dev)
    first = dev[0]
    assert first["id"] == "56be4db0acb8001400a502ec" and first["title"] == "Super_Bowl_50"
    assert first["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first["answers"] == {"text": ["Denver Broncos"] * 3, "answer_start": [177] * 3}
    for r in dev:  # every gold answer is the context substring at its answer_start
        assert all(r["context"][s:s + len(t)] == t for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"]))


def _write(tmp_path, obj, name="dev-v1.1.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


def _doc(qas, context="Paris is the capital of France."):
    return {"version": "1.1", "data": [{"title": "France", "paragraphs": [{"context": context, "qas": qas}]}]}


GOOD_QA = {"id": "q1", "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]}


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not JSON \(.* at line 1 column 2\)"),
    ({"version": "1.1"}, r"top level: no 'data' list"),
    ({"data": []}, r"data: no articles"),
    ({"data": [{"paragraphs": []}]}, r"data\[0\]: no 'title' string"),
    (_doc([{**GOOD_QA, "question": None}]), r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: no 'question' string"),
    (_doc([{**GOOD_QA, "answers": [{"text": "Paris", "answer_start": "0"}]}]), r"qas\[0\]\.answers\[0\]: answer_start='0' is not an integer"),
    (_doc([{**GOOD_QA, "answers": [{"text": "France", "answer_start": 40}]}]), r"answer_start=40 \+ len\(text\)=6 is outside the context of 31 characters"),
    (_doc([GOOD_QA, GOOD_QA]), r"qas\[1\]: duplicate id 'q1'"),
    (_doc([{**GOOD_QA, "answers": []}]), r"qas\[0\]: an answerable question .* with no answers"),
    (_doc([{**GOOD_QA, "is_impossible": True}]), r"qas\[0\]: is_impossible=true but 1 answers"),
    (_doc([{**GOOD_QA, "is_impossible": "no"}]), r"'is_impossible' is 'no', not true/false"),
])
def test_malformed_file_is_a_one_line_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as err:
        S.read_squad_json(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"absent.json: cannot be read"):
        S.read_squad_json(tmp_path / "absent.json")


def test_v2_layout(tmp_path):
    # A v2.0 unanswerable question: is_impossible, no answers, plausible_answers ignored.
    qas = [GOOD_QA, {"id": "q2", "question": "What is the capital of Spain?", "answers": [], "is_impossible": True,
                     "plausible_answers": [{"text": "Paris", "answer_start": 0}]}]
    doc = _doc(qas)
    doc["version"] = "v2.0"
    recs = S.read_squad_json(_write(tmp_path, doc, "dev-v2.0.json"))
    assert [(r["id"], r["is_impossible"], r["answers"]["text"]) for r in recs] == [("q1", False, ["Paris"]), ("q2", True, [])]
    assert recs[0]["context"] == "Paris is the capital of France." and recs[0]["title"] == "France"
    loaded, source = S.load_squad("2.0", "dev", tmp_path)
    assert loaded == recs and source == str(tmp_path / "dev-v2.0.json")


def test_hub_rows_are_converted_to_the_same_records(tmp_path, monkeypatch):
    """The hub path, offline: ``datasets.load_dataset`` replaced by rows in the hub's schema."""
    import datasets

    rows = [{"id": "a", "title": "T", "context": "Paris is big.", "question": "Which city?", "answers": {"text": ["Paris"], "answer_start": [0]}},
            {"id": "b", "title": "T", "context": "Paris is big.", "question": "Which river?", "answers": {"text": [], "answer_start": []}}]
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = S.load_hub_squad("2.0", "validation")
    assert calls == [("rajpurkar/squad_v2", "validation")]
    assert recs == [{**rows[0], "is_impossible": False}, {**rows[1], "is_impossible": True}]
    monkeypatch.setattr(S, "DEFAULT_SQUAD_DIRS", (tmp_path,))
    monkeypatch.delenv("SQUAD_DIR", raising=False)
    _, source = S.load_squad("1.1", "train", None)  # the local directory has no train-v1.1.json
    assert source == "hub:rajpurkar/squad/train" and calls[-1] == ("rajpurkar/squad", "train")

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"train-v1.1.json does not exist; .*rajpurkar/squad split=train could not be loaded \(ConnectionError\); set SQUAD_DIR"):
        S.load_squad("1.1", "train", None)


# ------------------------------------------------------------------------------------ offline split
def test_offline_split_by_article(dev):
    split = S.split_by_article(dev, eval_fraction=0.2, seed=0)
    assert S.OFFLINE_PROTOCOL == "offline-dev-split" and S.SPLIT_NAME == "dev-split"
    assert split.protocol == "offline-dev-split" and split.name == "dev-split"
    # 0.2 x 48 articles = 9.6 -> 10 held out, 38 for training.
    assert (len(split.eval_titles), len(split.train_titles)) == (10, 38)
    train_titles, eval_titles = {r["title"] for r in split.train}, {r["title"] for r in split.eval}
    assert not train_titles & eval_titles
    assert train_titles == set(split.train_titles) and eval_titles == set(split.eval_titles)
    counts = Counter(r["id"] for r in split.train + split.eval)
    assert len(counts) == 10570 and set(counts.values()) == {1}
    assert 0.1 < len(split.eval) / len(dev) < 0.3
    record = split.record()
    assert record["protocol"] == "offline-dev-split" and record["eval_questions"] + record["train_questions"] == 10570

    again = S.split_by_article(list(reversed(dev)), eval_fraction=0.2, seed=0)  # depends on titles, not order
    assert set(again.eval_titles) == set(split.eval_titles)
    assert set(S.split_by_article(dev, 0.2, seed=1).eval_titles) != set(split.eval_titles)
    half = S.split_by_article(dev, eval_fraction=0.5)
    assert len(half.eval_titles) == 24 and not {r["title"] for r in half.train} & {r["title"] for r in half.eval}


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_offline_split_bad_fraction(dev, fraction):
    with pytest.raises(ConfigError, match=r"squad.eval_fraction=.* is out of range; allowed: 0 < eval_fraction < 1"):
        S.split_by_article(dev[:100], eval_fraction=fraction)


# ------------------------------------------------------------------------------------ preprocessing
def _context_tokens(feature, sep_id):
    """Indices of context tokens: second segment (token_type 1) except [SEP] and padding."""
    return [i for i, (t, ids, m) in enumerate(zip(feature["token_type_ids"], feature["input_ids"], feature["attention_mask"]))
            if t == 1 and ids != sep_id and m == 1]


@pytest.mark.parametrize("max_length, stride", [(384, 128), (96, 32)])
def test_train_positions_decode_to_the_answer(sample, tokenizer, max_length, stride):
    """Every labelled span decodes (through the offsets) to the first gold answer; every [CLS]
    label is a window that really does not contain the answer; every example has one labelled window.

    Over the whole dev set, 32 of 10,570 answers are parts of a word piece ("gold" in "golden",
    "8" in "18"); no token span decodes to them exactly and they get the smallest covering span
    (checked as ``covering``). The 384/128 windows leave most examples in one feature; 96/32 cut
    most contexts into several, exercising the out-of-window rule.
    """
    by_id = {r["id"]: r for r in sample}
    feats = S.train_features(sample, tokenizer, max_length=max_length, doc_stride=stride, keep_offsets=True).with_format(None)
    sep = tokenizer.sep_token_id
    exact, covering, failures, cls_ok, cls_bad = 0, 0, [], 0, []
    labelled = Counter()
    for f in feats:
        r = by_id[f["example_id"]]
        text, a = r["answers"]["text"][0], r["answers"]["answer_start"][0]
        b = a + len(text)
        off, s, e = f["offset_mapping"], f["start_positions"], f["end_positions"]
        ctx = _context_tokens(f, sep)
        assert len(f["input_ids"]) <= max_length
        if s == 0 and e == 0:
            lo, hi = off[ctx[0]][0], off[ctx[-1]][1]
            if lo <= a and b <= hi:
                cls_bad.append(r["id"])
            else:
                cls_ok += 1
            continue
        labelled[r["id"]] += 1
        assert s in ctx and e in ctx and s <= e
        decoded = r["context"][off[s][0]:off[e][1]]
        if decoded.strip() == text.strip():
            exact += 1
        elif off[s][0] <= a < off[s][1] and off[e][0] < b <= off[e][1]:
            covering += 1  # the answer starts inside token s and ends inside token e
        else:
            failures.append((r["id"], decoded, text))
    assert failures == [] and cls_bad == []
    assert covering <= 0.005 * len(sample)
    assert set(labelled) == set(by_id)  # windows overlap, so each answer lies wholly in some window
    assert len(feats) > len(sample)
    if max_length == 96:
        assert cls_ok > len(sample) // 2  # most short windows miss the answer


def test_eval_features(sample, tokenizer):
    feats = S.eval_features(sample[:200], tokenizer, max_length=96, doc_stride=32).with_format(None)
    train = S.train_features(sample[:200], tokenizer, max_length=96, doc_stride=32, keep_offsets=True).with_format(None)
    assert feats["example_id"] == train["example_id"] and feats["input_ids"] == train["input_ids"]
    assert set(feats["example_id"]) == {r["id"] for r in sample[:200]}
    contexts = {r["id"]: r["context"] for r in sample}
    sep = tokenizer.sep_token_id
    for f in feats:
        ctx = set(_context_tokens(f, sep))
        assert [i for i, o in enumerate(f["offset_mapping"]) if o is not None] == sorted(ctx)
        assert all(0 <= o[0] < o[1] <= len(contexts[f["example_id"]]) for o in f["offset_mapping"] if o is not None)
    padded = S.eval_features(sample[:5], tokenizer, max_length=96, doc_stride=32, pad_to_max_length=True).with_format(None)
    assert {len(ids) for ids in padded["input_ids"]} == {96}


def test_bad_window_is_a_config_error(sample, tokenizer):
    with pytest.raises(ConfigError, match=r"doc_stride=384 with max_length=384"):
        S.prepare_train_features({k: [sample[0][k]] for k in sample[0]}, tokenizer, doc_stride=384)
    with pytest.raises(ConfigError, match=r"max_length=1024 exceeds the tokenizer's model_max_length=512"):
        S.prepare_eval_features({k: [sample[0][k]] for k in sample[0]}, tokenizer, max_length=1024)


def test_gold_logits_round_trip(sample, tokenizer):
    """Logits peaked at the labelled positions of each window decode back to the gold answers."""
    recs = sample[:150]
    feats = S.eval_features(recs, tokenizer, max_length=128, doc_stride=48)
    train = S.train_features(recs, tokenizer, max_length=128, doc_stride=48).with_format(None)
    T = 130  # longer than every feature, as a padded batch would be
    start, end = np.zeros((len(feats), T)), np.zeros((len(feats), T))
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"])):
        if s:
            start[i, s] = end[i, e] = 10.0
    preds = S.postprocess_predictions(recs, feats, start, end, max_answer_length=128)
    golds = {r["id"]: r["answers"]["text"][0] for r in recs}
    assert preds == golds  # this sample has no sub-word answer (see the test above)
    assert S.squad_v1_metrics(preds, recs) == {"exact_match": 100.0, "f1": 100.0}


# ---------------------------------------------------------------------------------- post-processing
# context "alpha beta gamma delta epsilon": alpha 0-5, beta 6-10, gamma 11-16, delta 17-22, epsilon 23-30
CONTEXT = "alpha beta gamma delta epsilon"
# tokens: 0 [CLS], 1 question, 2 [SEP], 3 alpha, 4 beta, 5 gamma, 6 delta, 7 epsilon, 8 [SEP], 9 [PAD]
OFFSETS = [None, None, None, [0, 5], [6, 10], [11, 16], [17, 22], [23, 30], None, None]
EXAMPLE = [{"id": "x", "context": CONTEXT}]


def _logits(values: dict[int, float], base: float = 0.0, length: int = 10) -> np.ndarray:
    out = np.full(length, base)
    for i, v in values.items():
        out[i] = v
    return out


def _predict(start, end, offsets=OFFSETS, **kw):
    feats = [{"example_id": "x", "offset_mapping": offsets}]
    return S.postprocess_predictions(EXAMPLE, feats, np.stack([start]), np.stack([end]), **kw)["x"]


def test_postprocess_skips_question_tokens():
    # start: question token 1 = 9 (illegal), beta = 5; end: gamma = 4 -> best legal beta..gamma = 9.
    assert _predict(_logits({1: 9, 4: 5}), _logits({5: 4})) == "beta gamma"


def test_postprocess_skips_end_before_start():
    # start: delta 8, alpha 2; end: beta 8, epsilon 3. (delta, beta) = 16 has end < start;
    # legal: (delta, epsilon) = 11 > (alpha, beta) = 10 > (alpha, epsilon) = 5.
    assert _predict(_logits({6: 8, 3: 2}), _logits({4: 8, 7: 3})) == "delta epsilon"


def test_postprocess_skips_too_long_spans():
    # base -5; start: alpha 6, gamma 1; end: epsilon 6, delta 1; max_answer_length = 2 tokens.
    # (alpha, epsilon) = 12 is 5 tokens, (gamma, epsilon) = 7 is 3 tokens; the best of at most
    # 2 tokens is (gamma, delta) = 2 (next: (delta, epsilon) = -5 + 6 = 1).
    start, end = _logits({3: 6, 5: 1}, base=-5), _logits({7: 6, 6: 1}, base=-5)
    assert _predict(start, end, max_answer_length=2) == "gamma delta"
    assert _predict(start, end, max_answer_length=30) == "alpha beta gamma delta epsilon"


def test_postprocess_skips_padding_and_positions_past_the_feature():
    # Logits 12 long (a padded batch) for a 10-token feature: index 9 ([PAD]) and 11 (past the
    # feature) score highest and are skipped; the answer is epsilon..epsilon = 2 + 2.
    start, end = _logits({9: 20, 11: 30, 7: 2}, length=12), _logits({9: 20, 11: 30, 7: 2}, length=12)
    assert _predict(start, end) == "epsilon"


def test_postprocess_n_best_limits_the_search():
    # With n_best_size = 1 only the top start (question token 1) is tried: no legal span -> "".
    start, end = _logits({1: 9, 4: 5}), _logits({4: 4})
    assert _predict(start, end, n_best_size=1) == ""
    assert _predict(start, end, n_best_size=2) == "beta"


def test_postprocess_best_over_features():
    # Two windows of one example: A holds alpha..gamma, B holds gamma..epsilon (token 3-5 in each).
    a = [None, None, None, [0, 5], [6, 10], [11, 16], None]
    b = [None, None, None, [11, 16], [17, 22], [23, 30], None]
    feats = [{"example_id": "x", "offset_mapping": a}, {"example_id": "x", "offset_mapping": b}]
    # A's best: alpha..alpha = 3 + 3 = 6; B's best: delta..epsilon = 4 + 3 = 7 -> B wins.
    start = [_logits({3: 3}, length=7), _logits({4: 4}, length=7)]
    end = [_logits({3: 3}, length=7), _logits({5: 3}, length=7)]
    preds, details = S.postprocess_predictions(EXAMPLE, feats, start, end, return_details=True)
    assert preds == {"x": "delta epsilon"} and details["x"]["score"] == 7.0 and details["x"]["null_score"] is None
    with pytest.raises(ValueError, match="has no feature"):
        S.postprocess_predictions([{"id": "y", "context": "z"}], feats, start, end)


def test_postprocess_v2_null_threshold():
    # null = start[0] + end[0] = 5 + 5 = 10; best span beta..beta = 4 + 4 = 8; diff = 10 - 8 = 2.
    start, end = _logits({0: 5, 4: 4}), _logits({0: 5, 4: 4})
    assert _predict(start, end) == "beta"  # v1.1: [CLS] is never an answer
    assert _predict(start, end, version_2_with_negative=True) == ""  # 2 > 0
    assert _predict(start, end, version_2_with_negative=True, null_score_diff_threshold=2.0) == "beta"  # 2 > 2 is false
    assert _predict(start, end, version_2_with_negative=True, null_score_diff_threshold=1.9) == ""
    assert _predict(start, end, version_2_with_negative=True, null_score_diff_threshold=2.5) == "beta"


def test_postprocess_v2_null_is_the_minimum_over_windows():
    # Window A: null 5 + 5 = 10, span beta 4 + 4 = 8. Window B: null 3 + 3 = 6, no better span.
    # The null score is min(10, 6) = 6 < 8 -> "beta" (with the maximum, 10 > 8 would give "").
    feats = [{"example_id": "x", "offset_mapping": OFFSETS}] * 2
    start = np.stack([_logits({0: 5, 4: 4}), _logits({0: 3})])
    end = np.stack([_logits({0: 5, 4: 4}), _logits({0: 3})])
    preds, details = S.postprocess_predictions(EXAMPLE, feats, start, end, version_2_with_negative=True, return_details=True)
    assert preds == {"x": "beta"} and details["x"]["null_score"] == 6.0 and details["x"]["score_diff"] == -2.0


# ------------------------------------------------------------------------------------------ metrics
def test_normalisation_by_hand():
    # lower "the  theater, an answer." -> no punctuation "the  theater an answer" -> articles
    # (whole words only: "theater" stays) -> "   theater   answer" -> whitespace -> "theater answer"
    assert S.normalize_answer("The  Theater, an ANSWER.") == "theater answer"
    assert S.normalize_answer("  A\tthe\nAn ") == ""


def _ref(qid, golds):
    return {"id": qid, "answers": {"text": golds, "answer_start": [0] * len(golds)}}


# q1: "the Eiffel tower!" vs "Eiffel Tower": both normalise to "eiffel tower" -> EM 1, F1 1.
# q2: "Denver Broncos won" vs "The Denver Broncos": tokens [denver broncos won] / [denver broncos],
#     2 shared: P = 2/3, R = 1, F1 = 2 (2/3) / (5/3) = 0.8; EM 0.
# q3: "in 1976" vs golds "1976" (P = 1/2, R = 1, F1 = 2/3) and "the year 1976" ([year 1976]:
#     P = R = 1/2, F1 = 1/2): the maximum, F1 = 2/3; EM 0.
# q4: "Paris" vs "London": no shared token, EM 0, F1 0.
# v1.1: EM = 1/4 = 25.0, F1 = (1 + 0.8 + 2/3 + 0) / 4 = 0.616667 -> 61.6667.
PREDS = {"q1": "the Eiffel tower!", "q2": "Denver Broncos won", "q3": "in 1976", "q4": "Paris"}
REFS = [_ref("q1", ["Eiffel Tower"]), _ref("q2", ["The Denver Broncos"]), _ref("q3", ["1976", "the year 1976"]), _ref("q4", ["London"])]


def test_per_question_scores_by_hand():
    assert S.exact_match("the Eiffel tower!", "Eiffel Tower") == 1 and S.f1_score("the Eiffel tower!", "Eiffel Tower") == 1.0
    assert S.exact_match("Denver Broncos won", "The Denver Broncos") == 0
    assert S.f1_score("Denver Broncos won", "The Denver Broncos") == pytest.approx(0.8)
    assert S.f1_score("in 1976", "1976") == pytest.approx(2 / 3) and S.f1_score("in 1976", "the year 1976") == pytest.approx(0.5)
    assert S.f1_score("Paris", "London") == 0.0
    assert S.f1_score("", "the") == 1.0 and S.f1_score("", "Paris") == 0.0  # both empty after normalisation / one empty


def test_v1_metrics_by_hand():
    out = S.squad_v1_metrics(PREDS, REFS)
    assert out["exact_match"] == pytest.approx(25.0)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3) / 4)  # 61.6667
    assert S.squad_metrics(PREDS, REFS, "1.1") == out
    with pytest.raises(ValueError, match=r"1 of 4 questions have no prediction \(first: 'q4'\)"):
        S.squad_v1_metrics({k: v for k, v in PREDS.items() if k != "q4"}, REFS)
    with pytest.raises(ValueError, match="needs squad_v2_metrics"):
        S.squad_v1_metrics({**PREDS, "q5": ""}, REFS + [_ref("q5", [])])


def test_v2_metrics_by_hand():
    # q1..q4 as above (HasAns); q5 unanswerable with "" -> 1, 1; q6 unanswerable with "Paris" -> 0, 0;
    # q7 answerable ("Rome") with "" -> 0, 0.
    # HasAns (q1-q4, q7): EM 1/5 = 20.0, F1 (1 + 0.8 + 2/3) / 5 = 49.3333. NoAns (q5, q6): 50.0, 50.0.
    # All 7: EM (1 + 1) / 7 = 28.5714, F1 (1 + 0.8 + 2/3 + 1) / 7 = 49.5238.
    preds = {**PREDS, "q5": "", "q6": "Paris", "q7": ""}
    refs = REFS + [_ref("q5", []), _ref("q6", []), _ref("q7", ["Rome"])]
    out = S.squad_v2_metrics(preds, refs)
    assert out["total"] == 7 and out["HasAns_total"] == 5 and out["NoAns_total"] == 2
    assert out["exact"] == pytest.approx(200 / 7) and out["f1"] == pytest.approx(100 * (2 + 0.8 + 2 / 3) / 7)
    assert out["HasAns_exact"] == pytest.approx(20.0) and out["HasAns_f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3) / 5)
    assert out["NoAns_exact"] == 50.0 and out["NoAns_f1"] == 50.0
    assert S.squad_metrics(preds, refs, "v2.0") == out
    only_has = S.squad_v2_metrics(PREDS, REFS)  # answerable-only data: no NoAns block, same as v1.1
    assert "NoAns_total" not in only_has
    assert only_has["exact"] == pytest.approx(25.0) and only_has["f1"] == pytest.approx(S.squad_v1_metrics(PREDS, REFS)["f1"])
    # A gold answer that normalises to "" is dropped (official v2.0): gold ["The", "Rome"] scores "Rome" 1.
    assert S.squad_v2_metrics({"q": "Rome"}, [_ref("q", ["The", "Rome"])])["exact"] == 100.0
    assert math.isclose(S.squad_v2_metrics({"q": ""}, [_ref("q", ["Rome"])])["f1"], 0.0)
