from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.experiments.helpers import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_data_and_models_instantiate(experiment, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_config("train_dr", [f"experiment={experiment}"], tmp_path / "run")
    data = instantiate(cfg.data)
    assert data.preprocessing.image_size == cfg.data.image_size
    # no download in tests: the architectures only
    teacher = instantiate(cfg.model.teacher, pretrained="none")
    student = instantiate(cfg.model.student, pretrained="none", topo_features=8, teacher_checkpoint=None)
    assert teacher.hparams.backbone == cfg.model.teacher.backbone
    assert student.net.uses_topology


def test_paper_experiment_holds_the_study_settings(tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_distill_paper"], tmp_path)
    assert cfg.model.teacher.backbone == "efficientnet_b5" and cfg.model.student.backbone == "efficientnet_b2"
    assert cfg.data.image_size == 224 and cfg.data.batch_size == 32
    assert cfg.callbacks.early_stopping.patience == 15


def test_student_only_ablation_has_no_teacher(tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_student_only"], tmp_path)
    assert list(cfg.stages) == ["student"] and cfg.distill.alpha_start == cfg.distill.alpha_end == 0


@pytest.mark.parametrize("debug", DEBUGS)
def test_debug_presets_compose(debug, tmp_path: Path):
    cfg = compose_config("train_dr", [f"debug={debug}"], tmp_path)
    assert cfg.data.synthetic_num_images <= 200


def test_command_line_overrides_reach_the_config(tmp_path: Path):
    cfg = compose_config("train_dr", ["distill.temperature=2", "trainer.max_epochs=5", "model/teacher=lite0"],
                         tmp_path)
    assert cfg.distill.temperature == 2 and cfg.trainer.max_epochs == 5
    assert cfg.model.teacher.backbone == "tf_efficientnet_lite0"


def test_bench_config_extends_the_training_config(tmp_path: Path):
    cfg = compose_config("bench", [], tmp_path)
    assert cfg.task_name == "bench" and cfg.bench.runs >= 30 and "teacher" in cfg.model
