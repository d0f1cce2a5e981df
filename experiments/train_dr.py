"""Hydra entry point of ``make dr-distill``: teacher fit -> student distillation -> test -> report.

    python -m experiments.train_dr                                   # CPU defaults, synthetic data
    python -m experiments.train_dr data=eyepacs data.root=/data/eyepacs
    python -m experiments.train_dr -m distill.temperature=2,4,8      # a sweep
    python -m experiments.train_dr experiment=dr_baselines           # timm backbones, one run each (multirun)
    python -m experiments.train_dr hparams_search=dr_optuna distill.teacher_checkpoint=<run folder or .ckpt>
    python -m experiments.train_dr resume=true                      # continue an interrupted run
    python -m experiments.train_dr retest=true resume=outputs/dr-distill/runs/<time>   # new diagnostics, no training
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from compression.export import network_input_names, quiet_onnx_tool_logs
from datamodules.dr import DRDataModule
from experiments.config_checks import build_each_or_raise, check_dr_config
from experiments.runner import (
    RunContext,
    build_callbacks,
    check_retest,
    exit_on_user_errors,
    finishing,
    fit_and_test_stage,
    raise_for_failed_finishers,
    retest_stage,
    run_finisher,
    start_invocation,
)
from experiments.stages import DR_FINISHERS, DR_STAGES, NOT_STUDENT_ARGUMENTS
from experiments.tracking import RunState
from lightning_modules.classifier import StudentDistiller, TeacherClassifier

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("test/qwk", "test/acc", "test/f1_macro", "test/f1_weighted")


def _stage_module(cfg: DictConfig, stage: str, dm: DRDataModule, teacher_checkpoint: str | None):
    if stage == "teacher":
        return instantiate(cfg.model.teacher, class_weights=dm.class_weights)
    if stage == "baseline":
        return instantiate(cfg.model.baseline, class_weights=dm.class_weights)
    if stage == "student":
        distill = OmegaConf.to_container(cfg.distill, resolve=True)
        for key in NOT_STUDENT_ARGUMENTS:
            distill.pop(key, None)
        return instantiate(cfg.model.student, class_weights=dm.class_weights, topo_features=dm.topology_dim,
                           teacher_checkpoint=teacher_checkpoint, **distill)
    raise ValueError(f"unknown stage {stage!r}: stages are {', '.join(map(repr, DR_STAGES))}")


def _student_qat_module(cfg: DictConfig, student_checkpoint: str) -> StudentDistiller:
    """The trained student, to be fine-tuned with fake quantization (no teacher: it only learns its rounding)."""
    return _finished_module("student", student_checkpoint, lr=float(cfg.qat.lr), pct_start=float(cfg.qat.pct_start))


#: stages whose tested weights are a plain checkpoint (student_qat's are a QAT-prepared network and its file)
RETESTABLE = tuple(stage for stage in DR_STAGES if stage not in DR_FINISHERS)


def _finished_module(stage: str, checkpoint: str, **hparams):
    """The weights a finished stage was tested with (``hparams`` replace saved hyperparameters); nothing is
    downloaded, and a student is rebuilt without its teacher."""
    if stage in ("teacher", "baseline"):
        return TeacherClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True,
                                                      pretrained="none", pretrained_path=None, **hparams)
    return StudentDistiller.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, pretrained="none",
                                                 pretrained_path=None, teacher_checkpoint=None, **hparams)


def resolve_teacher_checkpoint(value: str | None) -> str | None:
    """``distill.teacher_checkpoint``: a TeacherClassifier ``.ckpt``, or the folder of a dr-distill run whose
    teacher finished (its tested checkpoint is used), so a search over the student reuses one trained teacher."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return str(path)
    state_file = path / "run_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"distill.teacher_checkpoint={value}: neither a checkpoint file nor a run folder "
                                "with run_state.json; give e.g. outputs/dr-distill/runs/<time> or its "
                                "teacher/checkpoints/<best>.ckpt")
    teacher = RunState.load_or_create(state_file, "").stages.get("teacher", {})
    if teacher.get("status") != "done":
        raise FileNotFoundError(f"distill.teacher_checkpoint={value}: that run has no finished teacher stage "
                                f"(status {teacher.get('status', 'none')!r}); finish it first with its own "
                                f"overrides plus resume={value}, or name a teacher .ckpt")
    if not Path(teacher["checkpoint"]).is_file():
        raise FileNotFoundError(f"distill.teacher_checkpoint={value}: its teacher finished, but the checkpoint it "
                                f"recorded, {teacher['checkpoint']}, is gone (was the run folder moved?); pass the "
                                "teacher's .ckpt itself, e.g. <run folder>/teacher/checkpoints/best-*.ckpt")
    log.info("Teacher checkpoint of run %s: %s", value, teacher["checkpoint"])
    return str(teacher["checkpoint"])


def _summary(ctx: RunContext, dm: DRDataModule) -> dict[str, float]:
    """Parent-run metrics: each stage's headline test metrics, its size and latency, and the majority-class floor."""
    # the majority-class accuracy, a floor for every stage (not under ``baseline/``: that is the architecture
    # baseline stage's prefix)
    summary = {"majority_class/test_acc": dm.majority_baseline_accuracy("test")}
    for stage, result in ctx.state.stages.items():
        for name in SUMMARY_METRICS:
            if name in result.get("test", {}):
                summary[f"{stage}/{name}"] = result["test"][name]
        for name, value in result.get("report", {}).items():
            summary[f"{stage}/{name}"] = value
    return summary | teacher_student_cost_ratios(ctx.state.stages)


def teacher_student_cost_ratios(stages: dict[str, dict]) -> dict[str, float]:
    """How many times the teacher's cost the student's is, in measured CPU latency (batch 1, PyTorch) and in
    MACs: what the distillation buys at inference (``distill/teacher_over_student_*``)."""
    teacher = stages.get("teacher", {}).get("report", {})
    student = stages.get("student", {}).get("report", {})
    ratios = {}
    for name, key in (("latency", "model/latency_ms_median"), ("macs", "model/macs")):
        if teacher.get(key) and student.get(key):
            ratios[f"distill/teacher_over_student_{name}"] = teacher[key] / student[key]
    return ratios


def run_dr_distill(cfg: DictConfig) -> float | None:
    """Run the configured stages; returns the last stage's best validation QWK (for sweepers)."""
    check_dr_config(cfg)  # types and ranges of the settings, before anything is read or started
    stages = list(cfg.stages)
    teacher_checkpoint = resolve_teacher_checkpoint(cfg.distill.teacher_checkpoint)
    if "student" in stages and "teacher" not in stages and teacher_checkpoint is None and cfg.distill.alpha_end > 0:
        raise ValueError("stages=[student] with distillation needs distill.teacher_checkpoint=<teacher .ckpt>; "
                         "or use distill=none (experiment=dr_student_only) to train the student alone")
    unknown = [stage for stage in stages if stage not in DR_STAGES]
    if unknown:
        raise ValueError(f"stages={stages}: unknown stage(s) {unknown}; choose from {list(DR_STAGES)}")
    if "baseline" in stages and cfg.model.get("baseline") is None:
        raise ValueError("stage 'baseline' trains model.baseline: choose one, e.g. model/baseline=resnet50 "
                         "(or experiment=dr_baselines for the whole comparison)")
    check_retest(cfg, stages)
    check_teacher_image_size(cfg)
    if "student_qat" in stages and ("student" not in stages or stages.index("student") > stages.index("student_qat")):
        raise ValueError("stage student_qat fine-tunes the trained student: list it after 'student' in stages, "
                         "e.g. stages=[teacher,student,student_qat]")
    run = start_invocation(cfg, preflight=lambda ctx, dm: _build_every_stage(cfg, ctx, stages, dm))
    ctx, dm = run.ctx, run.datamodule
    result = None
    with finishing(ctx):
        for stage in stages:
            if ctx.state.stage_done(stage) and cfg.retest and stage in RETESTABLE:
                result = retest_stage(ctx, stage, _finished_module(stage, ctx.state.stages[stage]["checkpoint"]),
                                      _stage_datamodule(cfg, stage, dm), run.tags)
            elif ctx.state.stage_done(stage):
                log.info("Stage %s already finished in %s: skipping it", stage, ctx.run_dir)
                result = ctx.state.stages[stage]
            elif stage == "student_qat":
                # an int8 student that fails its parity check fails alone: recorded, and reported at the end
                result = run_finisher(ctx, stage, partial(_run_student_qat, ctx, cfg, dm, run))
            else:
                module = _stage_module(cfg, stage, dm, teacher_checkpoint)
                result = fit_and_test_stage(ctx, stage, module, _stage_datamodule(cfg, stage, dm), run.files,
                                            run.tags, trainer_overrides=_stage_trainer_overrides(cfg, stage))
            if stage == "teacher":
                teacher_checkpoint = result["checkpoint"]
        if ctx.primary:  # DDP followers trained the same stages; the primary alone records and reports them
            summary = _summary(ctx, dm)
            ctx.tracker.log_metrics(run.parent_run_id, summary)
            _print_summary(summary)
        raise_for_failed_finishers(ctx, stages)
    return None if result is None else result.get("best_val")


def _stage_datamodule(cfg: DictConfig, stage: str, dm: DRDataModule) -> DRDataModule:
    """The teacher's images at its own resolution (``distill.teacher_image_size``), the same split; every other
    stage's at ``data.image_size``."""
    size = cfg.distill.get("teacher_image_size")
    return dm.with_image_size(int(size)) if stage == "teacher" and size is not None else dm


def check_teacher_image_size(cfg: DictConfig) -> None:
    """A teacher at another resolution than its student can only teach through offline soft targets, made from
    images at its own size (online KD would show it the student's); and a teacher trained by another run must be
    given the size it was trained at, or its targets would describe images it never saw."""
    size = cfg.distill.get("teacher_image_size")
    student_size = int(cfg.data.image_size)
    offline = OmegaConf.select(cfg, "callbacks.offline_distillation.enabled", default=False)
    if size is not None and int(size) != student_size and "student" in cfg.stages and not offline:
        raise ValueError(f"distill.teacher_image_size={size} differs from data.image_size={student_size}, which "
                         "needs the teacher's soft targets computed offline at its own size: remove "
                         "callbacks.offline_distillation.enabled=false, or drop distill.teacher_image_size")
    folder = cfg.distill.get("teacher_checkpoint")
    config_file = Path(folder) / "config.yaml" if folder is not None else None
    if config_file is None or not config_file.is_file():
        return
    trained = OmegaConf.load(config_file)
    trained_size = OmegaConf.select(trained, "distill.teacher_image_size", default=None)
    trained_size = int(trained_size if trained_size is not None else trained.data.image_size)
    wanted = int(size) if size is not None else student_size
    if trained_size != wanted:
        raise ValueError(f"distill.teacher_checkpoint={folder}: that teacher was trained at {trained_size} px, but "
                         f"this run would grade its images at {wanted} px; add distill.teacher_image_size="
                         f"{trained_size}")


def _stage_trainer_overrides(cfg: DictConfig, stage: str) -> dict[str, int] | None:
    """The teacher's own epoch count (``distill.teacher_epochs``): a teacher must know more than its student,
    and on 2 cores its epochs cost half a student's."""
    epochs = cfg.distill.get("teacher_epochs")
    return {"max_epochs": int(epochs)} if stage == "teacher" and epochs is not None else None


def _build_every_stage(cfg: DictConfig, ctx: RunContext, stages: list[str], dm: DRDataModule) -> None:
    """Build each unfinished stage's module and callbacks once, and drop them, before the first stage trains:
    an argument its class does not take (``+distill.temprature=2``) or refuses fails in seconds, not after the
    teacher has trained. The student is built without its teacher, which only a trained teacher provides."""
    def build(stage: str, folder: Path) -> None:
        if stage == "student_qat":
            instantiate(cfg.qat.callback, output_dir=str(folder), input_names=["image"])
        else:
            _stage_module(cfg, stage, dm, teacher_checkpoint=None)
        build_callbacks(cfg.callbacks, folder)

    build_each_or_raise({stage: partial(build, stage) for stage in stages if not ctx.state.stage_done(stage)})


def _run_student_qat(ctx: RunContext, cfg: DictConfig, dm: DRDataModule, run) -> dict:
    module = _student_qat_module(cfg, ctx.state.stages["student"]["checkpoint"])
    input_names = network_input_names(module.net)
    qat = instantiate(cfg.qat.callback, output_dir=str(ctx.run_dir / "student_qat"), input_names=input_names)
    # the int8 file is written from the last epoch's weights, so those are tested
    return fit_and_test_stage(ctx, "student_qat", module, dm, run.files, run.tags, extra_callbacks=[qat],
                                trainer_overrides={"max_epochs": int(cfg.qat.max_epochs)},
                                test_final_weights=True)


def _print_summary(summary: dict[str, float]) -> None:
    lines = ["", "Result (test split):"]
    lines += [f"  {name:<40} {value:.4f}" for name, value in sorted(summary.items())]
    log.info("\n".join(lines))


@hydra.main(version_base="1.3", config_path="conf", config_name="train_dr")
def main(cfg: DictConfig) -> float | None:
    quiet_onnx_tool_logs()  # the student_qat stage's int8 export would print pages
    return exit_on_user_errors(lambda: run_dr_distill(cfg))


if __name__ == "__main__":
    main()
