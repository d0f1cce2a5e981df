"""The MLflow UI in a real browser: `make mlflow-ui` serving a store made by a smoke run, driven in headless
Chromium (Debian's /usr/bin/chromium through Playwright; `make test-e2e` installs the browser when missing).

Screenshots land in ``test-artifacts/`` (``E2E_ARTIFACT_DIR`` to change it), kept after the run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACT_DIR = Path(os.environ.get("E2E_ARTIFACT_DIR", REPO / "test-artifacts"))
# The machine has no internet: without these Chromium keeps retrying Google's services at every start.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# `mlflow ui` starts four workers; on a 2-core machine that shares the CPU it takes up to a minute
SERVER_START_TIMEOUT_S = 180
UI_TIMEOUT_MS = 90_000

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_project(tmp_path_factory) -> Path:
    """A project folder whose MLflow store holds one `make dr-distill ARGS="debug=smoke"` run."""
    project = tmp_path_factory.mktemp("e2e_project")
    env = os.environ | {"PROJECT_ROOT": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    completed = subprocess.run([sys.executable, "-m", "experiments.train_dr", "debug=smoke"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return project


@pytest.fixture(scope="module")
def ui_url(smoke_project: Path) -> Iterator[str]:
    """`make mlflow-ui` on a free loopback port, serving the smoke project's store."""
    port = _free_loopback_port()
    env = os.environ.copy()
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen(
        ["make", "-s", "mlflow-ui", f"MLFLOW_PORT={port}", f"MLFLOW_STORE={smoke_project / 'mlruns'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"make mlflow-ui exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"make mlflow-ui did not answer on {url} within {SERVER_START_TIMEOUT_S} s")
            time.sleep(1)
        yield url
    finally:
        # make -> mlflow -> uvicorn workers: stop the whole process group
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make test-e2e` (it installs Debian's chromium) "
                    "or set CHROMIUM=<path>")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    yield context.new_page()
    context.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACT_DIR / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _store(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dr-distill")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    return client, experiment, runs


def test_experiment_page_lists_the_parent_run_and_its_children(ui_url: str, smoke_project: Path, page):
    _, experiment, runs = _store(smoke_project)
    parent_name = "dr-distill[debug=smoke]"
    assert {parent_name, "teacher", "student"} <= set(runs)

    page.goto(f"{ui_url}/#/experiments/{experiment.experiment_id}/runs")
    parent_row = page.locator(".ag-row").filter(has_text=parent_name).first
    parent_row.wait_for()
    # children are folded under their parent until its expander is clicked
    assert page.get_by_role("link", name="student", exact=True).count() == 0
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
    for child in ("teacher", "student"):
        page.get_by_role("link", name=child, exact=True).first.wait_for()
    _screenshot(page, "mlflow_ui_experiment_runs")


@pytest.mark.parametrize("run_name, metric", [("dr-distill[debug=smoke]", "student/test/qwk"),
                                               ("student", "test/qwk"), ("teacher", "test/qwk")])
def test_run_page_shows_the_logged_metric_values(ui_url: str, smoke_project: Path, page, run_name: str,
                                                 metric: str):
    _, experiment, runs = _store(smoke_project)
    run = runs[run_name]
    value = run.data.metrics[metric]

    page.goto(f"{ui_url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
    page.get_by_text(metric, exact=True).first.wait_for()
    row = page.get_by_role("row").filter(has=page.get_by_text(metric, exact=True)).first
    shown = row.inner_text().split()
    assert shown[0] == metric
    assert float(shown[-1]) == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_a_png_artifact_renders_on_the_run_page(ui_url: str, smoke_project: Path, page):
    client, experiment, runs = _store(smoke_project)
    student = runs["student"]
    artifact = "plots/confusion_matrix.png"
    assert artifact in [a.path for a in client.list_artifacts(student.info.run_id, "plots")]

    page.goto(f"{ui_url}/#/experiments/{experiment.experiment_id}/runs/{student.info.run_id}/artifacts/{artifact}")
    # the artifact viewer fetches the file and shows it from a blob: URL once decoded
    image = page.locator("img[src^='blob:']").first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    from PIL import Image

    local = Path(client.download_artifacts(student.info.run_id, artifact, str(smoke_project / "downloaded")))
    assert (width, height) == Image.open(local).size
    screenshot = _screenshot(page, "mlflow_ui_run_artifact")
    assert screenshot.stat().st_size > 10_000
