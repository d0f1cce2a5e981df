"""make predict on folders of good, corrupt and non-fundus files, with bundles of tiny networks; which bundle
a run folder or an MLflow run resolves to; and one real debug=tiny DR run's bundle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
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
from omegaconf import DictConfig

from compression.deploy import BundleError, Predictor, load_bundle
from experiments.predict import (
    PredictError,
    disc_stage_preference,
    dr_stage_preference,
    exit_status,
    resolve_bundle,
    run_overrides,
    run_predict,
)
from tests.compression.deploy_helpers import (
    fundus_photo,
    twelve_bit,
    write_disc_bundle,
    write_grading_bundle,
    write_photo,
    write_stored,
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


def predict_config(**options) -> DictConfig:
    """The real config with these command-line options."""
    with initialize_config_dir(config_dir=str(ROOT / "experiments" / "conf" / "predict"), version_base="1.3"):
        return compose("predict", overrides=[f"{key}={value}" for key, value in options.items()])


def predict(project: Path, **options) -> int:
    """run_predict with the real config and these command-line options."""
    return run_predict(predict_config(**options))


CLINIC_FILES = ["a_eye.png", "b_corrupt.png", "c_dark.png", "d_eye.jpg", "e_notes.txt", "g_grey.png",
                "h_rgba.png", "i_12bit.png"]
CLINIC_STATUS = ["ok", "skipped", "skipped", "ok", "skipped", "skipped", "skipped", "ok"]


def clinic_folder(folder: Path) -> Path:
    """Two photographs, a corrupt PNG, an almost black photograph, a text file, a greyscale (one channel) and a
    transparent (RGBA) photograph, and a 12-bit photograph in a 16-bit PNG (a_eye's pixels, 0-4095); a hidden
    file and a sub-folder, which are not inputs."""
    write_photo(folder / "a_eye.png", fundus_photo(0))
    (folder / "b_corrupt.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    write_photo(folder / "c_dark.png", np.full((100, 100, 3), 4, np.uint8))
    write_photo(folder / "d_eye.jpg", fundus_photo(1))
    (folder / "e_notes.txt").write_text("patient list\n")
    write_stored(folder / "g_grey.png", cv2.cvtColor(fundus_photo(2), cv2.COLOR_RGB2GRAY))
    rgba = cv2.cvtColor(fundus_photo(3), cv2.COLOR_RGB2BGRA)
    rgba[:10, :10, 3] = 0  # a transparent corner
    write_stored(folder / "h_rgba.png", rgba)
    write_stored(folder / "i_12bit.png", twelve_bit(fundus_photo(0)))
    (folder / ".DS_Store").write_bytes(b"\0\0")
    write_photo(folder / "nested" / "f_eye.png", fundus_photo(2))
    return folder


# ------------------------------------------------------------------------------------------------ grading
def test_grading_a_folder_lists_every_file_with_its_grade_or_why_it_was_skipped(project, grading_bundle,
                                                                                 tmp_path, caplog):
    folder = clinic_folder(tmp_path / "today")
    umask = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO):
            assert predict(project, model=grading_bundle, input=folder) == 0
    finally:
        os.umask(umask)
    csv = tmp_path / "today_predictions.csv"  # beside the folder, not inside
    assert stat.S_IMODE(csv.stat().st_mode) == 0o644  # readable by the clinic's other accounts, as any file
    table = pd.read_csv(csv, keep_default_na=False)
    assert list(table.columns) == GRADING_COLUMNS
    assert table["file"].tolist() == CLINIC_FILES and table["status"].tolist() == CLINIC_STATUS
    reasons = dict(zip(table["file"], table["reason"], strict=True))
    assert "not a readable image" in reasons["b_corrupt.png"]
    assert "not a readable image" in reasons["e_notes.txt"]
    assert reasons["c_dark.png"].startswith("almost black") and reasons["a_eye.png"] == ""
    assert reasons["g_grey.png"].startswith("1 channel(s) (greyscale)")
    assert reasons["h_rgba.png"] == "has an alpha channel (transparent parts): save it as an opaque JPEG/PNG"
    assert "i_12bit.png: 16-bit image, rescaled to 8 bits by its own maximum (4095 -> 255)" in caplog.text
    graded = table[table["status"] == "ok"].set_index("file")
    probabilities = graded[[f"prob_{g}" for g in range(5)]].to_numpy(float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert graded["grade"].astype(int).tolist() == probabilities.argmax(axis=1).tolist()
    assert (graded["latency_ms"].astype(float) >= graded["model_ms"].astype(float)).all()
    assert (table.loc[table["status"] == "skipped", "grade"] == "").all()
    # 4095 rescaled to 255 gives back a_eye's exact pixels (dividing by 65535 would give an almost black frame)
    assert graded.loc["i_12bit.png", "prob_0":"prob_4"].tolist() == graded.loc["a_eye.png", "prob_0":"prob_4"].tolist()


def test_an_unexpected_error_fails_that_file_only_and_an_interruption_keeps_the_rows_done(
        project, grading_bundle, tmp_path, monkeypatch):
    folder = clinic_folder(tmp_path / "today")
    predict_file = Predictor.predict_file

    def flaky(self, path):
        if Path(path).name == "d_eye.jpg":
            raise RuntimeError("ONNX Runtime ran out of memory")
        if Path(path).name == "h_rgba.png":
            raise KeyboardInterrupt
        return predict_file(self, path)

    monkeypatch.setattr(Predictor, "predict_file", flaky)
    output = tmp_path / "grades.csv"
    with pytest.raises(KeyboardInterrupt):
        predict(project, model=grading_bundle, input=folder, output=output)
    table = pd.read_csv(output, keep_default_na=False)
    assert table["file"].tolist() == CLINIC_FILES[:6]  # up to g_grey.png, the file before the interruption
    assert table["status"].tolist() == ["ok", "skipped", "skipped", "failed", "skipped", "skipped"]
    assert table.loc[3, "reason"] == "RuntimeError: ONNX Runtime ran out of memory"
    assert table.loc[3, "grade"] == "" and table.loc[0, "grade"] != ""


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
    assert exit_status(predict_config(model=grading_bundle, input=photo, output=output)) == 2  # the command's
    assert output.read_text() == "earlier results\n"
    assert predict(project, model=grading_bundle, input=photo, output=output, overwrite="true") == 0
    table = pd.read_csv(output)
    assert table["file"].tolist() == ["eye.png"] and table["status"].tolist() == ["ok"]


def test_gradcam_overlays_go_to_a_folder_named_after_the_csv_for_graded_photographs(project, grading_bundle,
                                                                                      tmp_path):
    folder = clinic_folder(tmp_path / "today")
    output = tmp_path / "out" / "grades.csv"
    assert predict(project, model=grading_bundle, input=folder, output=output, gradcam="true") == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["grades.csv", "grades_gradcam"]
    written = sorted(p.name for p in (output.parent / "grades_gradcam").iterdir())
    assert written == ["a_eye_gradcam.png", "d_eye_gradcam.png", "i_12bit_gradcam.png"]
    overlay = cv2.imread(str(output.parent / "grades_gradcam" / "a_eye_gradcam.png"))
    assert overlay.shape == (64, 64, 3) and overlay.std() > 1  # the preprocessed image's size, not blank
    # a second run with gradcam would replace those overlays: refused as a whole
    output.unlink()
    with pytest.raises(PredictError, match="a_eye_gradcam.png"):
        predict(project, model=grading_bundle, input=folder, output=output, gradcam="true")
    assert not output.exists()


def test_grading_outputs_never_go_inside_the_input_folder(project, grading_bundle, tmp_path):
    folder = tmp_path / "a_gradcam"
    write_photo(folder / "eye.png", fundus_photo(9))
    with pytest.raises(PredictError, match="inside the input folder"):
        predict(project, model=grading_bundle, input=folder, output=folder / "grades.csv")
    # the CSV beside the folder, but its GradCAM folder (<csv stem>_gradcam) would be the input folder itself
    with pytest.raises(PredictError, match="a_gradcam would be inside the input folder"):
        predict(project, model=grading_bundle, input=folder, output=tmp_path / "a.csv", gradcam="true")
    assert not (tmp_path / "a.csv").exists()
    assert [p.name for p in folder.iterdir()] == ["eye.png"]


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
    with pytest.raises(PredictError, match="inside the input folder"):
        predict(project, model=disc_bundle, input=folder, output=folder)
    with pytest.raises(PredictError, match="inside the input folder"):
        predict(project, model=disc_bundle, input=folder, output=folder / "discs")
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
    assert exit_status(predict_config(model=tmp_path / "no_such_model", input=photo)) == 2


# ------------------------------------------------------------------------------------------ choosing stages
def summary(dice: dict[str, float]) -> pd.DataFrame:
    """A chain summary table with the columns liminal_points reads (edge cases not measured); a finisher
    (qat-prune-16) has its source's base."""
    rows = [{"stage": stage, "arm": stage.split("-")[0], "base": int(stage.split("-")[-1]), "dice": value,
             "edge_case_detection": float("nan"), "latency_ms": 1.0, "size_bytes": 1.0}
            for stage, value in dice.items()]
    return pd.DataFrame(rows)


def test_a_dr_run_prefers_its_int8_trained_student_then_its_student_then_its_teacher():
    assert [stage for stage, _ in dr_stage_preference(["teacher", "student", "student_qat"])] == [
        "student_qat", "student", "teacher"]
    assert [stage for stage, _ in dr_stage_preference(["teacher"])] == ["teacher"]
    assert dr_stage_preference([]) == []
    # an architecture baseline (experiment=dr_baselines) is chosen only where nothing else was trained
    assert [stage for stage, _ in dr_stage_preference(["baseline"])] == ["baseline"]
    assert [stage for stage, _ in dr_stage_preference(["baseline", "teacher", "student"])] == [
        "student", "teacher", "baseline"]


def test_a_chain_prefers_its_liminal_point_then_each_arms_then_its_prune_stages_smallest_first():
    stages = ["base-64", "prune-32", "prune-16", "prune-8", "kd-32", "kd-16"]
    # within 5% of 0.90 means Dice >= 0.855: prune-16 (0.87) and kd-32 (0.86) qualify, prune-8 (0.80) not
    dice = {"base-64": 0.90, "prune-32": 0.89, "prune-16": 0.87, "prune-8": 0.80, "kd-32": 0.86, "kd-16": 0.5}
    order = disc_stage_preference(stages, summary(dice), 0.05)
    assert [stage for stage, _ in order] == ["prune-16", "kd-32", "prune-8", "prune-32", "base-64"]
    assert "liminal point of the chain" in order[0][1] and "liminal point of the kd arm" in order[1][1]
    assert disc_stage_preference(stages, summary(dice), 0.20)[0][0] == "prune-8"  # 0.80 >= 0.72
    nothing_qualifies = summary({"base-64": 0.90, "prune-32": 0.50, "prune-16": 0.40, "prune-8": 0.30})
    stage, why = disc_stage_preference(stages[:4], nothing_qualifies, 0.05)[0]
    assert stage == "prune-8" and why == "the smallest prune stage (no liminal point named)"
    assert disc_stage_preference(["base-64", "prune-32", "prune-16"], None)[0][0] == "prune-16"
    assert disc_stage_preference(["base-64"], None) == [("base-64", "iteration 1 (the chain has no prune stage)")]


def test_run_overrides_are_the_run_keys_overrides_as_typed():
    assert run_overrides("data=aptos,stages=[teacher,student],trainer.max_epochs=3") == (
        "data=aptos stages=[teacher,student] trainer.max_epochs=3")
    assert run_overrides("(defaults)") == ""


def fake_run(run_dir: Path, stages: list[str], run_key: str = "(defaults)") -> Path:
    """A run folder: run_state.json and an (empty) bundle manifest per stage."""
    for stage in stages:
        (run_dir / stage / "deploy").mkdir(parents=True)
        (run_dir / stage / "deploy" / "bundle.json").write_text("{}")
    state = {"run_key": run_key, "stages": {stage: {"status": "done"} for stage in stages}, "complete": True}
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


def test_a_run_folder_falls_back_to_the_next_stage_with_a_bundle(tmp_path, caplog):
    cache, uri = tmp_path / "cache", "sqlite:///unused.db"
    # an old run: its student_qat was tested before bundles existed, and retest=true cannot bundle it
    dr = fake_run(tmp_path / "dr", ["teacher", "student", "student_qat"])
    (dr / "student_qat" / "deploy" / "bundle.json").unlink()
    with caplog.at_level(logging.WARNING, logger="experiments.predict"):
        folder, why = resolve_bundle(str(dr), cache, uri)
    assert folder == dr / "student" / "deploy" and "student_qat have no bundle" in why
    assert "stage(s) student_qat have no deployment bundle" in caplog.text and "using student" in caplog.text
    # the chain's liminal point is a finisher without a bundle: the prune arm's liminal point, its source
    chain = fake_run(tmp_path / "chain", ["base-64", "prune-32", "prune-16", "prune-8", "qat-prune-16"])
    summary({"base-64": 0.90, "prune-32": 0.89, "prune-16": 0.87, "prune-8": 0.80, "qat-prune-16": 0.88}).to_csv(
        chain / "summary.csv", index=False)
    (chain / "qat-prune-16" / "deploy" / "bundle.json").unlink()
    folder, why = resolve_bundle(str(chain), cache, uri)
    assert folder == chain / "prune-16" / "deploy" and "liminal point of the prune arm" in why


def test_a_run_folder_without_any_bundle_says_how_to_add_them(tmp_path):
    dr = fake_run(tmp_path / "dr", ["teacher", "student", "student_qat"],
                  run_key="data=aptos,stages=[teacher,student,student_qat]")
    for stage in ("teacher", "student", "student_qat"):
        (dr / stage / "deploy" / "bundle.json").unlink()
    with pytest.raises(PredictError) as raised:
        resolve_bundle(str(dr), tmp_path / "cache", "sqlite:///unused.db")
    message = str(raised.value)
    assert "(student_qat, student, teacher)" in message
    assert "Finishers (student_qat, qat-*, share-*) cannot be bundled again" in message
    assert "the other stages (student, teacher) can" in message
    assert message.endswith(f'make dr-distill ARGS="data=aptos stages=[teacher,student,student_qat] '
                            f'retest=true resume={dr}"')
    chain = fake_run(tmp_path / "chain", ["base-64"])
    (chain / "base-64" / "deploy" / "bundle.json").unlink()
    with pytest.raises(PredictError, match=f'make glaucoma-iterations ARGS="retest=true resume={chain}"'):
        resolve_bundle(str(chain), tmp_path / "cache", "sqlite:///unused.db")


def test_model_may_be_an_mlflow_run_id(grading_bundle, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dr-distill", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={MLFLOW_RUN_NAME: "dr-distill"}).info.run_id
    children = {}
    # student_qat finished before bundles existed: no deploy_dir tag, no deploy/ artifacts
    for stage in ("teacher", "student", "student_qat"):
        run = client.create_run(experiment, tags={MLFLOW_RUN_NAME: stage, MLFLOW_PARENT_RUN_ID: parent})
        client.set_terminated(run.info.run_id)
        children[stage] = run.info.run_id
    # the student's tag names a folder of another machine: its deploy/ artifacts are downloaded instead
    client.log_artifacts(children["student"], str(grading_bundle), artifact_path="deploy")
    client.set_tag(children["student"], "deploy_dir", "/elsewhere/student/deploy")
    client.set_tag(children["teacher"], "deploy_dir", str(grading_bundle))
    cache = tmp_path / "cache"
    folder, why = resolve_bundle(parent, cache, uri)
    assert folder.is_relative_to(cache) and "stage student " in why and "student_qat have no bundle" in why
    assert load_bundle(folder).manifest == load_bundle(grading_bundle).manifest
    assert resolve_bundle(children["teacher"], cache, uri)[0] == grading_bundle  # the tagged folder exists
    with pytest.raises(PredictError, match="no such run"):
        resolve_bundle("0" * 32, cache, uri)


def test_a_bundle_changed_in_the_mlflow_store_is_refused_after_download(grading_bundle, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dr-distill", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, tags={MLFLOW_RUN_NAME: "student"}).info.run_id
    client.set_tag(run, MLFLOW_PARENT_RUN_ID, client.create_run(experiment).info.run_id)
    changed = tmp_path / "changed"
    shutil.copytree(grading_bundle, changed)
    (changed / "model.onnx").write_bytes((changed / "model.onnx").read_bytes() + b"\0")
    client.log_artifacts(run, str(changed), artifact_path="deploy")
    folder, _ = resolve_bundle(run, tmp_path / "cache", uri)
    with pytest.raises(BundleError, match=r"model\.onnx does not match its SHA-256"):
        load_bundle(folder)


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
        "deploy/bundle.json", "deploy/model.onnx", "deploy/model_int8.onnx", "deploy/network.safetensors"}
    photos = tmp_path / "photos"
    for seed in range(2):
        write_photo(photos / f"eye{seed}.png", fundus_photo(seed, size=128))
    parent = student.data.tags[MLFLOW_PARENT_RUN_ID]
    assert predict(project, model=parent, input=photos, output=tmp_path / "grades.csv", gradcam="true") == 0
    table = pd.read_csv(tmp_path / "grades.csv")
    assert table["status"].tolist() == ["ok", "ok"] and table["grade"].between(0, 4).all()
    assert cv2.imread(str(tmp_path / "grades_gradcam" / "eye0_gradcam.png")).shape == (64, 64, 3)  # debug=tiny
