"""The whole dr-distill pipeline, in process, on a tiny synthetic set (Lightning's fast_dev_run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.classification_diagnostics import PREDICTIONS_FILE
from datamodules.fundus import FundusPreprocessing
from experiments.train_dr import main as dr_main
from experiments.train_dr import run_dr_distill
from lightning_modules.soft_targets import SoftTargetCache, teacher_key
from tests.experiments.helpers import (
    assert_shown_value_is_the_newest,
    compose_config,
    mlflow_store,
    runs_by_name,
)

TINY = ["debug=tiny"]
FAST = ["debug=fast_dev_run"]


def _runs(client) -> dict[str, list]:
    return runs_by_name(client, "dr-distill")


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_fast_dev_run_logs_parent_and_child_runs_with_stable_metric_names(project: Path):
    cfg = compose_config("train_dr", TINY, project / "outputs" / "dr-distill" / "runs" / "a")
    run_dr_distill(cfg)
    client = mlflow_store(project)
    runs = _runs(client)
    assert set(runs) == {"dr-distill[debug=tiny]", "teacher", "student"}
    parent = runs["dr-distill[debug=tiny]"][0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["synthetic_data"] == "true" and len(parent.data.tags["data_fingerprint"]) == 16
    assert parent.data.tags["overrides"] == "debug=tiny"
    assert "mlflow.source.git.commit" in parent.data.tags
    assert "majority_class/test_acc" in parent.data.metrics and "student/test/qwk" in parent.data.metrics
    for stage in ("teacher", "student"):
        child = runs[stage][0]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        metrics = child.data.metrics
        for name in ["test/qwk", "test/acc", "test/f1_macro", "test/f1_weighted", "model/params", "model/macs",
                     "model/size_bytes", "model/latency_ms_median", "model/latency_ms_min",
                     "model/latency_ms_max", "model/fps", "pipeline/latency_ms_median"]:
            assert name in metrics, f"{stage} lacks {name}"
        assert all(f"test/recall_{g}" in metrics and f"test/auroc_{g}" in metrics for g in range(5))
        assert metrics["model/params"] > 1e5 and metrics["model/latency_ms_median"] > 0
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "run")}
        assert {"run/config.yaml", "run/splits.csv"} <= artifacts
        assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == [
            "plots/confusion_matrix.png", "plots/pr_curves.png", "plots/reliability.png"]
        assert 0.0 <= metrics["test/ece"] <= 1.0
        assert [a.path for a in client.list_artifacts(child.info.run_id, "predictions")] == [
            "predictions/test_predictions.csv"]
        explained = [a.path for a in client.list_artifacts(child.info.run_id, "explain")]
        assert len(explained) == 1 and explained[0].startswith("explain/grade4_")  # debug=tiny: grade 4 only
        assert (project / "outputs" / "dr-distill" / "runs" / "a" / stage / "test_predictions.csv").is_file()
        assert {"deploy/bundle.json", "deploy/model.onnx"} <= {
            a.path for a in client.list_artifacts(child.info.run_id, "deploy")}
        checkpoints = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")]
        assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint/best-")
    student_params = runs["student"][0].data.params
    assert student_params["teacher_checkpoint"].endswith(".ckpt")
    assert float(student_params["temperature"]) == 4.0


def test_resume_skips_finished_stages_and_reuses_the_mlflow_runs(project: Path):
    run_dir = project / "outputs" / "dr-distill" / "runs" / "first"
    run_dr_distill(compose_config("train_dr", TINY, run_dir))
    state_file = run_dir / "run_state.json"
    state = json.loads(state_file.read_text())
    teacher_checkpoint = state["stages"]["teacher"]["checkpoint"]
    # pretend the process died while the student was training
    state["stages"]["student"] = {"status": "running"}
    state["complete"] = False
    state_file.write_text(json.dumps(state))
    teacher_mtime = Path(teacher_checkpoint).stat().st_mtime_ns

    resumed_dir = project / "outputs" / "dr-distill" / "runs" / "b"
    run_dr_distill(compose_config("train_dr", [*TINY, "resume=true"], resumed_dir))
    resumed = json.loads(state_file.read_text())
    assert resumed["complete"] and resumed["stages"]["student"]["status"] == "done"
    assert resumed["parent_run_id"] == state["parent_run_id"]
    assert resumed["child_run_ids"] == state["child_run_ids"]
    assert Path(teacher_checkpoint).stat().st_mtime_ns == teacher_mtime  # the teacher was not retrained
    runs = _runs(mlflow_store(project))
    assert len(runs["teacher"]) == 1 and len(runs["student"]) == 1
    assert not (resumed_dir / "run_state.json").exists()  # everything went to the original run


def test_fast_dev_run_of_the_whole_experiment(project: Path):
    run_dir = project / "out"
    run_dr_distill(compose_config("train_dr", FAST, run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["complete"] and [s["status"] for s in state["stages"].values()] == ["done", "done"]
    assert Path(state["stages"]["teacher"]["checkpoint"]).name == "final.ckpt"
    runs = _runs(mlflow_store(project))
    assert {"teacher", "student"} <= set(runs)


def test_student_only_ablation_trains_without_a_teacher(project: Path):
    cfg = compose_config("train_dr", [*TINY, "experiment=dr_student_only"], project / "out")
    run_dr_distill(cfg)
    runs = _runs(mlflow_store(project))
    assert "teacher" not in runs and "student" in runs
    assert runs["student"][0].data.params["teacher_checkpoint"] == "None"


def test_the_student_distils_from_cached_soft_targets_computed_once_per_teacher(project: Path):
    first = project / "first"
    run_dr_distill(compose_config("train_dr", TINY, first))
    state = json.loads((first / "run_state.json").read_text())
    report = state["stages"]["student"]["report"]
    splits = (first / "splits.csv").read_text().splitlines()
    train_images = sum(1 for line in splits if ",train," in line)
    assert report["distill/soft_targets_computed"] == train_images > 0
    # a second student with the same teacher (a sweep, an ablation arm) runs no teacher forward
    second = project / "second"
    run_dr_distill(compose_config("train_dr", [*TINY, "stages=[student]", f"distill.teacher_checkpoint={first}"],
                                  second))
    state = json.loads((second / "run_state.json").read_text())
    assert state["stages"]["student"]["report"]["distill/soft_targets_computed"] == 0
    assert state["stages"]["student"]["status"] == "done"


def test_a_teacher_at_a_higher_resolution_trains_and_teaches_at_its_own_size(project: Path):
    first = project / "first"
    run_dr_distill(compose_config("train_dr", [*TINY, "distill.teacher_image_size=96"], first))
    state = json.loads((first / "run_state.json").read_text())
    bundle_size = {stage: json.loads((first / stage / "deploy" / "bundle.json").read_text())["preprocessing"]
                   ["image_size"] for stage in ("teacher", "student")}
    assert bundle_size == {"teacher": 96, "student": 64}
    # the soft targets were made from the 96 px images: cached under that preprocessing, not the student's
    train_image = next(line.split(",")[-1] for line in (first / "splits.csv").read_text().splitlines()
                       if ",train," in line)
    teacher = teacher_key(state["stages"]["teacher"]["checkpoint"], 1)
    cached = {size: SoftTargetCache(project / ".cache", teacher, FundusPreprocessing(size).key, 5).load(train_image)
              for size in (96, 64)}
    assert cached[96] is not None and cached[64] is None
    parent = _runs(mlflow_store(project))["dr-distill[debug=tiny,distill.teacher_image_size=96]"][0]
    assert parent.data.metrics["distill/teacher_over_student_macs"] > 1.5
    # a student taught by that run's teacher must grade its images at the size it was trained at
    with pytest.raises(ValueError, match="distill.teacher_image_size=96"):
        run_dr_distill(compose_config("train_dr", [*TINY, "stages=[student]", f"distill.teacher_checkpoint={first}"],
                                      project / "second"))


def test_a_teacher_at_another_resolution_needs_offline_distillation(project: Path):
    overrides = [*TINY, "distill.teacher_image_size=96", "callbacks.offline_distillation.enabled=false"]
    with pytest.raises(ValueError, match="offline_distillation.enabled=false"):
        run_dr_distill(compose_config("train_dr", overrides, project / "out"))
    assert not (project / "out" / "run_state.json").exists()


def test_multi_trains_on_two_sets_and_logs_each_sets_test_metrics(project: Path, aptos_root: Path,
                                                                  eyepacs_root: Path):
    overrides = [*TINY, "experiment=dr_student_only", "data=multi", f"data.sources.aptos.root={aptos_root}",
                 f"data.sources.eyepacs.root={eyepacs_root}", "data.image_size=64"]
    run_dr_distill(compose_config("train_dr", overrides, project / "multi"))
    student = _runs(mlflow_store(project))["student"][0]
    for name in ("aptos", "eyepacs"):
        assert {f"test/{name}/qwk", f"test/{name}/acc", f"test/{name}/images"} <= set(student.data.metrics)
    images = student.data.metrics["test/aptos/images"] + student.data.metrics["test/eyepacs/images"]
    splits = (project / "multi" / "splits.csv").read_text().splitlines()
    assert images == sum(1 for line in splits[1:] if ",test," in line)
    assert splits[0].endswith(",dataset")


def test_student_stage_alone_with_distillation_needs_a_teacher(project: Path):
    cfg = compose_config("train_dr", [*FAST, "stages=[student]"], project / "out")
    with pytest.raises(ValueError, match="distill.teacher_checkpoint"):
        run_dr_distill(cfg)


def test_student_qat_stage_writes_an_int8_student_and_reports_it(project: Path):
    run_dir = project / "qat"
    overrides = [*TINY, "stages=[teacher,student,student_qat]", "qat.max_epochs=1",
                 # an almost untrained tiny student: its int8 grades need not agree with fp32's
                 "qat.callback.min_agreement=0", "qat.callback.max_qwk_drop=2"]
    run_dr_distill(compose_config("train_dr", overrides, run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    report = state["stages"]["student_qat"]["report"]
    int8 = run_dir / "student_qat" / "student_int8.onnx"
    assert report["model/size_bytes"] == int8.stat().st_size < report["model/fp32_size_bytes"]
    assert {"quant/agreement", "quant/qwk_delta", "model/fp32_latency_ms_median"} <= set(report)
    assert "test/qwk" in state["stages"]["student_qat"]["test"]


@pytest.mark.parametrize("head", ["regression", "ordinal"])
def test_a_threshold_head_student_carries_its_validation_thresholds_into_checkpoint_bundle_and_qat(project: Path,
                                                                                                  head: str):
    run_dir = project / head
    overrides = [*TINY, f"model.student.head={head}", "stages=[teacher,student,student_qat]", "qat.max_epochs=1",
                 "qat.callback.min_agreement=0", "qat.callback.max_qwk_drop=2"]
    run_dr_distill(compose_config("train_dr", overrides, run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert [s["status"] for s in state["stages"].values()] == ["done"] * 3
    checkpoint = torch.load(state["stages"]["student"]["checkpoint"], map_location="cpu", weights_only=True)
    thresholds = checkpoint["state_dict"]["net.decoder.thresholds"]
    assert thresholds.shape == (4,) and bool((thresholds.diff() > 0).all())
    student = _runs(mlflow_store(project))["student"][0]
    assert {f"val/threshold_{k}" for k in range(1, 5)} <= set(student.data.metrics)
    manifest = json.loads((run_dir / "student" / "deploy" / "bundle.json").read_text())
    assert manifest["grading_head"]["kind"] == head
    assert manifest["grading_head"]["thresholds"] == pytest.approx(thresholds.tolist(), abs=1e-5)
    assert "test/qwk" in state["stages"]["student_qat"]["test"]


def test_a_student_qat_failing_its_parity_check_is_recorded_and_the_run_exits_non_zero(project: Path,
                                                                                       monkeypatch, caplog):
    run_dir = project / "qat-fails"
    overrides = [*TINY, "stages=[teacher,student,student_qat]", "qat.max_epochs=1",
                 # the figures and bundles of the test stages: not what this test is about
                 "++callbacks.deployment_bundle=null", "++callbacks.grading_explanations=null"]
    # small logits drift, but half the grades change: judged on the grades, the int8 student fails
    monkeypatch.setattr("callbacks.quantization_aware_training.measure_int8_parity", lambda *args, **kwargs: {
        "mean_abs_logit_diff": 0.1, "max_abs_logit_diff": 0.5, "agreement": 0.5, "qwk_delta": -0.2, "images": 8.0})
    with pytest.raises(SystemExit) as exited:
        dr_main(compose_config("train_dr", overrides, run_dir))
    assert exited.value.code == 1
    assert any(r.levelname == "ERROR" and "student_qat" in r.message and "min_agreement=0.9" in r.message
               for r in caplog.records)
    state = json.loads((run_dir / "run_state.json").read_text())
    failed = state["stages"]["student_qat"]
    assert failed["status"] == "failed" and not state["complete"]
    assert "min_agreement=0.9" in failed["error"] and "max_qwk_drop=0.05" in failed["error"]
    assert [state["stages"][stage]["status"] for stage in ("teacher", "student")] == ["done", "done"]
    runs = _runs(mlflow_store(project))
    child = runs["student_qat"][0]
    assert child.info.status == "FAILED" and "min_agreement=0.9" in child.data.tags["failure_reason"]
    assert child.data.metrics["quant/agreement"] == 0.5 and child.data.metrics["quant/qwk_delta"] == -0.2
    parent = runs[f"dr-distill[{','.join(overrides)}]"][0]
    assert parent.info.status == "FAILED" and "student/test/qwk" in parent.data.metrics  # summarised first


def test_student_qat_needs_a_trained_student(project: Path):
    with pytest.raises(ValueError, match="after 'student'"):
        run_dr_distill(compose_config("train_dr", [*TINY, "stages=[teacher,student_qat]"], project / "q"))


def test_retest_tests_finished_stages_again_without_training_them(project: Path):
    run_dir = project / "outputs" / "dr-distill" / "runs" / "first"
    run_dr_distill(compose_config("train_dr", TINY, run_dir))
    state_file = run_dir / "run_state.json"
    before = json.loads(state_file.read_text())
    checkpoints = {s: Path(before["stages"][s]["checkpoint"]) for s in ("teacher", "student")}
    mtimes = {s: path.stat().st_mtime_ns for s, path in checkpoints.items()}
    for stage in checkpoints:  # a file today's callbacks write at test time, missing from the old run
        (run_dir / stage / PREDICTIONS_FILE).unlink()

    run_dr_distill(compose_config("train_dr", [*TINY, "retest=true", f"resume={run_dir}"], project / "elsewhere"))
    after = json.loads(state_file.read_text())
    assert after["child_run_ids"] == before["child_run_ids"]
    client = mlflow_store(project)
    for stage, checkpoint in checkpoints.items():
        assert checkpoint.stat().st_mtime_ns == mtimes[stage]  # not trained again
        assert (run_dir / stage / PREDICTIONS_FILE).is_file()
        # the same weights on the same split: the same test scores, logged a second time in the same run
        assert after["stages"][stage]["test"]["test/qwk"] == pytest.approx(before["stages"][stage]["test"]["test/qwk"])
        assert_shown_value_is_the_newest(client, after["child_run_ids"][stage], "model/latency_ms_median")
    assert all(len(runs) == 1 for runs in _runs(client).values())

    # the run is tested as it was trained: other overrides are refused before anything starts
    with pytest.raises(ValueError, match="trained with the overrides 'debug=tiny'"):
        run_dr_distill(compose_config("train_dr", [*TINY, "seed=7", "retest=true", f"resume={run_dir}"],
                                      project / "other"))
    # and it trains nothing: a stage that never finished is refused too
    after["stages"]["student"] = {"status": "running"}
    state_file.write_text(json.dumps(after))
    with pytest.raises(ValueError, match=r"stages \['student'\] .* never finished"):
        run_dr_distill(compose_config("train_dr", [*TINY, "retest=true", f"resume={run_dir}"], project / "again"))


def test_retest_needs_the_folder_of_the_run_to_test(project: Path):
    cfg = compose_config("train_dr", [*TINY, "retest=true", "resume=true"], project / "out")
    with pytest.raises(ValueError, match="give that run's folder"):
        run_dr_distill(cfg)

