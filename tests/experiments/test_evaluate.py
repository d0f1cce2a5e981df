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

from compression.deploy import Predictor, load_bundle
from experiments.evaluate import exit_status, grading_metrics, run_evaluate
from experiments.report_data import dr_table, select_runs
from experiments.report_render import pareto_points
from experiments.train_dr import run_dr_distill
from tests.compression.deploy_helpers import fundus_photo, write_disc_bundle, write_grading_bundle
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
    # the runtime it ran on (the bundle's faster one for fp32) and the model's hash: runs do not overwrite
    runtime, model_hash = written.stem.removeprefix("student-fp32-").split("-")
    # (an int8 run of a bundle without int8 runs fp32, on fp32's faster runtime)
    assert runtime == load_bundle(grading_bundle).default_runtime("fp32") and len(model_hash) == 8
    predictions = pd.read_csv(written)
    assert list(predictions.columns) == ["image", "label", "prediction", *(f"prob_{k}" for k in range(5))]
    assert len(predictions) == 38 and "img005" not in set(predictions["image"])
    assert accuracy_score(predictions["label"], predictions["prediction"]) == pytest.approx(metrics["test/acc"])
    # the bundle's run is not in this store: the result goes to the evaluate experiment
    client = mlflow_store(project)
    (run,) = runs_by_name(client, "evaluate")["external-clinic-a"]
    assert run.info.status == "FINISHED" and run.data.tags["external_dataset"] == "clinic-a"
    assert run.data.tags["runtime"] == run.data.params["runtime"] == runtime
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
    assert "is an optic-disc model; score it on a disc folder" in refused(caplog, f"model={disc}", *data)
    disc_data = ("data=disc_folder", f"data.root={tmp_path}")
    assert "is a grading model; score it on a DR grading set" in refused(caplog, f"model={grading_bundle}",
                                                                         *disc_data)
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


def write_disc_folder(root: Path, predictor: Predictor) -> dict[str, np.ndarray]:
    """Photographs of three sizes whose reference masks are the bundle's own mask plus a square it misses, so
    each image's Dice is known in advance; and one of each kind of pair that cannot be scored."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    references = {}
    for index, size in enumerate([96, 96, 120, 120, 150, 150]):
        name = f"eye{index}"
        image = fundus_photo(index, size=size)
        cv2.imwrite(str(root / "images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        predicted = predictor.predict_file(root / "images" / f"{name}.png").mask > 0
        reference = predicted.copy()
        reference[size // 2 : size // 2 + 6 + index, size // 3 : size // 3 + 8] = True
        cv2.imwrite(str(root / "masks" / f"{name}.png"), reference.astype(np.uint8) * 255)
        references[name] = (predicted, reference)
    cv2.imwrite(str(root / "images" / "no_mask.png"), cv2.cvtColor(fundus_photo(9), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "images" / "wrong_size.png"), cv2.cvtColor(fundus_photo(10), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "masks" / "wrong_size.png"), np.full((40, 40), 255, np.uint8))
    cv2.imwrite(str(root / "images" / "black.png"), np.zeros((96, 96, 3), np.uint8))
    cv2.imwrite(str(root / "masks" / "black.png"), np.full((96, 96), 255, np.uint8))
    return references


def test_a_disc_bundle_is_scored_at_each_photographs_size_and_bad_pairs_are_listed(project, tmp_path):
    bundle = write_disc_bundle(tmp_path / "prune-16" / "deploy")[0]
    references = write_disc_folder(tmp_path / "clinic", Predictor(bundle, "int8", 1))
    metrics = run_evaluate(evaluate_config(f"model={bundle.folder}", "data=disc_folder",
                                           f"data.root={tmp_path / 'clinic'}", "worst_overlays=3"))
    assert metrics["external/scored"] == 6 and metrics["external/unpaired"] == 1
    assert metrics["external/skipped"] == 2 and metrics["external/failed"] == 0
    (written,) = (path for path in (project / "outputs" / "evaluate" / "clinic").glob("prune-16-int8-*.csv")
                  if not path.stem.endswith("_not_scored"))
    table = pd.read_csv(written).set_index("sample_id")
    expected = {name: 2 * (p & r).sum() / (p.sum() + r.sum()) for name, (p, r) in references.items()}
    for name, dice in expected.items():
        assert table.loc[name, "dice"] == pytest.approx(dice)
        assert (table.loc[name, "height"], table.loc[name, "width"]) == references[name][1].shape
        assert table.loc[name, "precision"] == pytest.approx(1.0 if references[name][0].any() else 0.0)
    assert metrics["test/dice"] == pytest.approx(np.mean(list(expected.values())))
    assert metrics["test/images"] == 6 and metrics["test/dice_ci_low"] <= metrics["test/dice"]
    not_scored = pd.read_csv(written.with_name(f"{written.stem}_not_scored.csv")).set_index("status")
    assert "no mask 'no_mask.*'" in not_scored.loc["unpaired", "reason"]
    reasons = " ".join(not_scored.loc["skipped", "reason"])
    assert "mask is 40x40 px but its image wrong_size.png is 96x96" in reasons and "almost black" in reasons
    client = mlflow_store(project)
    (run,) = runs_by_name(client, "evaluate")["external-clinic"]
    assert run.data.tags["task"] == "disc" and run.data.metrics["test/dice"] == pytest.approx(metrics["test/dice"])
    overlays = sorted(a.path for a in client.list_artifacts(run.info.run_id, "overlays"))
    # the three lowest Dice, lowest first (ties broken either way), each file naming its image and Dice
    shown = [(path.split("_dice")[1][:5], path.rsplit("_", 1)[1].removesuffix(".png")) for path in overlays]
    assert [dice for dice, _ in shown] == [f"{d:.3f}" for d in sorted(table["dice"])[:3]]
    assert all(f"{table.loc[name, 'dice']:.3f}" == dice for dice, name in shown)
