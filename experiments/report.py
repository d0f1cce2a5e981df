"""Hydra entry point of ``make report``: an HTML and a Markdown report comparing runs of the MLflow store.

    python -m experiments.report                       # the latest dr-distill and glaucoma-iterations runs
    python -m experiments.report report.runs=[<parent run id>,<parent run id>]
    python -m experiments.report report.student_without_teacher=<parent run id> report.bench=null
    python -m experiments.report report.baselines=[<baseline parent run id>,...]   # or null: no such section

Writes ``report.html`` (self-contained), ``report.md`` and its PNGs to ``outputs/report/<time>/`` (or
``report.output_dir``), logs them to a run of the MLflow experiment ``report`` named after the selected runs,
and prints where they are. experiments/report_data.py reads the store; experiments/report_render.py writes
the pages.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from experiments.report_ablation import AblationStudy, ablation_study, latest_ablation_sweep
from experiments.report_data import (
    BootstrapSettings,
    NoRunsError,
    ReportData,
    baseline_setting,
    collect_report,
    run_id_list,
)
from experiments.report_folds import FoldSummary, fold_summary, latest_fold_sweep
from experiments.report_render import write_report
from experiments.tracking import default_artifact_root, default_tracking_uri, ensure_experiment, git_commit

log = logging.getLogger(__name__)

#: MLflow's limit on a run name
MAX_RUN_NAME = 250


def store_uri(cfg: DictConfig) -> tuple[str, bool]:
    """(tracking URI, whether it is the project's default SQLite store)."""
    if cfg.report.tracking_uri:
        return str(cfg.report.tracking_uri), False
    return default_tracking_uri(Path(cfg.paths.root_dir).resolve()), True


def report_run_name(data: ReportData) -> str:
    names = [selected.name for selected in data.selected]
    if data.baselines is not None:
        names.append("architecture baselines")
    name = f"report[{' + '.join(names)}]"
    return name if len(name) <= MAX_RUN_NAME else name[:MAX_RUN_NAME - 4] + "...]"


def log_report(client: MlflowClient, data: ReportData, files: Sequence[Path], experiment_name: str,
               project_root: Path, artifact_location: str | None) -> str:
    """A FINISHED run of ``experiment_name`` holding the report's files under ``report/``; returns its id."""
    experiment_id = ensure_experiment(client, experiment_name, artifact_location)
    commit, dirty = git_commit(project_root)
    tags = {MLFLOW_RUN_NAME: report_run_name(data), MLFLOW_GIT_COMMIT: commit,
            "git_dirty": str(dirty).lower(),
            "report.runs": ",".join(selected.parent.info.run_id for selected in data.selected)}
    if data.baselines is not None:
        tags["report.baselines"] = ",".join(parent.info.run_id for parent in data.baselines.runs)
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="report")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def read_ablation(client: MlflowClient, experiment_name: str, bootstrap: BootstrapSettings,
                  ui_url: str) -> AblationStudy | None:
    """The latest experiment=dr_ablation sweep's table, None when the store has no ablation run."""
    if client.get_experiment_by_name(experiment_name) is None:
        return None
    runs = latest_ablation_sweep(client, experiment_name)
    if not runs:
        return None
    with tempfile.TemporaryDirectory(prefix="report-ablation-") as workdir:
        return ablation_study(client, runs, bootstrap, Path(workdir), ui_url)


def read_folds(client: MlflowClient, experiment_name: str) -> FoldSummary | None:
    """The newest k-fold glaucoma-iterations sweep's summary, None when no two folds of one sweep finished."""
    runs = latest_fold_sweep(client, experiment_name)
    return fold_summary(client, runs) if runs else None


def run_report(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, Path]:
    """Read the store, write the report files, log them; returns the written files (``html``, ``markdown``,
    figures). ``output_dir``: where to write when ``report.output_dir`` is null (default: the Hydra run dir).

    Raises:
        NoRunsError: no store, or nothing in it to report on (the message says what to run first).
    """
    settings = cfg.report
    project_root = Path(cfg.paths.root_dir).resolve()
    tracking_uri, default_store = store_uri(cfg)
    database = project_root / "mlruns" / "mlflow.db"
    if default_store and not database.is_file():
        # opening a missing SQLite store would create an empty one
        raise NoRunsError(f"There is no MLflow store at {database}: run `make dr-distill` or `make "
                          "glaucoma-iterations` first (or set MLFLOW_TRACKING_URI / report.tracking_uri to "
                          "your store).")
    client = MlflowClient(tracking_uri)
    bootstrap = BootstrapSettings(**OmegaConf.to_container(settings.bootstrap, resolve=True))
    data = collect_report(client, tracking_uri, ui_url=str(settings.ui_url), run_ids=run_id_list(settings.runs),
                          experiments=OmegaConf.to_container(settings.experiments, resolve=True),
                          bench=settings.bench, student_without_teacher=settings.student_without_teacher,
                          bootstrap=bootstrap, baselines=baseline_setting(settings.get("baselines", "latest")))
    if settings.get("ablation", "latest") is not None:
        data.ablation = read_ablation(client, str(settings.experiments.get("ablation", "dr-ablation")), bootstrap,
                                      str(settings.ui_url))
    if settings.get("folds", "latest") is not None:
        data.folds = read_folds(client, str(settings.experiments.get("glaucoma", "glaucoma-iterations")))
    if settings.output_dir:
        output_dir = Path(str(settings.output_dir))
    elif output_dir is None:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
    files = write_report(data, output_dir)
    if settings.log_to_mlflow:
        run_id = log_report(client, data, list(files.values()), str(settings.experiment_name), project_root,
                            default_artifact_root(project_root) if default_store else None)
        log.info("Logged the report to MLflow run %s (experiment %s)", run_id, settings.experiment_name)
    print(f"Report: {files['html']}\n        {files['markdown']}")
    return files


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    # a progress bar per downloaded CSV would bury the report's path
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        run_report(cfg)
    except NoRunsError as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
