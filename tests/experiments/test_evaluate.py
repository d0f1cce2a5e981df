"""make evaluate: a grading bundle scored on a whole labelled set, into an external-<dataset> MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from sklearn.metrics import accuracy_score, cohen_kappa_score

from experiments.evaluate import exit_status, grading_metrics, run_evaluate
from experiments.report_data import dr_table, select_runs
from experiments.report_render import pareto_points
from experiments.train_dr import run_dr_distill
from tests.compression.deploy_helpers import write_disc_bundle, write_grading_bundle
from tests.experiments.helpers import compose_config, mlflow_store, runs_by_name

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[2] / "experiments" / "conf" / "evaluate"


@pytest.fixture(scope="module")
def grading_bundle(tmp_path_factory) -> Path:
    return write_grading_bundle(tmp_path_factory.mktemp("grading") / "student" / "deploy", calibrate=False)[0].folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "project"


def evaluate_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=["bootstrap.n_resamples=200", "threads=1", *overrides])


def test_a_bundle_is_scored_on_every_image_and_what_is_not_scored_is_counted(project, grading_bundle, aptos_root):
    images = aptos_root / "train_images"
    cv2.imwrite(str(images / "img005.png"), np.zeros((128, 128, 3), np.uint8))  # unusable: almost black
    (images / "img006.png").unlink()  # a label row without its image
    cv2.imwrite(str(images / "extra.png"), cv2.imread(str(images / "img000.png")))  # an image without a row
    metrics = run_evaluate(evaluate_config(f"model={grading_bundle}", "data=aptos", f"data.root={aptos_root}",
                                           "dataset_name=clinic-a"))
    assert metrics["external/scored"] == 38 and metrics["external/skipped"] == 1
    assert metrics["external/missing"] == 1 and metrics["external/unlabelled"] == 1
    assert metrics["external/failed"] == 0 and metrics["external/images_per_s"] > 0
    for name in ("test/qwk", "test/acc", "test/f1_macro", "test/f1_weighted", "test/ece", "test/qwk_ci_low",
                 "test/qwk_ci_high", "test/acc_ci_low", "test/acc_ci_high", *(f"test/recall_{g}" for g in range(5))):
        assert name in metrics, name
    assert metrics["test/acc_ci_low"] <= metrics["test/acc"] <= metrics["test/acc_ci_high"]
    (written,) = (path for path in (project / "outputs" / "evaluate" / "clinic-a").glob("student-fp32-*.csv")
                  if not path.stem.endswith("_not_scored"))
    assert len(written.stem.removeprefix("student-fp32-")) == 8  # the model's hash: runs do not overwrite
    predictions = pd.read_csv(written)
    assert list(predictions.columns) == ["image", "label", "prediction", *(f"prob_{k}" for k in range(5))]
    assert len(predictions) == 38 and "img005" not in set(predictions["image"])
    assert accuracy_score(predictions["label"], predictions["prediction"]) == pytest.approx(metrics["test/acc"])
    # the bundle's run is not in this store: the result goes to the evaluate experiment
    client = mlflow_store(project)
    (run,) = runs_by_name(client, "evaluate")["external-clinic-a"]
    assert run.info.status == "FINISHED" and run.data.tags["external_dataset"] == "clinic-a"
    assert run.data.metrics["test/qwk"] == pytest.approx(metrics["test/qwk"])
    assert len(run.data.tags["data_fingerprint"]) == 16
    artifacts = {a.path for folder in ("plots", "predictions") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/confusion_matrix.png", "plots/reliability.png", "plots/pr_curves.png",
            f"predictions/{written.name}", f"predictions/{written.stem}_not_scored.csv"} <= artifacts


def test_a_trained_run_gets_an_external_child_run_beside_its_stages(project, tmp_path, eyepacs_root):
    run_dir = project / "outputs" / "dr-distill" / "runs" / "a"
    run_dr_distill(compose_config("train_dr", ["debug=tiny", "experiment=dr_student_only"], run_dir))
    metrics = run_evaluate(evaluate_config(f"model={run_dir}", "data=eyepacs", f"data.root={eyepacs_root}"))
    assert metrics["external/scored"] == 80
    client = mlflow_store(project)
    runs = runs_by_name(client, "dr-distill")
    (external,) = runs["external-eyepacs"]
    (parent,) = [run for name, found in runs.items() if name.startswith("dr-distill") for run in found]
    assert external.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert external.data.tags["stage"] == "student" and external.data.tags["precision"] == "int8"
    # make report shows it beside the internal test split, with the stage's size and latency, off the Pareto plot
    selected, _ = select_runs(client, f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", [parent.info.run_id])
    table = dr_table(selected, "http://127.0.0.1:5000").set_index("stage")
    assert table.loc["student on eyepacs", "qwk"] == pytest.approx(metrics["test/qwk"])
    assert table.loc["student on eyepacs", "precision"] == "int8"
    assert table.loc["student on eyepacs", "latency_ms"] == table.loc["student", "latency_ms"]
    points = pareto_points(SimpleNamespace(dr_table=table.reset_index(), glaucoma_table=pd.DataFrame(),
                                           selected=selected))
    assert list(points["label"]) == ["student"]


def refused(caplog, *overrides: str) -> str:
    """make evaluate's logged error for these overrides (it must exit 2)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert exit_status(evaluate_config(*overrides)) == 2
    return caplog.text


def test_wrong_models_and_unusable_label_files_are_clear_errors(project, grading_bundle, aptos_root, tmp_path,
                                                                caplog):
    disc = write_disc_bundle(tmp_path / "disc" / "deploy")[0].folder
    data = ("data=aptos", f"data.root={aptos_root}")
    assert "is a 'disc' model; make evaluate scores grading models" in refused(caplog, f"model={disc}", *data)
    table = pd.read_csv(aptos_root / "train.csv")
    table.loc[2, "diagnosis"] = 9
    table.to_csv(aptos_root / "train.csv", index=False)
    assert "label 9 is outside the grades 0-4" in refused(caplog, f"model={grading_bundle}", *data)
    for path in (aptos_root / "train_images").iterdir():
        path.unlink()
    table.loc[2, "diagnosis"] = 1
    table.to_csv(aptos_root / "train.csv", index=False)
    assert "none of the 40 images listed in" in refused(caplog, f"model={grading_bundle}", *data)
    assert not (project / "mlruns").exists()  # nothing was scored, so nothing was logged


def test_grading_metrics_agree_with_sklearn_and_a_perfect_grader_has_a_degenerate_interval():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 5, 200))
    probabilities = np.full((200, 5), 0.05)
    probabilities[np.arange(200), predicted] = 0.8
    table = pd.DataFrame({"image": [f"i{k}" for k in range(200)], "label": labels, "prediction": predicted,
                          **{f"prob_{k}": probabilities[:, k] for k in range(5)}})
    metrics = grading_metrics(table, 5, n_resamples=300)
    assert metrics["test/qwk"] == pytest.approx(cohen_kappa_score(labels, predicted, weights="quadratic"))
    assert metrics["test/acc"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["test/qwk_ci_low"] < metrics["test/qwk"] < metrics["test/qwk_ci_high"]
    perfect = table.assign(prediction=labels)
    exact = grading_metrics(perfect, 5, n_resamples=100)
    assert exact["test/qwk"] == exact["test/acc"] == exact["test/acc_ci_low"] == 1.0
