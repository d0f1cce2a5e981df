"""``make bench`` in process: a fake trained chain run plus freshly built DR networks, tiny everything."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import OmegaConf

from compression.benchmark import BACKENDS, WEIGHT_SHARED
from compression.deploy import write_bundle
from datamodules.disc_crops import CoarseToFine
from datamodules.optic_disc import disc_spec
from experiments.bench import _disc_pipeline, dr_pipeline, measure_pipeline, run_bench
from lightning_modules.nets.vgg_unet import VGGUNet, save_network
from tests.experiments.helpers import compose_config, runs_by_name

DISC_MODELS = ["base-8", "prune-4"]
#: one thread (OpenMP threads wait on each other on this busy 2-core machine), two short timed runs, the
#: torchscript exporter (the dynamo exporter takes 5-10 s per network here), a 32 px timing size, few
#: calibration images and tiny timm networks for the fresh DR teacher and student
FAST = ["debug=tiny", "bench.threads=1", "bench.runs=2", "bench.warmup=0", "bench.pipeline_runs=1",
        "bench.exporter=torchscript", "bench.disc_image_size=32", "bench.calibration_images=8",
        "model.teacher.backbone=test_efficientnet", "model.student.backbone=test_efficientnet",
        "bench.targets.disc_reference=base-8", "bench.targets.disc_pruned=prune-4", "bench.throughput_batches=[1,2]"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def fake_chain_run(project: Path, networks: dict[str, VGGUNet | None], tracked: bool = True) -> tuple[Path, str]:
    """A glaucoma-iterations run directory as the chain leaves it (run_state.json, config.yaml, network.pt per
    stage; None: the stage's network file is missing), with its parent run in the MLflow store if ``tracked``
    (creating the SQLite store takes seconds)."""
    run_dir = project / "outputs" / "glaucoma-iterations" / "runs" / "2026-01-01_00-00-00"
    chain_cfg = compose_config("glaucoma_chain", ["debug=tiny"], run_dir)
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"data": OmegaConf.to_container(chain_cfg.data, resolve=True)}),
                   run_dir / "config.yaml")
    parent = "0" * 32
    if tracked:
        client = MlflowClient(str(chain_cfg.logger.tracking_uri))
        experiment = client.create_experiment("glaucoma-iterations")
        parent = client.create_run(experiment, tags={MLFLOW_RUN_NAME: "glaucoma-iterations"}).info.run_id
    stages = {}
    for name, net in networks.items():
        path = run_dir / name / "network.pt"
        if net is not None:
            save_network(net, path)
        stages[name] = {"status": "done", "network": str(path), "test": {}}
    state = {"run_key": "(defaults)", "parent_run_id": parent, "child_run_ids": {}, "stages": stages,
             "complete": True}
    (run_dir / "run_state.json").write_text(json.dumps(state))
    return run_dir, parent


def test_bench_measures_every_model_on_every_backend_and_logs_to_both_pipelines(project: Path):
    # a finisher stage (here without its network file) is not one of the chain's models: it is skipped
    stages = {"base-8": VGGUNet(base=8), "prune-4": VGGUNet(base=4), "share-prune-4": None}
    run_dir, chain_parent = fake_chain_run(project, stages)
    bench_dir = project / "outputs" / "bench" / "runs" / "now"
    table = run_bench(compose_config("bench", FAST, bench_dir))

    assert {"bench.csv", "bench.md", "pareto.png"} <= {p.name for p in bench_dir.iterdir()}
    assert (bench_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (bench_dir / "models").exists()  # bench.keep_files=false: only the sizes are kept
    saved = pd.read_csv(bench_dir / "bench.csv")
    assert list(saved.columns[:4]) == ["pipeline", "model", "backend", "source"]
    pairs = set(zip(saved["model"], saved["backend"], strict=True))
    for model in [*DISC_MODELS, "teacher", "student"]:
        for backend in [*BACKENDS, WEIGHT_SHARED]:
            assert (model, backend) in pairs, f"no row for {model} / {backend}"
    for runtime in ("ort", "ov"):
        assert {"full pipeline (student)"} == {m for m, b in pairs if b == f"{runtime}_int8" and m.startswith("full")}
    assert any(m.startswith("topological features") for m, _ in pairs)
    assert saved["error"].isna().all(), saved["error"].dropna().tolist()
    # the chain's models are the trained ones of the run directory; the DR ones are said to be untrained
    disc, dr = saved[saved["pipeline"] == "disc"], saved[saved["pipeline"] == "dr"]
    assert disc["source"].str.contains(str(run_dir)).all() and dr["source"].str.startswith("FRESH").all()
    assert disc.loc[disc["backend"] == "eager", "model"].tolist() == DISC_MODELS
    reference = disc[(disc["model"] == "base-8") & (disc["backend"] == "eager")]
    assert reference["latency_vs_reference"].item() == 1.0 and reference["input_shape"].item() == "1x3x32x32"
    assert table["quality"].notna().sum() == 4 * (len(BACKENDS) + 1)  # every model x backend row, no clinic row
    # each row names what really ran; the OpenVINO int8 rows read it from their compiled graphs
    ran = saved.set_index(["model", "backend"])["executed_precision"]
    assert ran[("prune-4", "ov_int8")] == "int8" and ran[("prune-4", "ov_fp32")] == "fp32"
    networks = saved["backend"].isin(BACKENDS) & ~saved["model"].str.startswith("full pipeline")
    assert (saved.loc[networks, "throughput_images_per_s"] > 0).all()

    markdown = (bench_dir / "bench.md").read_text()
    assert "## Targets" in markdown and "base-8" in markdown and "benchmark threads" in markdown

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    bench_runs = runs_by_name(client, "bench")
    (parent,) = [runs[0] for name, runs in bench_runs.items() if name.startswith("bench")]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "bench")} == {
        "bench/bench.csv", "bench/bench.md", "bench/pareto.png"}
    assert "bench/student/ort_int8/latency_ms_median" in parent.data.metrics
    assert "cpu.flags_absent" in parent.data.params
    (child,) = runs_by_name(client, "glaucoma-iterations")["bench"]
    assert child.data.tags["mlflow.parentRunId"] == chain_parent and child.info.status == "FINISHED"
    for name in ["bench/base-8/ort_int8/latency_ms_median", "bench/prune-4/bf16/latency_vs_fp32",
                 "quant/base-8/dice_delta", "quant/prune-4/agreement", "bench/base-8/ov_int8/latency_ms_median",
                 "quant/prune-4/ov_int8/dice_delta", "quant/prune-4/ov_bf16/agreement"]:
        assert name in child.data.metrics, name
    assert not any(name.startswith("bench/student") for name in child.data.metrics)  # only its pipeline's rows


def test_without_a_chain_run_fresh_networks_of_each_base_are_measured_and_flagged(project: Path):
    overrides = FAST + ["bench.dr_run_dir=null", "bench.disc.bases=[8,4]", "bench.disc.data.image_size=32",
                        "bench.disc.data.synthetic_num_images=20", "bench.disc.data.synthetic_raw_size=96",
                        "bench.disc.data.num_folds=3", "bench.backends=[eager]", "bench.weight_sharing_k=null"]
    table = run_bench(compose_config("bench", overrides, project / "outputs" / "bench" / "runs" / "fresh"))
    # one network per base, named after the chain's first stage of that base (kd-4 would be the same net)
    assert table["model"].tolist() == DISC_MODELS and table["backend"].tolist() == ["eager", "eager"]
    assert table["source"].str.startswith("FRESH untrained").all()
    assert table["params"].tolist() == [sum(p.numel() for p in VGGUNet(base=b).parameters()) for b in (8, 4)]


def test_a_directory_without_run_state_is_named_with_the_fix(project: Path):
    empty = project / "not-a-run"
    empty.mkdir()
    cfg = compose_config("bench", FAST + [f"bench.chain_run_dir={empty}", "bench.dr_run_dir=null"], project / "b")
    with pytest.raises(FileNotFoundError, match=r"not-a-run/run_state.json does not exist.*glaucoma-iterations"):
        run_bench(cfg)


def test_a_missing_network_file_is_named_with_the_fix(project: Path):
    run_dir, _ = fake_chain_run(project, {"base-8": VGGUNet(base=8), "prune-4": None}, tracked=False)
    cfg = compose_config("bench", FAST + [f"bench.chain_run_dir={run_dir}", "bench.dr_run_dir=null"], project / "b")
    with pytest.raises(FileNotFoundError, match=r"stage prune-4 .*prune-4/network.pt.*resume="):
        run_bench(cfg)


def test_skipping_both_pipelines_is_an_error(project: Path):
    cfg = compose_config("bench", FAST + ["bench.chain_run_dir=null", "bench.dr_run_dir=null"], project / "b")
    with pytest.raises(ValueError, match="both null"):
        run_bench(cfg)


def test_training_benchmark_measures_a_real_training_step_in_its_own_process():
    import contextlib
    import io
    import json as json_module

    from experiments.bench_training import main as bench_training

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        bench_training(["--models", "student", "--precisions", "bf16-mixed", "--batch-sizes", "2",
                        "--image-size", "64", "--steps", "1", "--warmup", "1"])
    row = json_module.loads(output.getvalue().splitlines()[0])
    assert row["model"] == "student" and row["precision"] == "bf16-mixed" and row["batch_size"] == 2
    assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 100


def test_a_teacher_at_its_own_resolution_is_timed_scored_and_calibrated_at_that_size(project: Path):
    cfg = compose_config("bench", [*FAST, "distill.teacher_image_size=96"], project / "bench")
    pipeline = dr_pipeline(cfg, "fresh", None)
    models = {model.name: model for model in pipeline.models}
    assert models["teacher"].latency_inputs[0].shape[-2:] == (96, 96)
    assert models["student"].latency_inputs[0].shape[-2:] == (64, 64)
    assert {batch["image"].shape[-1] for batch in models["teacher"].eval_batches} == {96}
    assert {batch["image"].shape[-1] for batch in models["teacher"].calibration_batches} == {96}
    assert models["student"].eval_batches is None and pipeline.eval_batches[0]["image"].shape[-1] == 64


def test_disc_models_are_scored_at_the_photographs_size_and_a_bundle_is_timed_as_the_clinic_runs_it(project: Path):
    run_dir, _ = fake_chain_run(project, {"base-8": VGGUNet(base=8)}, tracked=False)
    cfg = compose_config("bench", [*FAST, "bench.dr_run_dir=skip", "bench.backends=[eager]",
                                   "bench.weight_sharing_k=null"], project / "outputs" / "bench" / "runs" / "now")
    pipeline = _disc_pipeline(cfg, "run", run_dir)
    # one (original mask, crop box) per test image, in the evaluation batches' order, at the photographs' size
    assert len(pipeline.sources) == sum(len(batch["image"]) for batch in pipeline.eval_batches)
    first_mask, first_box = pipeline.sources[0]
    assert first_mask.shape == (first_box.source_height, first_box.source_width) and first_mask.shape[0] > 32
    # a two-pass deployment bundle of the stage, as the chain's DeploymentBundle callback writes it
    datamodule = pipeline.datamodule
    two_pass = CoarseToFine(enabled=True)
    batch = (pipeline.eval_batches[0]["image"][:1],)
    write_bundle(run_dir / "base-8" / "deploy", pipeline.models[0].net, batch, ["image"], "disc",
                 disc_spec(datamodule.preprocessing, coarse_to_fine=two_pass), {"stage": "base-8", "threshold": 0.5},
                 exporter="torchscript")
    rows = pd.DataFrame(measure_pipeline(cfg, pipeline, project / "work", threads=1)).set_index(["model", "backend"])
    eager = rows.loc[("base-8", "eager")]
    assert {"dice", "dice_net", "dice_per_image", "dice_per_image_net"} <= set(rows.columns)
    assert eager["quality"] == eager["dice"] and 0 <= eager["dice"] <= 1
    clinic = rows.loc[("full pipeline (base-8, two passes)", "ort_fp32")]
    assert clinic["latency_ms_median"] > 0 and clinic["quality_metric"] == "dice" and 0 <= clinic["quality"] <= 1
    # the same path on OpenVINO, from the bundle's IR: the same masks up to pixels at the threshold
    on_openvino = rows.loc[("full pipeline (base-8, two passes)", "ov_fp32")]
    assert on_openvino["executed_precision"] == "fp32" and on_openvino["latency_ms_median"] > 0
    assert on_openvino["quality"] == pytest.approx(clinic["quality"], abs=0.02)
