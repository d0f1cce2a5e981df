"""The shared tracking server for real: PostgreSQL and `mlflow server` started on free loopback ports by
experiments.tracking_server (what `make tracking-server` runs), a tiny teacher-only run logged to it through
``MLFLOW_TRACKING_URI``, and the runs read back through the server and straight from PostgreSQL.

Needs Debian's postgresql package (`make test-e2e` installs it when missing and run as root).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from experiments.tracking_server import (
    DATABASE,
    OPTUNA_DATABASE,
    ROLE,
    ServerStatus,
    TrackingServerError,
    TrackingServerSettings,
    ensure_port_free,
    find_postgres_bin_dir,
    start,
    status,
    stop,
)

REPO = Path(__file__).resolve().parents[2]
# initdb, PostgreSQL's first start and `mlflow server` creating its tables share 2 busy cores with training
SERVER_START_TIMEOUT_S = 300
# debug=tiny: debug=smoke cut to one epoch of two batches (under a minute); no ONNX bundle nor GradCAM figures
SMOKE_OVERRIDES = ["debug=tiny", "stages=[teacher]", "callbacks.deployment_bundle=null",
                   "callbacks.grading_explanations=null"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _free_loopback_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all open at once, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def tracking_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is closed to other users, and as root the cluster runs
    # as the postgres user, which must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="tracking-e2e-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tracking_dir: Path) -> Iterator[tuple[TrackingServerSettings, ServerStatus]]:
    try:
        find_postgres_bin_dir()
    except TrackingServerError as error:
        pytest.fail(f"{error} (`make test-e2e` installs it when run as root)")
    pg_port, port = _free_loopback_ports(2)
    # one uvicorn worker: the default four take minutes to start on a busy 2-core machine
    settings = TrackingServerSettings(tracking_dir, pg_port=pg_port, port=port, workers=1)
    try:
        yield settings, start(settings, timeout_s=SERVER_START_TIMEOUT_S)
    finally:
        stop(settings)


@pytest.fixture(scope="module")
def smoke_run(server, tmp_path_factory) -> str:
    """A `make dr-distill ARGS="debug=tiny stages=[teacher] ..."` run logged to the server; returns the
    server's URI."""
    _, state = server
    project = tmp_path_factory.mktemp("tracking_project")
    env = os.environ | {"PROJECT_ROOT": str(project), "MLFLOW_TRACKING_URI": state.tracking_uri}
    completed = subprocess.run([sys.executable, "-m", "experiments.train_dr", *SMOKE_OVERRIDES], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not (project / "mlruns" / "mlflow.db").exists(), "the run went to the SQLite store, not the server"
    return state.tracking_uri


def _runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dr-distill")
    assert experiment is not None, f"no experiment dr-distill on {tracking_uri}"
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_the_smoke_run_and_its_teacher_child_are_read_back_through_the_server(smoke_run: str):
    _, experiment, runs = _runs(smoke_run)
    # artifacts go through the server (mlflow-artifacts:), not to a path the clients would have to share
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name.startswith("dr-distill[") and parent.info.status == "FINISHED"
    assert [child.info.run_name for child in children] == ["teacher"]
    teacher = children[0]
    assert teacher.data.tags["mlflow.parentRunId"] == parent.info.run_id
    qwk = teacher.data.metrics["test/qwk"]
    assert math.isfinite(qwk) and -1.0 <= qwk <= 1.0  # Cohen's kappa lies in [-1, 1]


def test_an_artifact_is_uploaded_to_and_downloaded_from_the_server(smoke_run: str, server, tmp_path: Path):
    settings, _ = server
    client, _, runs = _runs(smoke_run)
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    local = Path(client.download_artifacts(parent.info.run_id, "run/config.yaml", str(tmp_path)))
    config = yaml.safe_load(local.read_text())
    assert config["task_name"] == "dr-distill" and config["stages"] == ["teacher"]
    # ...and the server keeps it in its own folder
    stored = list(settings.artifacts_dir.glob(f"*/{parent.info.run_id}/artifacts/run/config.yaml"))
    assert [path.read_text() for path in stored] == [local.read_text()]


def test_the_runs_live_in_postgresql(smoke_run: str, server):
    import psycopg

    settings, state = server
    _, _, runs = _runs(smoke_run)
    connection = psycopg.connect(host="127.0.0.1", port=state.postgres_port, dbname=DATABASE, user=ROLE,
                                 passfile=str(settings.passfile))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT r.run_uuid FROM runs r JOIN experiments e "
                           "ON r.experiment_id = e.experiment_id WHERE e.name = 'dr-distill'")
            stored = {row[0] for row in cursor.fetchall()}
            cursor.execute("SELECT datname FROM pg_database WHERE datname = %s", (OPTUNA_DATABASE,))
            optuna = cursor.fetchall()
    finally:
        connection.close()
    assert stored == {run.info.run_id for run in runs}
    assert optuna == [(OPTUNA_DATABASE,)]


def test_start_again_keeps_the_running_servers(server):
    settings, first = server
    again = start(settings)
    assert again.mlflow_pid == first.mlflow_pid
    assert (again.postgres_port, again.tracking_uri) == (first.postgres_port, first.tracking_uri)
    assert status(settings).running


def test_stop_frees_both_ports_and_can_be_repeated(server):
    # last in this module: the fixture's teardown then stops already stopped servers, which must pass quietly
    settings, state = server
    stopped = stop(settings)
    assert stopped.initialised and not stopped.running
    assert stopped.postgres_port is None and stopped.mlflow_pid is None
    ensure_port_free("127.0.0.1", settings.port, "--port")
    ensure_port_free("127.0.0.1", state.postgres_port, "--pg-port")
    assert not settings.pid_file.exists()
    assert not stop(settings).running
