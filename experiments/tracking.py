"""MLflow bookkeeping shared by the entry points: one parent run per invocation, a child per stage.

The store defaults to SQLite at ``<project>/mlruns/mlflow.db`` with artifacts under
``<project>/mlruns/artifacts`` (MLflow 3 no longer accepts the old ``file:`` store);
``MLFLOW_TRACKING_URI`` points everything at another store, e.g. a team's tracking server.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

log = logging.getLogger(__name__)

# MLflow's own limit on a param value; longer values (lists, paths) go to the config artifact only.
MAX_PARAM_LENGTH = 500
#: what kind of work an experiment holds, as the MLflow UI reads it: training runs, not GenAI traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri(project_root: Path) -> str:
    return f"sqlite:///{(project_root / 'mlruns' / 'mlflow.db').resolve()}"


def default_artifact_root(project_root: Path) -> str:
    return (project_root / "mlruns" / "artifacts").resolve().as_uri()


def git_commit(project_root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project checkout; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}`` for MLflow params, skipping values too long to be useful."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten_params(value, prefix=f"{name}.")
        else:
            text = str(value)
            if len(text) <= MAX_PARAM_LENGTH:
                flat[name] = text
    return flat


@dataclass
class RunState:
    """What a run directory has finished, so ``resume=true`` continues instead of starting over."""

    path: Path
    run_key: str
    parent_run_id: str | None = None
    child_run_ids: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False

    @classmethod
    def load_or_create(cls, path: Path, run_key: str) -> RunState:
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("path", None)
            return cls(path=path, **data)
        return cls(path=path, run_key=run_key)

    def save(self) -> None:
        data = asdict(self)
        data.pop("path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.path)

    def stage_done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == "done"


def find_resumable_run(task_dir: Path, run_key: str) -> Path | None:
    """The newest unfinished run directory of this task with the same overrides (``resume=true``)."""
    candidates = []
    for state_file in task_dir.glob("**/run_state.json"):
        try:
            data = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("run_key") == run_key and not data.get("complete"):
            candidates.append(state_file)
    if not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored) when needed and tagged for MLflow 3's UI."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
        # MLflow 3's UI opens an experiment without this tag on its GenAI (traces) overview
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id


class RunTracker:
    """Creates (or, on resume, reopens) the parent run and its per-stage child runs."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str, state: RunState,
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.state = state
        self.experiment_id = self._experiment(artifact_location)

    def _experiment(self, artifact_location: str | None) -> str:
        return ensure_experiment(self.client, self.experiment_name, artifact_location)

    def _run(self, run_id: str | None, name: str, tags: dict[str, str]) -> str:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, tags={MLFLOW_RUN_NAME: name, **tags}).info.run_id

    def start_parent(self, tags: dict[str, str]) -> str:
        self.state.parent_run_id = self._run(self.state.parent_run_id, self.run_name, tags)
        self.state.save()
        return self.state.parent_run_id

    def child_logger(self, stage: str, tags: dict[str, str], log_model: bool = True) -> MLFlowLogger:
        """An MLFlowLogger writing to the stage's child run (created once, reused on resume)."""
        run_id = self._run(self.state.child_run_ids.get(stage), stage,
                           {MLFLOW_PARENT_RUN_ID: self.state.parent_run_id, **tags})
        self.state.child_run_ids[stage] = run_id
        self.state.save()
        return MLFlowLogger(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, run_id=run_id,
                            log_model=log_model)

    def log_context(self, run_id: str, params: dict[str, str], files: list[Path]) -> None:
        """Params (once each: a resumed run logs the same values again, which MLflow accepts) and files."""
        existing = self.client.get_run(run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        changed = {k for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            log.warning("Not re-logging params that changed since this run started: %s", sorted(changed))
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in fresh.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[start:start + 100])
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path="run")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def last_step(self, run_id: str, keys: Iterable[str]) -> int:
        """The largest step any of ``keys`` was logged at in ``run_id`` (0 for none)."""
        return max((m.step for key in keys for m in self.client.get_metric_history(run_id, key)), default=0)

    def finish(self, status: str = "FINISHED") -> None:
        for run_id in [*self.state.child_run_ids.values(), self.state.parent_run_id]:
            if run_id is not None and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status)


def standard_tags(project_root: Path, overrides: list[str], data_fingerprint: str, synthetic: bool) -> dict[str, str]:
    commit, dirty = git_commit(project_root)
    return {
        MLFLOW_GIT_COMMIT: commit,
        "git_dirty": str(dirty).lower(),
        "overrides": " ".join(overrides) or "(none)",
        "data_fingerprint": data_fingerprint,
        "synthetic_data": str(synthetic).lower(),
    }


# ------------------------------------------------------------ reading runs back (make report, make predict)
def is_parent(run: Run) -> bool:
    return MLFLOW_PARENT_RUN_ID not in run.data.tags


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The runs whose ``mlflow.parentRunId`` tag names ``parent``, oldest first."""
    return list(client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
                                   order_by=["attributes.start_time ASC"]))


def download_artifact(client: MlflowClient, run: Run, path: str, workdir: Path) -> Path | None:
    """The run's artifact ``path`` downloaded under ``workdir``; None when the run has no such artifact."""
    folder = str(Path(path).parent)
    listed = {item.path for item in client.list_artifacts(run.info.run_id, None if folder == "." else folder)}
    if path not in listed:
        return None
    destination = workdir / run.info.run_id
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run.info.run_id, path, str(destination)))


def read_csv_artifact(client: MlflowClient, run: Run, path: str, workdir: Path) -> pd.DataFrame | None:
    local = download_artifact(client, run, path, workdir)
    return None if local is None else pd.read_csv(local)
