"""The glaucoma compression chain, in process, on a tiny synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from experiments.glaucoma_chain import main as glaucoma_main
from experiments.glaucoma_chain import run_glaucoma_chain
from lightning_modules.nets.transformer_seg import TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet, load_network
from tests.experiments.helpers import (
    assert_shown_value_is_the_newest,
    compose_config,
    mlflow_store,
    runs_by_name,
)

TINY = ["debug=tiny"]
STAGES = ["base-64", "prune-32", "prune-16", "prune-8", "kd-32", "kd-16", "kd-8"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _runs(project: Path) -> dict[str, list]:
    return runs_by_name(mlflow_store(project), "glaucoma-iterations")


def test_tiny_chain_nests_every_arm_and_base_under_one_parent(project: Path):
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "a"
    run_glaucoma_chain(compose_config("glaucoma_chain", TINY, run_dir))
    runs = _runs(project)
    assert set(runs) == {"glaucoma-iterations[debug=tiny]", *STAGES}
    parent = runs["glaucoma-iterations[debug=tiny]"][0]
    assert parent.info.status == "FINISHED" and parent.data.tags["synthetic_data"] == "true"
    client = mlflow_store(project)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == {
        "summary/summary.csv", "summary/summary.md"}
    for stage in STAGES:
        child = runs[stage][0]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        arm, base = stage.split("-")
        assert child.data.tags["arm"] == arm and child.data.tags["base"] == base
        for name in ["test/dice", "test/iou", "test/precision", "test/recall", "test/f1", "test/pixel_accuracy",
                     "test/tp", "test/fn", "test/false_detections", "test/hd95", "test/edge_case_detection",
                     "model/params", "model/size_bytes", "model/latency_ms_median", "chain/train_time_s",
                     "chain/epochs", "pipeline/latency_ms_median"]:
            assert name in child.data.metrics, f"{stage} lacks {name}"
        assert "predictions/test_per_image.csv" in {
            a.path for a in client.list_artifacts(child.info.run_id, "predictions")}
        overlays = sorted(Path(a.path).name for a in client.list_artifacts(child.info.run_id, "overlays"))
        assert len(overlays) == 2 and overlays[0].startswith("best_1_") and overlays[1].startswith("worst_1_")
        assert (run_dir / stage / "test_per_image.csv").is_file()
        assert (run_dir / stage / "deploy" / "bundle.json").is_file()
    assert "prune/params_after" in runs["prune-32"][0].data.metrics
    assert "train/kd" in runs["kd-16"][0].data.metrics  # the distillation term reached the loss

    table = pd.read_csv(run_dir / "summary.csv")
    assert list(table["arm"] + "-" + table["base"].astype(str)) == STAGES
    # the pruned networks really are as small as fresh ones of their base
    for base in (32, 16, 8):
        fresh = sum(p.numel() for p in VGGUNet(base=base).parameters())
        assert table.loc[table["base"].eq(base) & table["arm"].eq("prune"), "params"].item() == fresh
    pruned = load_network(run_dir / "prune-8" / "network.pt")
    assert pruned.base == 8


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(project: Path):
    # narrow bases: the test is about the chain's bookkeeping, and a base-64 stage writes ~1 GB of files
    overrides = [*TINY, "chain.bases=[16,8,4]", "chain.arms=[prune]"]
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "first"
    run_glaucoma_chain(compose_config("glaucoma_chain", overrides, run_dir))
    state_file = run_dir / "run_state.json"
    state = json.loads(state_file.read_text())
    finished = {name: Path(state["stages"][name]["network"]).stat().st_mtime_ns for name in ("base-16", "prune-8")}
    state["stages"]["prune-4"] = {"status": "running"}  # the process died while prune-4 trained
    state["complete"] = False
    state_file.write_text(json.dumps(state))

    run_glaucoma_chain(compose_config("glaucoma_chain", [*overrides, "resume=true"], project / "elsewhere"))
    resumed = json.loads(state_file.read_text())
    assert resumed["complete"] and resumed["stages"]["prune-4"]["status"] == "done"
    assert resumed["child_run_ids"] == state["child_run_ids"]
    for name, mtime in finished.items():  # not retrained
        assert Path(resumed["stages"][name]["network"]).stat().st_mtime_ns == mtime
    runs = _runs(project)
    assert all(len(runs[name]) == 1 for name in ("base-16", "prune-8", "prune-4"))


def test_fast_dev_run_of_the_chain(project: Path):
    run_dir = project / "out"
    run_glaucoma_chain(compose_config("glaucoma_chain", ["debug=fast_dev_run", "chain.bases=[16,8]"], run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["complete"] and list(state["stages"]) == ["base-16", "prune-8", "kd-8"]


def test_finishers_write_int8_and_packed_files_and_report_their_sizes(project: Path):
    run_dir = project / "fin"
    overrides = [*TINY, "chain.bases=[16,8]", "chain.arms=[prune]", "chain.finishers=[qat,share]",
                 "chain.finish_after=[prune-8]", "chain.max_epochs.qat=1", "chain.max_epochs.share=2",
                 # an almost untrained tiny network: its int8 masks need not agree with fp32's
                 "chain.callbacks.qat.min_mask_dice=0"]
    run_glaucoma_chain(compose_config("glaucoma_chain", overrides, run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert list(state["stages"]) == ["base-16", "prune-8", "qat-prune-8", "share-prune-8"]
    qat, share = state["stages"]["qat-prune-8"]["report"], state["stages"]["share-prune-8"]["report"]
    assert qat["model/size_bytes"] == (run_dir / "qat-prune-8" / "model_int8.onnx").stat().st_size
    assert "model/fp32_latency_ms_median" in qat and "quant/mask_dice_int8_vs_fp32" in qat
    assert share["model/size_bytes"] == (run_dir / "share-prune-8" / "model.rcws").stat().st_size
    assert share["model/size_bytes"] < share["model/fp32_size_bytes"]
    assert share["chain/epochs"] == 2  # a finisher fine-tunes its epochs, however good its source already is
    table = pd.read_csv(run_dir / "summary.csv")
    assert list(table["stage"]) == ["base-16", "prune-8", "qat-prune-8", "share-prune-8"]
    assert load_network(run_dir / "share-prune-8" / "network.pt").base == 8
    runs = _runs(project)
    assert runs["qat-prune-8"][0].data.metrics["model/size_bytes"] == qat["model/size_bytes"]

    # the process died after share-prune-8's last epoch, before its packed file: a resume writes it
    packed = run_dir / "share-prune-8" / "model.rcws"
    packed.unlink()
    state["stages"]["share-prune-8"] = {"status": "running"}
    state["complete"] = False
    (run_dir / "run_state.json").write_text(json.dumps(state))
    run_glaucoma_chain(compose_config("glaucoma_chain", [*overrides, f"resume={run_dir}"], project / "again"))
    resumed = json.loads((run_dir / "run_state.json").read_text())
    assert resumed["complete"] and resumed["stages"]["share-prune-8"]["report"]["model/size_bytes"] == (
        packed.stat().st_size)


def _parity_measuring(dice: float):
    """measure_int8_parity as if the int8 masks agreed with fp32's at ``dice``, their logits far apart."""
    def measure(*args, **kwargs) -> dict[str, float]:
        return {"mean_abs_logit_diff": 0.395, "max_abs_logit_diff": 3.0, "mask_dice_int8_vs_fp32": dice,
                "images": 4.0}
    return measure


def test_a_finisher_failing_its_parity_check_fails_alone_and_resume_retries_it(project: Path, monkeypatch, caplog):
    overrides = [*TINY, "chain.bases=[16,8]", "chain.arms=[prune]", "chain.finishers=[qat,share]",
                 "chain.finish_after=[prune-8]", "chain.max_epochs.qat=1", "chain.max_epochs.share=1"]
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "first"
    monkeypatch.setattr("callbacks.quantization_aware_training.measure_int8_parity", _parity_measuring(0.9))
    with pytest.raises(SystemExit) as exited:
        glaucoma_main(compose_config("glaucoma_chain", overrides, run_dir))
    assert exited.value.code == 1
    assert any(r.levelname == "ERROR" and "qat-prune-8" in r.message and "min_mask_dice=0.98" in r.message
               and "resume=" in r.message for r in caplog.records)

    state = json.loads((run_dir / "run_state.json").read_text())
    failed = state["stages"]["qat-prune-8"]
    assert failed["status"] == "failed" and failed["failure"] == "parity" and not state["complete"]
    assert "Dice of int8 vs fp32 masks 0.9000 < min_mask_dice=0.98" in failed["error"]
    assert failed["parity"]["quant/mask_dice_int8_vs_fp32"] == 0.9
    assert failed["file"] == str(run_dir / "qat-prune-8" / "model_int8.onnx")
    # a logit difference (0.395) no longer fails a disc finisher by itself; the stages after the failure still ran
    assert [state["stages"][name]["status"] for name in ("base-16", "prune-8", "share-prune-8")] == ["done"] * 3

    table = pd.read_csv(run_dir / "summary.csv").set_index("stage")
    assert list(table.index) == ["base-16", "prune-8", "qat-prune-8", "share-prune-8"]
    assert table.loc["qat-prune-8", "status"] == "failed" and "min_mask_dice" in table.loc["qat-prune-8", "note"]
    assert "- qat-prune-8: " in (run_dir / "summary.md").read_text()

    runs, client = _runs(project), mlflow_store(project)
    child = runs["qat-prune-8"][0]
    assert child.info.status == "FAILED" and "min_mask_dice=0.98" in child.data.tags["failure_reason"]
    assert child.data.metrics["quant/mask_dice_int8_vs_fp32"] == 0.9
    assert child.data.metrics["quant/mean_abs_logit_diff"] == 0.395
    parent = runs[f"glaucoma-iterations[{','.join(overrides)}]"][0]
    assert parent.info.status == "FAILED" and runs["share-prune-8"][0].info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == {
        "summary/summary.csv", "summary/summary.md"}

    # resume=true retries the failed finisher alone (from its last checkpoint), in the same child run
    networks = {name: Path(state["stages"][name]["network"]).stat().st_mtime_ns
                for name in ("base-16", "prune-8", "share-prune-8")}
    monkeypatch.setattr("callbacks.quantization_aware_training.measure_int8_parity", _parity_measuring(0.99))
    run_glaucoma_chain(compose_config("glaucoma_chain", [*overrides, "resume=true"], project / "elsewhere"))
    resumed = json.loads((run_dir / "run_state.json").read_text())
    assert resumed["complete"] and resumed["stages"]["qat-prune-8"]["status"] == "done"
    assert resumed["child_run_ids"] == state["child_run_ids"]
    assert all(Path(resumed["stages"][name]["network"]).stat().st_mtime_ns == mtime
               for name, mtime in networks.items())
    retried = client.get_run(resumed["child_run_ids"]["qat-prune-8"])
    assert retried.info.status == "FINISHED" and "failure_reason" not in retried.data.tags
    assert set(pd.read_csv(run_dir / "summary.csv")["status"]) == {"done"}


def test_retest_tests_finished_stages_again_without_training_them(project: Path):
    overrides = [*TINY, "chain.bases=[16,8]", "chain.arms=[prune]"]
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "first"
    run_glaucoma_chain(compose_config("glaucoma_chain", overrides, run_dir))
    state_file = run_dir / "run_state.json"
    before = json.loads(state_file.read_text())
    networks = {name: Path(before["stages"][name]["network"]) for name in ("base-16", "prune-8")}
    mtimes = {name: path.stat().st_mtime_ns for name, path in networks.items()}

    run_glaucoma_chain(compose_config("glaucoma_chain", [*overrides, "retest=true", f"resume={run_dir}"],
                                      project / "elsewhere"))
    after = json.loads(state_file.read_text())
    assert after["child_run_ids"] == before["child_run_ids"]
    client = mlflow_store(project)
    for name, network in networks.items():
        assert network.stat().st_mtime_ns == mtimes[name]  # not trained again
        assert after["stages"][name]["test"]["test/dice"] == pytest.approx(before["stages"][name]["test"]["test/dice"])
        assert_shown_value_is_the_newest(client, after["child_run_ids"][name], "model/latency_ms_median")


# --- experiment=disc_transformer: the transformer segmenter as a comparison stage ---------------------------
#: a base-8 reference keeps the tiny run short; the experiment's own is base 64
TRANSFORMER = ["experiment=disc_transformer", *TINY, "chain.bases=[8]"]


@pytest.mark.parametrize("debug", ["none", "smoke", "tiny"])
def test_disc_transformer_experiment_builds_the_comparison_for_its_image_size(debug: str, tmp_path: Path,
                                                                               monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_config("glaucoma_chain", ["experiment=disc_transformer", f"debug={debug}"],
                         tmp_path / "run")
    assert list(cfg.chain.bases) == [64] and list(cfg.chain.arms) == []
    assert list(cfg.chain.compare) == ["transformer"]
    # a comparison trains as long as iteration 1
    assert cfg.chain.max_epochs.compare == cfg.chain.max_epochs.base
    module = instantiate(cfg.model.compare.transformer)
    assert isinstance(module.net, TransformerSegNet) and module.net.spec()["encoder"] == "pvt_v2_b0"
    size = cfg.data.image_size
    with torch.no_grad():
        assert module.net.eval()(torch.zeros(1, 3, size, size)).shape == (1, 1, size, size)


def test_a_comparison_without_its_config_or_a_chain_of_transformers_is_refused_before_anything_runs(
        project: Path):
    with pytest.raises(ValueError, match=r"chain.compare names \['transformer'\].*model.compare"):
        run_glaucoma_chain(compose_config("glaucoma_chain", [*TINY, "chain.compare=[transformer]"],
                                          project / "x"))
    # pruning and the finishers know the VGG16-style network only
    with pytest.raises(ValueError, match="architecture=transformer.*experiment=disc_transformer"):
        run_glaucoma_chain(compose_config("glaucoma_chain", [*TINY, "model/segmenter=transformer"],
                                          project / "y"))
    # 48 px suits the VGG (a multiple of 16) but not pvt_v2's stride 32: refused before iteration 1 trains
    with pytest.raises(ValueError, match=r"data.image_size=48: .*divisible by 32; use e.g. data.image_size=64"):
        run_glaucoma_chain(compose_config("glaucoma_chain", [*TINY, "experiment=disc_transformer",
                                                             "data.image_size=48"], project / "z"))
    assert not (project / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow
def test_disc_transformer_chain_reports_the_transformer_beside_iteration_one(project: Path):
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "transformer"
    run_glaucoma_chain(compose_config("glaucoma_chain", TRANSFORMER, run_dir))
    runs = _runs(project)
    parent_name = f"glaucoma-iterations[{','.join(TRANSFORMER)}]"
    assert set(runs) == {parent_name, "base-8", "compare-transformer"}
    parent, child = runs[parent_name][0], runs["compare-transformer"][0]
    assert parent.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["arm"] == "compare" and child.data.tags["base"] == "-"
    for name in ["test/dice", "test/iou", "test/edge_case_detection", "model/params", "model/size_bytes",
                 "model/latency_ms_median", "chain/train_time_s", "pipeline/latency_ms_median"]:
        assert name in child.data.metrics, f"compare-transformer lacks {name}"
    latency = child.data.metrics["model/latency_ms_median"]
    assert parent.data.metrics["compare-transformer/latency_ms"] == latency
    assert not any(key.startswith("liminal/compare") for key in parent.data.metrics)

    table = pd.read_csv(run_dir / "summary.csv").set_index("stage")
    assert list(table.index) == ["base-8", "compare-transformer"]
    row = table.loc["compare-transformer"]
    assert row["arm"] == "compare" and math.isnan(row["base"]) and table.loc["base-8", "base"] == 8
    # the config's network: pvt_v2_b0 with a 128-channel decoder, as the experiment builds it
    assert row["params"] == sum(p.numel() for p in TransformerSegNet(decoder_dim=128).parameters())
    assert row["latency_vs_base"] == pytest.approx(row["latency_ms"] / table.loc["base-8", "latency_ms"])
    assert "| compare-transformer | compare | -" in (run_dir / "summary.md").read_text()
    network = run_dir / "compare-transformer" / "network.pt"
    assert isinstance(load_network(network), TransformerSegNet)
    bundle = json.loads((run_dir / "compare-transformer" / "deploy" / "bundle.json").read_text())
    assert bundle["files"]["fp32"] and bundle["fp32_max_abs_diff"] < 1e-4

    # retest: the comparison is rebuilt from its network.pt, tested again, not trained
    state_file = run_dir / "run_state.json"
    before = json.loads(state_file.read_text())
    mtime = network.stat().st_mtime_ns
    run_glaucoma_chain(compose_config("glaucoma_chain", [*TRANSFORMER, "retest=true", f"resume={run_dir}"],
                                      project / "elsewhere"))
    after = json.loads(state_file.read_text())
    assert after["child_run_ids"] == before["child_run_ids"] and network.stat().st_mtime_ns == mtime
    assert after["stages"]["compare-transformer"]["test"]["test/dice"] == pytest.approx(
        before["stages"]["compare-transformer"]["test"]["test/dice"])
    assert_shown_value_is_the_newest(mlflow_store(project), after["child_run_ids"]["compare-transformer"],
                                     "model/latency_ms_median")

    # resume: the process died while the comparison trained; iteration 1 is not trained again
    after["stages"]["compare-transformer"] = {"status": "running"}
    after["complete"] = False
    state_file.write_text(json.dumps(after))
    first = Path(after["stages"]["base-8"]["network"]).stat().st_mtime_ns
    run_glaucoma_chain(compose_config("glaucoma_chain", [*TRANSFORMER, "resume=true"], project / "again"))
    resumed = json.loads(state_file.read_text())
    assert resumed["complete"] and resumed["stages"]["compare-transformer"]["status"] == "done"
    assert Path(resumed["stages"]["base-8"]["network"]).stat().st_mtime_ns == first
    assert network.stat().st_mtime_ns != mtime
    assert all(len(runs) == 1 for runs in _runs(project).values())


def test_a_coarse_to_fine_chain_trains_scores_and_deploys_two_passes(project: Path):
    run_dir = project / "c2f"
    overrides = [*TINY, "chain.bases=[16,8]", "chain.arms=[prune]", "chain.coarse_to_fine=true",
                 "chain.finishers=[qat]", "chain.finish_after=[prune-8]", "chain.max_epochs.qat=1",
                 "chain.callbacks.qat.min_mask_dice=0"]
    run_glaucoma_chain(compose_config("glaucoma_chain", overrides, run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    assert list(state["stages"]) == ["base-16", "prune-8", "qat-prune-8"]
    for name, stage in state["stages"].items():
        test = stage["test"]
        assert test["test/coarse_to_fine"] == 1 and test["test/at_source_resolution"] == 1, name
        outcomes = [test[f"test/first_pass_{status}"] for status in ("found", "no_disc_found", "several_disc_candidates")]
        assert sum(outcomes) == test["test/images"], name  # every test photograph went through the first pass
        assert "test_net/dice" in test
    bundle = json.loads((run_dir / "prune-8" / "deploy" / "bundle.json").read_text())
    assert bundle["preprocessing"]["coarse_to_fine"]["enabled"] is True
    runs = _runs(project)
    assert runs["prune-8"][0].data.metrics["test/coarse_to_fine"] == 1
