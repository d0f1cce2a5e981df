from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.experiments.helpers import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DR_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("dr_")]
GLAUCOMA_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("glaucoma_", "disc_"))]
DEBUGS = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml") if p.stem != "none")


def test_every_experiment_belongs_to_a_pipeline():
    assert sorted(DR_EXPERIMENTS + GLAUCOMA_EXPERIMENTS) == EXPERIMENTS


@pytest.mark.parametrize("experiment", DR_EXPERIMENTS)
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
    if "baseline" in cfg.stages:
        baseline = instantiate(cfg.model.baseline)
        assert baseline.hparams.backbone == cfg.model.baseline.backbone


BASELINES = sorted(p.stem for p in (CONF_DIR / "model" / "baseline").glob("*.yaml"))


def test_the_baseline_sweep_covers_every_backbone_of_the_study(tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_baselines"], tmp_path, keep_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and list(cfg.stages) == ["baseline"] and cfg.task_name == "dr-baselines"
    swept = cfg.hydra.sweeper.params["model/baseline"].split(",")
    assert swept == ["efficientnet_b0", "resnet50", "resnext50_32x4d", "convnext_k3", "convnext_k5", "convnext_k7",
                     "convnext_k9"]
    assert set(swept) <= set(BASELINES)


@pytest.mark.parametrize("baseline", BASELINES)
def test_every_baseline_builds_its_timm_backbone_with_the_students_loss(baseline, tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_baselines", f"model/baseline={baseline}"], tmp_path)
    module = instantiate(cfg.model.baseline, class_weights=[1.0] * 5)
    assert module.hparams.backbone == cfg.model.baseline.backbone
    assert module.net.num_classes == 5 and module.hparams.pretrained == "none"
    # the student's loss and schedule: its consistency weight, no label smoothing, the shared optimiser settings
    assert module.consistency_weight == cfg.distill.consistency_weight > 0 and module.label_smoothing == 0.0
    assert (module.lr, module.weight_decay) == (cfg.optim.lr, cfg.optim.weight_decay)


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_the_convnext_kernel_override_reaches_every_depthwise_convolution(kernel, tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_baselines", "model/baseline=convnext",
                                      f"model.baseline.backbone_kwargs.kernel_sizes={kernel}"], tmp_path)
    net = instantiate(cfg.model.baseline).net
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == sum(len(stage.blocks) for stage in net.stages) == 18  # ConvNeXt-T: 3+3+9+3 blocks
    assert {m.kernel_size for m in depthwise} == {(kernel, kernel)}
    assert {m.padding for m in depthwise} == {(kernel // 2, kernel // 2)}


def test_paper_experiment_holds_the_study_settings(tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_distill_paper"], tmp_path)
    assert cfg.model.teacher.backbone == "efficientnet_b5" and cfg.model.student.backbone == "efficientnet_b2"
    assert cfg.data.image_size == 224 and cfg.data.batch_size == 32
    assert cfg.callbacks.early_stopping.patience == 15


def test_student_only_ablation_has_no_teacher(tmp_path: Path):
    cfg = compose_config("train_dr", ["experiment=dr_student_only"], tmp_path)
    assert list(cfg.stages) == ["student"] and cfg.distill.alpha_start == cfg.distill.alpha_end == 0


@pytest.mark.parametrize("experiment", GLAUCOMA_EXPERIMENTS)
def test_every_glaucoma_experiment_composes_and_builds_its_data_and_network(experiment, tmp_path: Path,
                                                                              monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_config("glaucoma_chain", [f"experiment={experiment}"], tmp_path / "run")
    data = instantiate(cfg.data)
    assert data.image_size == cfg.data.image_size
    module = instantiate(cfg.model.segmenter, base=8)
    assert module.net.base == 8 and module.net.dropout == cfg.model.segmenter.dropout
    for callback in cfg.chain.callbacks.values():
        assert callback._target_.startswith("callbacks.")


def test_glaucoma_paper_experiment_holds_the_study_settings(tmp_path: Path):
    cfg = compose_config("glaucoma_chain", ["experiment=glaucoma_paper"], tmp_path)
    assert list(cfg.chain.bases) == [64, 32, 16, 8] and cfg.model.segmenter.dropout == 0.3
    assert cfg.data.image_size == 256 and cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize("debug", DEBUGS)
@pytest.mark.parametrize("pipeline", ["train_dr", "glaucoma_chain"])
def test_debug_presets_compose_for_both_pipelines(pipeline, debug, tmp_path: Path):
    default = compose_config(pipeline, [], tmp_path)
    cfg = compose_config(pipeline, [f"debug={debug}"], tmp_path)
    assert cfg.data.synthetic_num_images < default.data.synthetic_num_images
    assert cfg.data.image_size < default.data.image_size
    assert cfg.trainer.max_epochs <= 2


def test_chain_overrides_reach_the_config(tmp_path: Path):
    cfg = compose_config("glaucoma_chain", ["chain.bases=[64,32,16]", "chain.arms=[prune]", "data=disc_folder",
                                            "data.root=/somewhere"], tmp_path)
    assert list(cfg.chain.bases) == [64, 32, 16] and list(cfg.chain.arms) == ["prune"]
    assert cfg.data.format == "disc_folder" and cfg.data.root == "/somewhere"


def test_command_line_overrides_reach_the_config(tmp_path: Path):
    cfg = compose_config("train_dr", ["distill.temperature=2", "trainer.max_epochs=5", "model/teacher=lite0"],
                         tmp_path)
    assert cfg.distill.temperature == 2 and cfg.trainer.max_epochs == 5
    assert cfg.model.teacher.backbone == "tf_efficientnet_lite0"


def test_bench_config_extends_the_training_config(tmp_path: Path):
    cfg = compose_config("bench", [], tmp_path)
    assert cfg.task_name == "bench" and cfg.bench.runs >= 30 and "teacher" in cfg.model
