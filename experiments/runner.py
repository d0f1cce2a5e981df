"""Glue shared by the Hydra entry points: run directories, resume, per-stage Trainer, MLflow context."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from compression.parity import DeployableParityError
from datamodules.errors import DataValidationError
from experiments.config_checks import ConfigError
from experiments.distributed import (
    FAILED,
    PrimaryStageError,
    check_accelerator,
    check_single_run_for_ddp,
    is_primary_process,
    leave_process_group,
    single_device_overrides,
    wait_for_stage,
)
from experiments.stages import run_key_as_overrides, split_run_key
from experiments.tracking import (
    RunState,
    RunTracker,
    default_artifact_root,
    default_tracking_uri,
    find_resumable_run,
    flatten_params,
    standard_tags,
)

log = logging.getLogger(__name__)

#: how long a follower waits for the primary to test a stage (on one device, with every diagnostics callback);
#: a primary that fails records it at once, and one that is killed ends its own followers' wait too
FOLLOWER_TIMEOUT_S = 24 * 3600.0
#: how often a follower reads run_state.json while it waits
FOLLOWER_POLL_S = 2.0


@dataclass
class RunContext:
    """Where this invocation writes, what it has done, and its MLflow runs.

    Under DDP every process has one: the primary (global rank 0) writes the files and MLflow runs; a follower
    (``primary=False``) reads the same state, trains with it, writes nothing and has no ``tracker``.
    """

    cfg: DictConfig
    project_root: Path
    run_dir: Path
    run_key: str
    overrides: list[str]
    state: RunState
    tracker: RunTracker | None
    primary: bool = True

    @property
    def resuming(self) -> bool:
        return bool(self.cfg.resume)


def hydra_run_info() -> tuple[Path, str, list[str]]:
    """(output dir, override dirname, task overrides) of the current Hydra job."""
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.override_dirname, list(hydra_cfg.overrides.task)


def run_name(task_name: str, override_dirname: str) -> str:
    """Experiment + overrides, e.g. ``dr-distill[distill.temperature=2]``: readable and never random."""
    return f"{task_name}[{override_dirname}]" if override_dirname else task_name


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (parallel sweep jobs of the joblib launcher, DDP processes started by
    torchrun) around work that must happen once: creating the SQLite MLflow store and its experiment (two jobs
    would race on "table ... already exists"), generating and caching the data (one job would read the other's
    half-written image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_context(cfg: DictConfig) -> RunContext:
    primary = is_primary_process(os.environ)
    project_root = Path(cfg.paths.root_dir).resolve()
    output_dir, override_dirname, overrides = hydra_run_info()
    run_key = override_dirname or "(defaults)"
    run_dir = output_dir
    if cfg.resume:
        if isinstance(cfg.resume, str) and cfg.resume.lower() not in {"true", "1", "yes"}:
            run_dir = Path(cfg.resume).resolve()
            if not (run_dir / "run_state.json").is_file():
                raise FileNotFoundError(f"resume={cfg.resume}: no run_state.json in {run_dir}")
        else:
            task_dir = Path(cfg.paths.output_root).resolve() / cfg.task_name
            found = find_resumable_run(task_dir, run_key)
            if found is None:
                log.warning("resume=true: no unfinished %s run with overrides %s; starting a new one",
                            cfg.task_name, run_key)
            else:
                run_dir = found
                log.info("Resuming the run in %s", run_dir)
    state = RunState.load_or_create(run_dir / "run_state.json", run_key)
    if not primary:
        return RunContext(cfg, project_root, run_dir, run_key, overrides, state, tracker=None, primary=False)
    tracking_uri = cfg.logger.tracking_uri or default_tracking_uri(project_root)
    artifact_location = None if cfg.logger.tracking_uri else default_artifact_root(project_root)
    if not cfg.logger.tracking_uri:
        (project_root / "mlruns").mkdir(parents=True, exist_ok=True)
    # a tracking server orders its own writes; the local SQLite store is created by the first job only
    with _file_lock(project_root / "mlruns" / ".store-setup.lock") if not cfg.logger.tracking_uri else nullcontext():
        tracker = RunTracker(tracking_uri, cfg.logger.experiment_name, run_name(cfg.task_name, override_dirname),
                             state, artifact_location)
    return RunContext(cfg, project_root, run_dir, run_key, overrides, state, tracker)


#: overrides that only choose which stages run: a retest may add them to a run's own overrides (a chain
#: resumed with finishers, say), since every stage it would test must have finished anyway
STAGE_SELECTION_KEYS = frozenset({"stages", "chain.bases", "chain.arms", "chain.finishers", "chain.finish_after"})


@dataclass
class Invocation:
    """One run of an entry point: its context, validated data, the files and tags every child run gets."""

    ctx: RunContext
    datamodule: Any
    files: list[Path]
    tags: dict[str, str]
    parent_run_id: str | None


def start_invocation(cfg: DictConfig, preflight: Callable[[RunContext, Any], None] | None = None) -> Invocation:
    """Seed, read and validate the data (before anything trains), then open (or reopen) the parent run.

    The datamodule must offer ``prepare_data``, ``setup``, ``split_table()``, ``fingerprint`` and ``is_synthetic``,
    and may offer ``skipped`` (the files ``data.skip_unusable=true`` left out: saved as skipped_files.csv).
    ``preflight(ctx, datamodule)`` runs after the data is set up and before the parent run is opened (see
    ``experiments.config_checks.ConfigError``). A trainer that wants GPUs this machine lacks stops everything
    first. A follower process (DDP rank > 0) reads the same data and writes nothing: its invocation has no
    files, tags or parent run of its own.
    """
    check_accelerator(cfg.trainer, torch.cuda.is_available(), torch.cuda.device_count())
    check_single_run_for_ddp(cfg.trainer, HydraConfig.get().mode == RunMode.MULTIRUN)
    ctx = create_context(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    datamodule = instantiate(cfg.data)
    with _file_lock(Path(cfg.paths.cache_dir).resolve() / ".prepare-data.lock"):
        datamodule.prepare_data()
        datamodule.setup()  # validates every file and split: bad data stops the run here, with the list of problems
    if preflight is not None:  # e.g. every stage's module built once: a bad argument fails now, not after a stage
        preflight(ctx, datamodule)
    if not ctx.primary:
        return Invocation(ctx, datamodule, [], {}, ctx.state.parent_run_id)
    config_file = save_resolved_config(cfg, ctx.run_dir / "config.yaml")
    split_file = ctx.run_dir / "splits.csv"
    datamodule.split_table().to_csv(split_file, index=False)
    files = [config_file, split_file]
    skipped = getattr(datamodule, "skipped", None)
    if skipped is not None and len(skipped):  # data.skip_unusable=true left files out: every run shows which
        skipped_file = ctx.run_dir / "skipped_files.csv"
        skipped.to_csv(skipped_file, index=False)
        files.append(skipped_file)
    tags = standard_tags(ctx.project_root, ctx.overrides, datamodule.fingerprint, datamodule.is_synthetic)
    if cfg.get("optuna_trial") is not None:  # a trial of hparams_search (experiments/sweeps.py)
        tags["optuna_trial"] = str(cfg.optuna_trial)
    parent = ctx.tracker.start_parent(tags)
    ctx.tracker.log_context(parent, config_params(cfg), files)
    ctx.tracker.log_metrics(parent, {"data/skipped_files": float(0 if skipped is None else len(skipped))})
    log.info("MLflow run %s (%s) in experiment %s; outputs in %s", ctx.tracker.run_name, parent,
             cfg.logger.experiment_name, ctx.run_dir)
    return Invocation(ctx, datamodule, files, tags, parent)


@contextmanager
def finishing(ctx: RunContext) -> Iterator[None]:
    """Close every MLflow run of the invocation with the right status; a finished body marks the run complete.

    A failure marks the stages still running as failed in run_state.json, which ends the followers' wait for
    them. Followers record nothing.
    """
    if not ctx.primary:
        yield
        return
    status = "FAILED"
    try:
        yield
        ctx.state.complete = True
        ctx.state.save()
        status = "FINISHED"
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            status = "KILLED"
            log.warning("Interrupted: rerun with resume=true to skip the finished stages and continue the last one")
        _mark_running_stages_failed(ctx.state, f"{type(error).__name__}: {error}")
        raise
    finally:
        ctx.tracker.finish(status)


def _mark_running_stages_failed(state: RunState, error: str) -> None:
    running = [record for record in state.stages.values() if record.get("status") == "running"]
    for record in running:
        record.update(status=FAILED, error=error)
    if running:
        state.save()


#: run_state.json's ``failure`` of a finisher whose deployable file failed its parity check
PARITY_FAILURE = "parity"
#: the tag of such a finisher's (FAILED) child run that holds the reason
FAILURE_TAG = "failure_reason"


class FinisherFailures(RuntimeError):
    """Finishers whose deployable file failed its parity check; raised once every other stage and the summary
    are done, so that the command still exits non-zero."""


def run_finisher(ctx: RunContext, stage: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` (the finisher's ``fit_and_test_stage``), except that a deployable file failing its parity check
    fails this stage alone instead of the invocation: a finisher only adds a file, so the chain's other stages
    and its summary are still worth having.

    The failure goes to run_state.json (``status: failed``, ``failure: parity``, ``error``: the reason,
    ``parity``: the numbers, ``file``) and to the stage's child run (FAILED, the reason as tag
    ``failure_reason``, the numbers as metrics); the record is returned. ``resume`` retries such a stage, from its
    ``last.ckpt``. Any other error propagates. A follower (DDP rank > 0) returns the primary's record of it.
    """
    if ctx.primary:
        _clear_failure_tag(ctx, stage)
    try:
        return run()
    except DeployableParityError as error:  # raised on the primary alone, which measures the file
        return _record_parity_failure(ctx, stage, error)
    except PrimaryStageError:
        record = RunState.load_or_create(ctx.state.path, ctx.run_key).stages.get(stage, {})
        if ctx.primary or record.get("failure") != PARITY_FAILURE:
            raise
        ctx.state.stages[stage] = record
        return record


def raise_for_failed_finishers(ctx: RunContext, stages: list[str]) -> None:
    """At the end of an invocation: :class:`FinisherFailures` naming the ``stages`` that failed their parity check
    (after ``run_finisher``), if any."""
    failed = {name: ctx.state.stages[name] for name in stages
              if ctx.state.stages.get(name, {}).get("failure") == PARITY_FAILURE}
    if failed:
        reasons = "; ".join(f"{name}: {record.get('error')}" for name, record in failed.items())
        raise FinisherFailures(
            f"{len(failed)} finisher stage(s) failed the parity check of their deployable file ({reasons}). The "
            f"other stages and the summary are done in {ctx.run_dir}. To retry, rerun with resume={ctx.run_dir} "
            "and more fine-tuning epochs or a looser tolerance (or resume=true with the same overrides)")


def exit_on_user_errors(job: Callable[[], Any]) -> Any:
    """An entry point's job (``main`` of dr-distill and glaucoma-iterations): a problem the user fixes ends it with
    one logged message instead of a traceback, exit code 2 when nothing was trained (bad data or settings) and 1
    when finishers failed their parity check (everything else done)."""
    try:
        return job()
    except DataValidationError as error:
        log.error("Data problem, nothing was trained:\n%s", error)
        sys.exit(2)
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(2)
    except FinisherFailures as error:
        log.error("%s", error)
        sys.exit(1)


def _record_parity_failure(ctx: RunContext, stage: str, error: DeployableParityError) -> dict[str, Any]:
    record = {"status": FAILED, "failure": PARITY_FAILURE, "error": error.reason, "file": str(error.path),
              "parity": error.metrics}
    ctx.state.stages[stage] = record
    ctx.state.save()
    run_id = ctx.state.child_run_ids.get(stage)
    if run_id is not None:
        ctx.tracker.client.set_tag(run_id, FAILURE_TAG, error.reason)
        # the callback logged them already at its last step (where MLflow shows them): the same values again there
        ctx.tracker.log_metrics(run_id, error.metrics, step=ctx.tracker.last_step(run_id, error.metrics))
        ctx.tracker.client.set_terminated(run_id, "FAILED")
    log.error("Stage %s failed the parity check of %s: %s. It is recorded as failed; the other stages go on",
              stage, error.path, error.reason)
    return record


def _clear_failure_tag(ctx: RunContext, stage: str) -> None:
    """A retried finisher reuses its child run: the reason of its last failure must not outlive it."""
    run_id = ctx.state.child_run_ids.get(stage)
    if (ctx.state.stages.get(stage, {}).get("failure") == PARITY_FAILURE and run_id is not None
            and FAILURE_TAG in ctx.tracker.client.get_run(run_id).data.tags):
        ctx.tracker.client.delete_tag(run_id, FAILURE_TAG)


def save_resolved_config(cfg: DictConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def config_params(cfg: DictConfig) -> dict[str, str]:
    """Flat params for MLflow (short values only: the full config is an artifact)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("paths", None)
    return flatten_params(container)


def build_callbacks(callbacks_cfg: DictConfig, stage_dir: Path,
                    overrides: dict[str, dict[str, Any]] | None = None) -> list[Callback]:
    """Instantiate the callbacks group, each with its ``overrides[name]`` arguments; ``dirpath``/``weights_dir``
    keys get this stage's folders."""
    callbacks = []
    for name, node in (callbacks_cfg or {}).items():
        if node is None or "_target_" not in node:
            continue
        extra: dict[str, Any] = dict((overrides or {}).get(name, {}))
        if "dirpath" in node:
            extra["dirpath"] = str(stage_dir / "checkpoints")
        if "weights_dir" in node:
            extra["weights_dir"] = str(stage_dir)
        log.debug("callback %s", name)
        callbacks.append(instantiate(node, **extra))
    return callbacks


def _stage_trainer(ctx: RunContext, stage: str, tags: dict[str, str], callbacks: list[Callback],
                   trainer_overrides: dict[str, Any] | None = None, logger: Any = None) -> tuple[L.Trainer, Any]:
    """The stage's Trainer, logging to its child run (created once, reused on resume and retest), or to
    ``logger`` where given (False: none, a follower's)."""
    # Lightning's log_model would upload best *and* last checkpoint; only the best one is worth keeping.
    if logger is None:
        logger = ctx.tracker.child_logger(stage, tags, log_model=False)
    trainer = instantiate(ctx.cfg.trainer, callbacks=callbacks, logger=logger,
                          default_root_dir=str(ctx.run_dir / stage), **(trainer_overrides or {}))
    return trainer, logger


def _test_trainer(ctx: RunContext, stage: str, tags: dict[str, str], callbacks: list[Callback],
                  trainer_overrides: dict[str, Any] | None = None, logger: Any = None) -> tuple[L.Trainer, Any]:
    """The stage's Trainer on one device (see ``single_device_overrides``): every test-only Trainer, and the
    primary's test after a distributed fit."""
    overrides = (trainer_overrides or {}) | single_device_overrides(ctx.cfg.trainer)
    return _stage_trainer(ctx, stage, tags, callbacks, overrides, logger)


#: callbacks that only log, and that Lightning refuses on a Trainer without a logger (a follower's)
LOGGING_ONLY_CALLBACKS = (LearningRateMonitor, DeviceStatsMonitor)


def callback_reports(callbacks: list[Callback]) -> dict[str, float]:
    """Every callback's ``report`` (model report, compression and deployment callbacks), merged in order."""
    report: dict[str, float] = {}
    for callback in callbacks:
        report |= getattr(callback, "report", {})
    return report


def check_retest(cfg: DictConfig, stages: list[str]) -> None:
    """Before anything starts: ``retest=true`` needs the folder of a run (``resume=true`` would find only
    unfinished runs, and otherwise start, and train, a new one), trained with these same overrides (others would
    test it on other data and write its deployment files with another preprocessing), whose ``stages`` all
    finished (retest trains nothing)."""
    if not cfg.get("retest"):
        return
    if not cfg.resume or str(cfg.resume).lower() in {"true", "1", "yes"}:
        raise ValueError(f"retest=true tests the finished stages of an earlier run again: give that run's folder, "
                         f"e.g. retest=true resume={cfg.paths.output_root}/{cfg.task_name}/runs/<time>")
    run_dir = Path(cfg.resume).resolve()
    state_file = run_dir / "run_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"retest=true resume={cfg.resume}: no run_state.json in {run_dir}")
    state = RunState.load_or_create(state_file, "")
    run_key = hydra_run_info()[1] or "(defaults)"
    trained, today = split_run_key(state.run_key), split_run_key(run_key)
    if {k: v for k, v in today.items() if k not in STAGE_SELECTION_KEYS} != {
            k: v for k, v in trained.items() if k not in STAGE_SELECTION_KEYS}:
        raise ValueError(f"retest=true on {run_dir}: that run was trained with the overrides "
                         f"{run_key_as_overrides(state.run_key)!r}, this invocation has {run_key_as_overrides(run_key)!r}. "
                         f"Rerun with its own: {run_key_as_overrides(state.run_key)} retest=true resume={run_dir}")
    unfinished = [stage for stage in stages if not state.stage_done(stage)]
    if unfinished:
        raise ValueError(f"retest=true trains nothing, but stages {unfinished} of {run_dir} never finished: "
                         f"finish them first (the same overrides with resume={run_dir}), then retest")


def retest_stage(
    ctx: RunContext,
    stage: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    extra_tags: dict[str, str],
) -> dict[str, Any]:
    """Test a finished stage's tested weights (already in ``module``) again with today's callbacks, into its own
    child run: what a suite that gained diagnostics or deployment files since the run trained adds to it without
    retraining. Checkpoints and training state stay as they are; the recorded test metrics and report are updated.
    The primary tests on one device; followers (DDP ranks > 0) return the recorded result as it is.
    """
    if not ctx.primary:
        return ctx.state.stages[stage]
    callbacks = build_callbacks(ctx.cfg.callbacks, ctx.run_dir / stage)
    trainer, logger = _test_trainer(ctx, stage, extra_tags, callbacks)
    # The run logged these hyperparameters when it trained; a module rebuilt from its files differs in paths
    # (e.g. network_path), which MLflow refuses to overwrite. This is what save_hyperparameters(logger=False) sets.
    module._log_hyperparams = False
    trainer.test(module, datamodule=datamodule)
    result = ctx.state.stages[stage]
    result["test"] = dict(module.test_results)
    result["report"] = result.get("report", {}) | callback_reports(callbacks)
    ctx.state.save()
    # Lightning logged them at this trainer's step 0, below the training run's steps, and MLflow shows a
    # metric's value at its largest step: log them again past the old ones so that the new values are shown.
    metrics = result["test"] | result["report"]
    ctx.tracker.log_metrics(logger.run_id, metrics, step=ctx.tracker.last_step(logger.run_id, metrics) + 1)
    log.info("Stage %s tested again from its finished weights (retest=true)", stage)
    return result


def fit_and_test_stage(
    ctx: RunContext,
    stage: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    context_files: list[Path],
    extra_tags: dict[str, str],
    extra_callbacks: list[Callback] | None = None,
    extra_params: dict[str, str] | None = None,
    trainer_overrides: dict[str, Any] | None = None,
    test_final_weights: bool = False,
    callback_overrides: dict[str, dict[str, Any]] | None = None,
    add_outputs: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fit (resuming from ``last.ckpt`` where one exists), test the best checkpoint (or, with
    ``test_final_weights``, the weights training ended with), record the result.

    ``extra_callbacks`` (a stage's own, e.g. pruning or distillation) run after the configured ones, which get
    ``callback_overrides[<key in the callbacks group>]`` as extra arguments. ``add_outputs(result)`` adds what the
    stage writes from its tested weights (e.g. a network file) to the result before it is recorded as done.
    Returns ``{"checkpoint": path, "test": metrics, "report": every callback's report, "best_val": score}``.

    Under DDP every process fits; the primary (global rank 0) then tests alone, on one device, and records the
    result, which the followers wait for and return.
    """
    cfg = ctx.cfg
    stage_dir = ctx.run_dir / stage
    callbacks = build_callbacks(cfg.callbacks, stage_dir, callback_overrides) + list(extra_callbacks or [])
    last = stage_dir / "checkpoints" / "last.ckpt"
    resume_from = str(last) if ctx.resuming and last.is_file() else None
    if not ctx.primary:
        return _follow_stage(ctx, stage, module, datamodule, callbacks, trainer_overrides, resume_from)
    trainer, logger = _stage_trainer(ctx, stage, extra_tags, callbacks, trainer_overrides)
    ctx.tracker.log_context(logger.run_id, config_params(cfg) | (extra_params or {}), context_files)
    if resume_from:
        log.info("Stage %s: continuing from %s", stage, resume_from)
    ctx.state.stages[stage] = {"status": "running"}
    ctx.state.save()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except DeployableParityError:
        if trainer.world_size > 1:
            # the followers wait at the end of the fit; released, they read the failure from run_state.json
            _end_distributed_fit(trainer)
        raise
    tester = trainer
    if trainer.world_size > 1:
        _end_distributed_fit(trainer)
        tester, _ = _test_trainer(ctx, stage, extra_tags, callbacks, trainer_overrides, logger)

    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    best_val = float(checkpoint.best_model_score) if checkpoint is not None and checkpoint.best_model_score is not None else None
    if not best or test_final_weights:
        # fast_dev_run and runs without a checkpoint callback save nothing, and a stage whose deployable file
        # is written from its last epoch must be tested on that epoch's weights: keep the final weights.
        # Weights only: last.ckpt already holds the training state, and the optimizer's moments would triple
        # the file (and its MLflow copy).
        best = str(stage_dir / "checkpoints" / "final.ckpt")
        trainer.save_checkpoint(best, weights_only=True)
        tester.test(module, datamodule=datamodule)
    else:
        tester.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
    if cfg.logger.log_model:
        ctx.tracker.client.log_artifact(logger.run_id, best, artifact_path="checkpoint")
    result = {"status": "done", "checkpoint": best, "best_val": best_val,
              "test": dict(module.test_results), "report": callback_reports(callbacks)}
    if add_outputs is not None:
        add_outputs(result)
    ctx.state.stages[stage] = result
    ctx.state.save()
    return result


def _end_distributed_fit(trainer: L.Trainer) -> None:
    """Every process leaves the process group together after a distributed fit (see ``leave_process_group``)."""
    trainer.strategy.barrier("end of the distributed fit")
    leave_process_group()


def _follow_stage(ctx: RunContext, stage: str, module: L.LightningModule, datamodule: L.LightningDataModule,
                  callbacks: list[Callback], trainer_overrides: dict[str, Any] | None,
                  resume_from: str | None) -> dict[str, Any]:
    """A follower's part of a stage: the same fit with the same callbacks (checkpointing and early stopping
    decide alike on every process) and no logger; then the primary's recorded result."""
    callbacks = [callback for callback in callbacks if not isinstance(callback, LOGGING_ONLY_CALLBACKS)]
    trainer, _ = _stage_trainer(ctx, stage, {}, callbacks, trainer_overrides, logger=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    _end_distributed_fit(trainer)
    launcher = os.getppid()
    # Lightning starts local ranks > 0 from rank 0's process: when that parent is gone, rank 0 is. A process
    # started by hand (local rank 0 of another node) has a shell as its parent, which may exit at logout.
    started_by_rank_zero = os.environ.get("LOCAL_RANK", "0") != "0"
    log.info("Stage %s trained; waiting for the primary process to test it", stage)
    result = wait_for_stage(ctx.state.path, stage, FOLLOWER_TIMEOUT_S, FOLLOWER_POLL_S,
                            launcher_alive=(lambda: os.getppid() == launcher) if started_by_rank_zero else None)
    ctx.state.stages[stage] = result
    return result
