"""make predict on folders of good, corrupt and non-fundus files, with bundles of tiny networks; which bundle
a run folder or an MLflow run resolves to; and one real debug=tiny DR run's bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from compression.deploy import load_bundle
from experiments.predict import (
    PredictError,
    choose_disc_stage,
    choose_dr_stage,
    resolve_bundle,
    run_predict,
)
from tests.compression.deploy_helpers import (
    fundus_photo,
    write_disc_bundle,
    write_grading_bundle,
    write_photo,
)
from tests.experiments.helpers import compose_config, mlflow_store, runs_by_name

ROOT = Path(__file__).resolve().parents[2]
GRADING_COLUMNS = ["file", "status", "grade", "prob_0", "prob_1", "prob_2", "prob_3", "prob_4", "latency_ms",
                   "model_ms", "reason"]


@pytest.fixture(scope="module")
def grading_bundle(tmp_path_factory) -> Path:
    return write_grading_bundle(tmp_path_factory.mktemp("grading") / "student" / "deploy")[0].folder


@pytest.fixture(scope="module")
def disc_bundle(tmp_path_factory) -> Path:
    return write_disc_bundle(tmp_path_factory.mktemp("disc") / "prune-16" / "deploy")[0].folder


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "project"


def predict(project: Path, **options) -> int:
    """run_predict with the real config and these command-line options."""
    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "conf" / "predict"), version_base="1.3"):
        cfg = compose("predict", overrides=[f"{key}={value}" for key, value in options.items()])
    return run_predict(cfg)


def clinic_folder(folder: Path) -> Path:
    """Two photographs, a corrupt PNG, a text file and an almost black photograph; a hidden file and a
    sub-folder, which are not inputs."""
    write_photo(folder / "a_eye.png", fundus_photo(0))
    (folder / "b_corrupt.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    write_photo(folder / "c_dark.png", np.full((100, 100, 3), 4, np.uint8))
    write_photo(folder / "d_eye.jpg", fundus_photo(1))
    (folder / "e_notes.txt").write_text("patient list\n")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    write_photo(folder / "nested" / "f_eye.png", fundus_photo(2))
    return folder


# ------------------------------------------------------------------------------------------------ grading
def test_grading_a_folder_lists_every_file_with_its_grade_or_why_it_was_skipped(project, grading_bundle,
                                                                                 tmp_path):
    folder = clinic_folder(tmp_path / "today")
    assert predict(project, model=grading_bundle, input=folder) == 0
    table = pd.read_csv(tmp_path / "today_predictions.csv", keep_default_na=False)  # beside, not inside
    assert list(table.columns) == GRADING_COLUMNS
    assert table["file"].tolist() == ["a_eye.png", "b_corrupt.png", "c_dark.png", "d_eye.jpg", "e_notes.txt"]
    assert table["status"].tolist() == ["ok", "skipped", "skipped", "ok", "skipped"]
    reasons = dict(zip(table["file"], table["reason"], strict=True))
    assert "not a readable image" in reasons["b_corrupt.png"]
    assert "not a readable image" in reasons["e_notes.txt"]
    assert reasons["c_dark.png"].startswith("almost black") and reasons["a_eye.png"] == ""
    graded = table[table["status"] == "ok"]
    probabilities = graded[[f"prob_{g}" for g in range(5)]].to_numpy(float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert graded["grade"].astype(int).tolist() == probabilities.argmax(axis=1).tolist()
    assert (graded["latency_ms"].astype(float) >= graded["model_ms"].astype(float)).all()
    assert (table.loc[table["status"] == "skipped", "grade"] == "").all()


def test_a_folder_of_only_unusable_files_exits_1_and_still_lists_them(project, grading_bundle, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG truncated")
    (folder / "y.txt").write_text("hello")
    output = tmp_path / "bad.csv"
    assert predict(project, model=grading_bundle, input=folder, output=output) == 1
    table = pd.read_csv(output)
    assert table["file"].tolist() == ["x.png", "y.txt"] and set(table["status"]) == {"skipped"}


def test_an_existing_output_is_kept_unless_overwrite_is_true(project, grading_bundle, tmp_path):
    photo = write_photo(tmp_path / "in" / "eye.png", fundus_photo(3))
    output = tmp_path / "grades.csv"
    output.write_text("earlier results\n")
    with pytest.raises(PredictError, match="overwrite=true"):
        predict(project, model=grading_bundle, input=photo, output=output)
    assert output.read_text() == "earlier results\n"
    assert predict(project, model=grading_bundle, input=photo, output=output, overwrite="true") == 0
    table = pd.read_csv(output)
    assert table["file"].tolist() == ["eye.png"] and table["status"].tolist() == ["ok"]


def test_gradcam_overlays_are_written_next_to_the_csv_for_graded_photographs(project, grading_bundle,
                                                                              tmp_path):
    folder = clinic_folder(tmp_path / "today")
    output = tmp_path / "out" / "grades.csv"
    assert predict(project, model=grading_bundle, input=folder, output=output, gradcam="true") == 0
    written = sorted(p.name for p in output.parent.glob("*_gradcam.png"))
    assert written == ["a_eye_gradcam.png", "d_eye_gradcam.png"]
    overlay = cv2.imread(str(output.parent / "a_eye_gradcam.png"))
    assert overlay.shape == (64, 64, 3) and overlay.std() > 1  # the preprocessed image's size, not blank
    # a second run with gradcam would replace those overlays: refused as a whole
    output.unlink()
    with pytest.raises(PredictError, match="a_eye_gradcam.png"):
        predict(project, model=grading_bundle, input=folder, output=output, gradcam="true")
    assert not output.exists()


# ------------------------------------------------------------------------------------------------- disc
def test_the_disc_task_writes_masks_and_overlays_of_each_photographs_size(project, disc_bundle, tmp_path):
    folder = tmp_path / "discs_in"
    canvas = np.zeros((80, 120, 3), np.uint8)
    canvas[4:76, 30:102] = cv2.resize(fundus_photo(4), (72, 72))
    write_photo(folder / "wide.png", canvas)
    write_photo(folder / "square.jpg", fundus_photo(5, size=100))
    (folder / "broken.png").write_bytes(b"nope")
    output = tmp_path / "discs_out"
    assert predict(project, model=disc_bundle, input=folder, output=output) == 0
    table = pd.read_csv(output / "predictions.csv", keep_default_na=False)
    assert table["file"].tolist() == ["broken.png", "square.jpg", "wide.png"]
    assert table["status"].tolist() == ["skipped", "ok", "ok"]
    for name, shape in (("wide", (80, 120)), ("square", (100, 100))):
        mask = cv2.imread(str(output / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(output / f"{name}_overlay.png"))
        assert mask.shape == shape and overlay.shape == (*shape, 3) and set(np.unique(mask)) <= {0, 255}
        row = table[table["mask"] == f"{name}_mask.png"].iloc[0]
        assert float(row["disc_area_fraction"]) == pytest.approx((mask > 0).mean())
    assert not (output / "broken_mask.png").exists()


def test_disc_outputs_go_to_a_folder_beside_the_input_and_never_into_it(project, disc_bundle, tmp_path):
    folder = tmp_path / "clinic"
    write_photo(folder / "eye.png", fundus_photo(6))
    with pytest.raises(PredictError, match="is the input folder"):
        predict(project, model=disc_bundle, input=folder, output=folder)
    assert predict(project, model=disc_bundle, input=folder) == 0
    assert {p.name for p in (tmp_path / "clinic_discs").iterdir()} == {"eye_mask.png", "eye_overlay.png",
                                                                       "predictions.csv"}


# ------------------------------------------------------------------------------------------ wrong arguments
def test_wrong_model_input_and_output_are_clear_errors(project, grading_bundle, tmp_path):
    photo = write_photo(tmp_path / "eye.png", fundus_photo(7))
    with pytest.raises(PredictError, match="not an MLflow run id"):
        predict(project, model=tmp_path / "no_such_model", input=photo)
    with pytest.raises(PredictError, match="neither bundle.json"):
        predict(project, model=tmp_path, input=photo)
    with pytest.raises(PredictError, match="no such file or folder"):
        predict(project, model=grading_bundle, input=tmp_path / "missing")
    with pytest.raises(PredictError, match="CSV file"):
        predict(project, model=grading_bundle, input=photo, output=tmp_path / "grades.xlsx")
    with pytest.raises(PredictError, match="model= and input= are required"):
        predict(project, model=grading_bundle)


# ------------------------------------------------------------------------------------------ choosing stages
def summary(dice: dict[str, float]) -> pd.DataFrame:
    """A chain summary table with the columns liminal_points reads (edge cases not measured)."""
    rows = [{"stage": stage, "arm": stage.split("-")[0], "base": int(stage.split("-")[1]), "dice": value,
             "edge_case_detection": float("nan"), "latency_ms": 1.0, "size_bytes": 1.0}
            for stage, value in dice.items()]
    return pd.DataFrame(rows)


def test_a_dr_run_is_predicted_with_its_int8_trained_student_else_its_student():
    assert choose_dr_stage(["teacher", "student", "student_qat"])[0] == "student_qat"
    assert choose_dr_stage(["teacher", "student"])[0] == "student"
    with pytest.raises(PredictError, match="no finished stage"):
        choose_dr_stage([])


def test_a_chain_is_predicted_with_its_liminal_point_else_its_smallest_prune_stage():
    stages = ["base-64", "prune-32", "prune-16", "prune-8"]
    # within 5% of 0.90 means Dice >= 0.855: prune-16 (0.87) qualifies, prune-8 (0.80) does not
    table = summary({"base-64": 0.90, "prune-32": 0.89, "prune-16": 0.87, "prune-8": 0.80})
    assert choose_disc_stage(stages, table, 0.05)[0] == "prune-16"
    assert choose_disc_stage(stages, table, 0.20)[0] == "prune-8"  # 0.80 >= 0.72
    nothing_qualifies = summary({"base-64": 0.90, "prune-32": 0.50, "prune-16": 0.40, "prune-8": 0.30})
    stage, why = choose_disc_stage(stages, nothing_qualifies, 0.05)
    assert stage == "prune-8" and "smallest prune" in why
    assert choose_disc_stage(["base-64", "prune-32", "prune-16"], None)[0] == "prune-16"


def fake_run(run_dir: Path, stages: list[str]) -> Path:
    """A run folder: run_state.json and an (empty) bundle manifest per stage."""
    for stage in stages:
        (run_dir / stage / "deploy").mkdir(parents=True)
        (run_dir / stage / "deploy" / "bundle.json").write_text("{}")
    state = {"stages": {stage: {"status": "done"} for stage in stages}, "complete": True}
    (run_dir / "run_state.json").write_text(json.dumps(state))
    return run_dir


def test_model_may_be_a_bundle_a_stage_or_a_run_folder(tmp_path):
    cache, uri = tmp_path / "cache", "sqlite:///unused.db"
    dr = fake_run(tmp_path / "dr", ["teacher", "student", "student_qat"])
    assert resolve_bundle(str(dr), cache, uri)[0] == dr / "student_qat" / "deploy"
    assert resolve_bundle(str(dr / "teacher"), cache, uri)[0] == dr / "teacher" / "deploy"
    assert resolve_bundle(str(dr / "student" / "deploy"), cache, uri)[0] == dr / "student" / "deploy"
    chain = fake_run(tmp_path / "chain", ["base-64", "prune-32", "prune-16", "prune-8"])
    summary({"base-64": 0.90, "prune-32": 0.89, "prune-16": 0.87, "prune-8": 0.80}).to_csv(
        chain / "summary.csv", index=False)
    (chain / "config.yaml").write_text("chain:\n  liminal_tolerance: 0.2\n")
    folder, why = resolve_bundle(str(chain), cache, uri)
    assert folder == chain / "prune-8" / "deploy" and "liminal point" in why
    (chain / "prune-8" / "deploy" / "bundle.json").unlink()
    with pytest.raises(PredictError, match="stage prune-8 .* has no deployment bundle"):
        resolve_bundle(str(chain), cache, uri)


def test_model_may_be_an_mlflow_run_id(grading_bundle, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dr-distill", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={MLFLOW_RUN_NAME: "dr-distill"}).info.run_id
    children = {}
    for stage in ("teacher", "student"):
        run = client.create_run(experiment, tags={MLFLOW_RUN_NAME: stage, MLFLOW_PARENT_RUN_ID: parent})
        client.set_terminated(run.info.run_id)
        children[stage] = run.info.run_id
    # the student's tag names a folder of another machine: its deploy/ artifacts are downloaded instead
    client.log_artifacts(children["student"], str(grading_bundle), artifact_path="deploy")
    client.set_tag(children["student"], "deploy_dir", "/elsewhere/student/deploy")
    client.set_tag(children["teacher"], "deploy_dir", str(grading_bundle))
    cache = tmp_path / "cache"
    folder, why = resolve_bundle(parent, cache, uri)
    assert folder.is_relative_to(cache) and "stage student" in why
    assert load_bundle(folder).manifest == load_bundle(grading_bundle).manifest
    assert resolve_bundle(children["teacher"], cache, uri)[0] == grading_bundle  # the tagged folder exists
    with pytest.raises(PredictError, match="no such run"):
        resolve_bundle("0" * 32, cache, uri)


# ---------------------------------------------------------------------------------------- the real thing
def test_the_command_line_exits_with_the_status_and_writes_nothing_but_its_output(grading_bundle, tmp_path):
    photo = write_photo(tmp_path / "in" / "eye.png", fundus_photo(8))
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PROJECT_ROOT": str(tmp_path / "project")}
    command = [sys.executable, "-m", "experiments.predict", f"model={grading_bundle}", f"input={photo}",
               f"output={tmp_path / 'grades.csv'}", "threads=1"]
    done = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # no outputs/ run folder, no .hydra/, no log file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grades.csv", "in"]
    assert "Predicted 1 of 1 file(s)" in done.stdout and "predicting (grading, int8)" in done.stderr  # tqdm


def test_a_tiny_dr_run_leaves_a_bundle_that_predicts(project, tmp_path, monkeypatch):
    from experiments.train_dr import run_dr_distill

    monkeypatch.setenv("PROJECT_ROOT", str(project))
    run_dir = project / "outputs" / "dr-distill" / "runs" / "a"
    run_dr_distill(compose_config("train_dr", ["debug=tiny", "experiment=dr_student_only"], run_dir))
    bundle = load_bundle(run_dir / "student" / "deploy")
    assert bundle.task == "grading" and bundle.stage == "student" and bundle.input_names == ("image", "topo")
    assert bundle.int8_path is not None and bundle.manifest["int8"]["calibration_images"] == 8  # debug preset
    client = mlflow_store(project)
    student = runs_by_name(client, "dr-distill")["student"][0]
    assert student.data.tags["deploy_dir"] == str(bundle.folder.resolve())
    assert {a.path for a in client.list_artifacts(student.info.run_id, "deploy")} >= {
        "deploy/bundle.json", "deploy/model.onnx", "deploy/model_int8.onnx", "deploy/network.pt"}
    photos = tmp_path / "photos"
    for seed in range(2):
        write_photo(photos / f"eye{seed}.png", fundus_photo(seed, size=128))
    parent = student.data.tags[MLFLOW_PARENT_RUN_ID]
    assert predict(project, model=parent, input=photos, output=tmp_path / "grades.csv", gradcam="true") == 0
    table = pd.read_csv(tmp_path / "grades.csv")
    assert table["status"].tolist() == ["ok", "ok"] and table["grade"].between(0, 4).all()
    assert cv2.imread(str(tmp_path / "eye0_gradcam.png")).shape == (64, 64, 3)  # debug=tiny's image size
