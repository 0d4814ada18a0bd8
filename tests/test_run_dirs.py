"""Run folders are never shared: two runs of one cell started in the same second get two folders
(``kdlsq_pl.fresh_dir`` in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLAIM = "import sys, time; import kdlsq_pl; t = float(sys.argv[2]); time.sleep(max(0.0, t - time.time())); print(kdlsq_pl.fresh_dir(sys.argv[1]))"


def test_two_processes_claim_two_folders_and_one_process_keeps_its_own(tmp_path):
    import time

    import kdlsq_pl
    base = tmp_path / "runs" / "12-01-37_theseus_fp32_mrpc_s1"
    start = f"{time.time() + 3.0:.3f}"  # both processes call fresh_dir at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(base), start], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    got = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert got == [str(base), f"{base}_2"] and all(Path(g).is_dir() for g in got)
    # a third claimant of the same name, then the same process asking again: the same (third) folder
    third = kdlsq_pl.fresh_dir(str(base))
    assert third == f"{base}_3" and kdlsq_pl.fresh_dir(str(base)) == third


def test_two_runs_started_together_keep_their_own_config(tmp_path):
    """Two real ``run.py`` launches of the same cell at once (each refused by validation after Hydra made its folder):
    each folder holds its own overrides, none the other's."""
    cmd = [sys.executable, "run.py", f"paths.root_dir={tmp_path}", "logger=csv", "stage=teacher", "task=rte"]
    procs = [subprocess.Popen(cmd + [f"task.teacher.lr={lr}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for lr in ("-1.0", "-2.0")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    folders = sorted((tmp_path / "outputs" / "runs").glob("*/*_teacher_rte_s42*"))
    assert len(folders) == 2, folders
    stamps = {f.name.split("_")[0] for f in folders}
    if len(stamps) == 1:  # started in the same second (the usual case): the second claimant got <name>_2
        assert [f.name.endswith("_2") for f in folders] == [False, True], folders
    lrs = sorted(next(line for line in (f / ".hydra" / "overrides.yaml").read_text().splitlines() if "lr" in line) for f in folders)
    assert lrs == ["- task.teacher.lr=-1.0", "- task.teacher.lr=-2.0"]
