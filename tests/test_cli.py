"""Bad input on the command line: one clear line on stderr, exit status 2, nothing claimed as done."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import GLUE, REPO


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run.py"), f"paths.root_dir={tmp_path}", "logger=csv", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bad_glue(tmp_path_factory):
    """A GLUE root whose RTE train.tsv has a truncated row and whose SST-2 dev has a foreign label."""
    root = tmp_path_factory.mktemp("glue")
    shutil.copytree(GLUE / "RTE", root / "RTE")
    lines = (root / "RTE" / "train.tsv").read_text().splitlines()
    lines[5] = "\t".join(lines[5].split("\t")[:2])
    (root / "RTE" / "train.tsv").write_text("\n".join(lines) + "\n")
    (root / "WNLI").mkdir()
    (root / "WNLI" / "train.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\ta \xff\tb\t1\n")
    (root / "WNLI" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    (root / "CoLA").mkdir()
    (root / "CoLA" / "train.tsv").write_text("")
    (root / "CoLA" / "dev.tsv").write_text("")
    (root / "SST-2").mkdir()
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nbad\t7\n")
    return root


CASES = [
    (["task=foo"], r"task=foo is not a known option; allowed: cola, mnli, mrpc, qnli, qqp, rte, squad, squad_v2, sst2, stsb, wnli"),
    (["quant=w1a8"], r"quant=w1a8 is not a known option; allowed: fp32, w2a8, w2a8_emb4, w2a8_ends4, w4a8, w8a8"),
    (["quant.overrides={*.layer.9.*:4}"], r"quant.overrides: pattern '\*\.layer\.9\.\*' matches no quantized module; allowed: a glob "
                                         r"over embedding and Linear paths such as bert.embeddings.word_embeddings"),
    (["quant=w2a8_emb4", "quant.integer_ops=true"], r"quant=w2a8_emb4 was changed on the command line \(bits, overrides or integer_ops\)"),
    (["quant=fp32", "quant.integer_ops=true"], r"quant.integer_ops=true needs a quantized student"),
    (["quant.overrides={*.layer.0.*:9}"], r"quant.overrides.\*.layer.0.\*=9 is out of range; allowed: 2..8 or 32"),
    (["quant.weight_bits=9"], r"quant.weight_bits=9 is out of range; allowed: 2..8 or 32"),
    (["quant.act_bits=1"], r"quant.act_bits=1 is out of range; allowed: 2..8 or 32"),
    (["loss.attn=-0.5"], r"loss.attn=-0.5 is out of range; allowed: >= 0"),
    (["optim.lr=abc"], r"optim.lr='abc' is not a number"),
    (["optim.act_step_lr=0"], r"optim.act_step_lr=0 is out of range; allowed: > 0"),
    (["stage=distil"], r"stage='distil' is not allowed; allowed: teacher, student"),
    (["data.batch_size=0"], r"data.batch_size=0 is out of range; allowed: >= 1"),
    (["task.max_length=4096"], r"task.max_length=4096 is out of range; allowed: 8..512"),
    (["data.glue_dir=/nonexistent/glue"], r"data.glue_dir=/nonexistent/glue is not a directory"),
    (["task=qnli"], r"task=qnli: missing file .*QNLI/train.tsv"),
    (["model.name_or_path=/nonexistent/bert"], r"model.name_or_path=/nonexistent/bert: not a Hugging Face model directory"),
    (["quant.act.per_channel=true"], r"quant.act.per_channel=True is not allowed; allowed: False"),
    (["quant.calibration_batches=0"], r"quant.calibration_batches=0 is out of range; allowed: >= 1"),
    (["quant.weight.percentile=30"], r"quant.weight.percentile=30 is out of range; allowed: > 50 and <= 100"),
    (["optim.lr=-1e-5"], r"optim.lr=-1e-05 is out of range; allowed: > 0"),
    (["loss.temperature=0"], r"loss.temperature=0 is out of range; allowed: > 0"),
    (["loss.pred_reduction=sum"], r"loss.pred_reduction='sum' is not allowed; allowed: mean, batchmean"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs=0 is out of range; allowed: >= 1"),
    (["task.teacher.pooling=max"], r"task.teacher.pooling='max' is not allowed; allowed: cls, mean"),
    (["task.teacher.head_bias=mean"], r"task.teacher.head_bias='mean' is not allowed; allowed: zero, prior"),
    (["task=squad", "task.teacher.head_bias=prior"], r"task.teacher.head_bias=prior is not allowed for task=squad \(question answering"),
    (["task=cola", "task.teacher.symmetric_pairs=true"], r"task.teacher.symmetric_pairs=true needs pairs whose label does not depend on their order .*; task=cola is not; allowed: false"),
    (["task=rte", "task.teacher.symmetric_pairs=true"], r"task.teacher.symmetric_pairs=true needs pairs .*; task=rte is not; allowed: false"),
    (["task.teacher.classifier_dropout=1.5"], r"task.teacher.classifier_dropout=1.5 is out of range; allowed: 0..0.99"),
    (["teacher.seed=-1"], r"teacher.seed=-1 is out of range; allowed: >= 0"),
    (["loss.intermediate_epochs=1.5"], r"loss.intermediate_epochs=1.5 is not an integer"),
    (["loss.intermediate_epochs=3"], r"loss.intermediate_epochs=3 is out of range; allowed: 0..2"),
    (["seed=-1"], r"seed=-1 is out of range; allowed: >= 0"),
    (["quant.embedding_bits=33"], r"quant.embedding_bits=33 is out of range; allowed: 2..8 or 32"),
    (["quant.act_bits=4.5"], r"quant.act_bits=4.5 is out of range; allowed: 2..8 or 32"),
    (["data.limit_train_examples=0"], r"data.limit_train_examples=0 is out of range; allowed: >= 1"),
    (["task.teacher.lr=0"], r"task.teacher.lr=0 is out of range; allowed: > 0"),
    (["quant.weight.grid=asym"], r"quant.weight.grid='asym' is not allowed; allowed: symmetric, lsq"),
    (["model=roberta"], r"model=roberta is not a known option; allowed: bert_base, minilm_l6"),
    (["loss=mse"], r"loss=mse is not a known option; allowed: kdlsq, pred_only"),
    (["data.group_by_length=maybe"], r"data.group_by_length='maybe' is not allowed; allowed: True, False"),
    (["quant.fused_kernel=sometimes"], r"quant.fused_kernel='sometimes' is not allowed; allowed: True, False"),
    (["keep_freed_memory=1"], r"keep_freed_memory=1 is not allowed; allowed: True, False"),
    (["model.name_or_path=/tmp"], r"model.name_or_path=/tmp: not a Hugging Face model directory"),
    (["quant.weight.init=magic"], r"quant.weight.init='magic' is not allowed; allowed: lsq, percentile, kl, minmax"),
    (["method=gptq"], r"method=gptq is not a known option; allowed: kdlsq, kdlsq_per_channel, kdlsq_successor, lsq, ptq, q8bert, shallow_ft, shallow_kd, ternarybert, theseus"),
    (["quant.act.quantizer=twn"], r"quant.act.quantizer='twn' is not allowed; allowed: lsq, dynamic_max, ema_max"),
    (["method=ternarybert", "quant.act.clip=-2.5"], r"quant.act.clip=-2.5 is out of range; allowed: > 0"),
    (["method=q8bert", "quant.act.ema_decay=1.5"], r"quant.act.ema_decay=1.5 is out of range; allowed: 0..0.999999"),
    (["data.padding=left"], r"data.padding='left' is not allowed; allowed: dynamic, max_length"),
    (["teacher_cache.enabled=true", "loss.mask_padding=false"],
     r"loss.mask_padding=false is not allowed with teacher_cache.enabled=true: .*; allowed: loss.mask_padding=true"),
    (["teacher_cache.dtype=int8"], r"teacher_cache.dtype='int8' is not allowed; allowed: float16, float32"),
    (["teacher_cache.hidden_layers=[-1]"], r"teacher_cache.hidden_layers=\[-1\] is not allowed; allowed: null \(all\) or a list of layer indices"),
    (["teacher_cache.max_tokens=0"], r"teacher_cache.max_tokens=0 is out of range; allowed: >= 1"),
    (["optim.weight_decay=-0.01"], r"optim.weight_decay=-0.01 is out of range; allowed: >= 0"),
    (["trainer=tpu"], r"trainer=tpu is not a known option; allowed: cpu, ddp, ddp_cpu, gpu"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[0][0] for c in CASES])
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("task, message", [
    ("rte", r"RTE/train.tsv:6: 2 columns, task=rte needs at least 4"),
    ("sst2", r"SST-2/dev.tsv:2: label '7' is not in task=sst2 labels; allowed: 0, 1"),
    ("wnli", r"WNLI/train.tsv: not UTF-8 text"),
    ("mrpc", r"task=mrpc: no folder .*/MRPC in the GLUE directory"),
    ("cola", r"CoLA/train.tsv: no data rows; expected a GLUE CoLA TSV"),
])
def test_bad_tsv_on_the_command_line(tmp_path, bad_glue, task, message):
    proc = run_cli(tmp_path, f"task={task}", f"data.glue_dir={bad_glue}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert re.search(message, proc.stderr), proc.stderr


@pytest.mark.parametrize("content, message", [
    ("{not json", r"config.json is unreadable or not JSON"),
    ('{"hidden_size": 384}', r"config.json has no model_type"),
    ('{"model_type": "bert"}', r"no weights in .* \(expected one of: model.safetensors"),
])
def test_unusable_model_directory(tmp_path, content, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(content)
    proc = run_cli(tmp_path, f"model.name_or_path={model}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert not list(tmp_path.rglob("result.json"))
