"""``make bench``: the models of both pipelines on every CPU inference backend, measured in one run.

    python -m experiments.bench                                   # the newest complete run of each pipeline
    python -m experiments.bench bench.chain_run_dir=outputs/glaucoma-iterations/runs/<time> bench.dr_run_dir=null
    python -m experiments.bench bench.runs=3 bench.warmup=1      # a quick look

Optic disc: every stage of a glaucoma-iterations run (base-64, prune-*, kd-*), timed at
``bench.disc_image_size`` and scored on the run's test split at its own image size. DR: the teacher and the
student of a dr-distill run, timed and scored (QWK) on its test split, plus the topological features alone
and the clinic's full path (decode, preprocess, topology, student in fp32 and int8). The data modules are
rebuilt from each run's ``config.yaml``, relative paths in it read from the current directory as when the
run was trained. Without a trained run, freshly built networks of the configured architectures are measured
on synthetic data (a warning, and the ``source`` column, say that their quality is that of untrained nets).

Writes bench.csv, bench.md (the table, the issue's targets, the CPU) and pareto.png into the bench run
directory, logs them to the bench run in MLflow and to a ``bench`` child run under each measured pipeline's
parent run, and prints the Markdown.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from compression.benchmark import (
    GRADING,
    SEGMENTATION,
    SourceMask,
    add_ratios,
    artifact_paths,
    benchmark_backends,
    check_targets,
    contention_warning,
    cpu_description,
    default_threads,
    markdown_report,
    mask_pair_dice,
    pareto_plot,
    torch_threads,
)
from compression.deploy import PRECISIONS, BundleError, Predictor, load_bundle
from compression.export import as_ort_array, network_input_names, ort_session, quiet_onnx_tool_logs
from compression.openvino_runtime import OpenVINOSession
from compression.packed_format import vgg_unet_architecture
from compression.runtimes import OPENVINO, ORT, RUNTIMES
from datamodules.dr import DRDataModule
from datamodules.fundus import SquareCrop, read_rgb
from datamodules.optic_disc import SOURCE_CROP_KEY, SOURCE_MASK_KEY, DiscDataModule, coarse_to_fine_from_spec
from datamodules.topology import image_diagrams
from experiments.chain_summary import ARMS, BASE_ARM, plan_chain
from experiments.runner import RunContext, create_context, finishing, save_resolved_config
from experiments.stages import NOT_STUDENT_ARGUMENTS
from experiments.tracking import standard_tags
from lightning_modules.classifier import StudentDistiller, TeacherClassifier
from lightning_modules.nets.vgg_unet import INPUT_MULTIPLE, load_network
from lightning_modules.profiling import measure_latency

log = logging.getLogger(__name__)

CHAIN_TASK, DR_TASK = "glaucoma-iterations", "dr-distill"
LATEST = "latest"
#: the column order of bench.csv (the measured columns follow)
LEADING_COLUMNS = ["pipeline", "model", "backend", "source"]
#: a runtime's clinic rows are named as its backends in the per-network rows (ort_int8, ov_int8, ...)
CLINIC_BACKEND_PREFIX = {ORT: "ort", OPENVINO: "ov"}


@dataclass
class BenchModel:
    """One network of a pipeline, with the forward inputs its latency is measured on."""

    name: str
    net: nn.Module
    input_names: tuple[str, ...]
    latency_inputs: tuple[Tensor, ...]
    architecture: dict[str, Any]
    #: its own test and calibration batches where it sees another resolution than the pipeline's data (a DR
    #: teacher trained at ``distill.teacher_image_size``); None: the pipeline's
    eval_batches: list[dict[str, Tensor]] | None = field(default=None, repr=False)
    calibration_batches: list[dict[str, Tensor]] | None = field(default=None, repr=False)


@dataclass
class Pipeline:
    """The models of one pipeline and the data they are scored and calibrated on (dict batches)."""

    key: str  # "disc" or "dr", the ``pipeline`` column
    task: str  # SEGMENTATION or GRADING
    source: str
    reference: str  # the uncompressed model's name
    models: list[BenchModel]
    eval_batches: list[dict[str, Tensor]]
    calibration_batches: list[dict[str, Tensor]]
    target_key: str
    dynamic_spatial: bool
    fingerprint: str
    synthetic: bool
    run_dir: Path | None = None
    parent_run_id: str | None = None
    datamodule: Any = field(default=None, repr=False)
    #: segmentation: each evaluation image's original mask and crop box (scores at the photograph's size)
    sources: list[SourceMask] | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------ finding runs
def newest_complete_run(runs_dir: Path) -> Path | None:
    """The newest run directory under ``runs_dir`` whose run_state.json says complete. Newest by name: Hydra
    names run directories by their start time (``%Y-%m-%d_%H-%M-%S``), which file times do not keep reliably
    (a resumed or copied run)."""
    finished = []
    for state_file in runs_dir.glob("*/run_state.json"):
        try:
            if json.loads(state_file.read_text()).get("complete"):
                finished.append(state_file)
        except (OSError, json.JSONDecodeError):
            continue
    return max(finished, key=lambda p: p.parent.name).parent if finished else None


def resolve_run_dir(setting: str | None, task: str, output_root: str | Path, option: str) -> tuple[str, Path | None]:
    """``("skip", None)``, ``("fresh", None)`` (``latest`` found no complete run) or ``("run", directory)``."""
    if setting is None or str(setting).strip().lower() in {"", "null", "none"}:
        return "skip", None
    runs_dir = Path(output_root) / task / "runs"
    if str(setting) == LATEST:
        found = newest_complete_run(runs_dir)
        return ("run", found) if found is not None else ("fresh", None)
    run_dir = Path(str(setting)).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{option}={setting}: no such directory; pass a {task} run directory "
                                f"({runs_dir}/<time>), '{LATEST}', or null to skip this pipeline")
    return "run", run_dir


def read_run_state(run_dir: Path, task: str, option: str) -> dict[str, Any]:
    """run_state.json of a run directory, with a clear error when it is not one."""
    state_file = run_dir / "run_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{option}={run_dir}: {state_file} does not exist, so this is not a {task} run "
                                f"directory; pass one of outputs/{task}/runs/<time> (written by make {task}), "
                                f"'{LATEST}', or null to skip this pipeline")
    state = json.loads(state_file.read_text())
    if not state.get("complete"):
        log.warning("%s is an unfinished %s run: measuring the stages it has finished", run_dir, task)
    return state


def _run_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the bench rebuilds the run's data from its resolved "
                                "config; pass a run directory written by the training entry point")
    return OmegaConf.load(path)


def _done_stages(state: Mapping[str, Any], run_dir: Path, task: str) -> dict[str, dict[str, Any]]:
    stages = {name: result for name, result in state.get("stages", {}).items() if result.get("status") == "done"}
    if not stages:
        raise ValueError(f"{run_dir} has no finished stage in run_state.json: finish it (make {task} "
                         "ARGS=resume=true) or pass another run directory")
    return stages


def _ready_datamodule(data_cfg: DictConfig) -> Any:
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def _take_images(loader: Iterable[dict[str, Tensor]], count: int) -> list[dict[str, Tensor]]:
    """Batches of ``loader`` holding at least ``count`` images in all (the last one may hold more)."""
    taken, images = [], 0
    for batch in loader:
        if images >= count:
            break
        taken.append(batch)
        images += len(batch["image"])
    return taken


def _check_test_split(run_dir: Path, datamodule: Any) -> None:
    """The rebuilt test split should be the one the run was tested on (splits.csv next to run_state.json)."""
    saved = run_dir / "splits.csv"
    if not saved.is_file():
        log.warning("%s is missing: cannot check that the rebuilt test split is the run's", saved)
        return
    recorded = pd.read_csv(saved)
    rebuilt = datamodule.split_table()
    if set(recorded.loc[recorded["split"] == "test", "sample_id"].astype(str)) != set(
            rebuilt.loc[rebuilt["split"] == "test", "sample_id"].astype(str)):
        log.warning("The test split rebuilt from %s/config.yaml differs from the run's splits.csv (the data "
                    "changed since training?): quality is measured on the rebuilt split", run_dir)


# ----------------------------------------------------------------------------------------------- optic disc
def _disc_latency_image(datamodule: DiscDataModule, size: int) -> Tensor:
    if size % INPUT_MULTIPLE:
        raise ValueError(f"bench.disc_image_size={size}: the VGG U-Net needs sides divisible by {INPUT_MULTIPLE} "
                         f"(e.g. {size - size % INPUT_MULTIPLE + INPUT_MULTIPLE})")
    # one real test image resized: the latency does not depend on the content, only on the size
    image = datamodule.datasets["test"][0]["image"].unsqueeze(0)
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


def _disc_pipeline(cfg: DictConfig, mode: str, run_dir: Path | None) -> Pipeline:
    bench = cfg.bench
    if mode == "run":
        state = read_run_state(run_dir, CHAIN_TASK, "bench.chain_run_dir")
        stages = _done_stages(state, run_dir, CHAIN_TASK)
        # the base and the arms; a finisher stage (qat-*, share-*) holds a fine-tuned copy of one of them, which
        # the bench's own post-training int8 and weight-sharing rows stand for, and a comparison stage
        # (compare-*) is another architecture, not a step of the compression chain
        skipped = [name for name in stages if name.split("-")[0] not in (BASE_ARM, *ARMS)]
        if skipped:
            log.info("Not measuring the finisher and comparison stages %s of %s", skipped, run_dir)
        stages = {name: result for name, result in stages.items() if name not in skipped}
        if not stages:
            raise ValueError(f"{run_dir} has no finished base, prune or kd stage to measure (only {skipped})")
        networks = {}
        for name, result in stages.items():
            network = result.get("network")
            if not network or not Path(network).is_file():
                raise FileNotFoundError(
                    f"stage {name} of {run_dir}: its network file {network!r} (run_state.json 'network') is "
                    f"missing; rerun the chain (make {CHAIN_TASK} ARGS=\"resume={run_dir}\") or pass "
                    "bench.chain_run_dir=<another run>")
            networks[name] = network
        datamodule = _ready_datamodule(_run_config(run_dir).data)
        _check_test_split(run_dir, datamodule)
        nets = {name: load_network(path).eval() for name, path in networks.items()}
        source = f"trained: {run_dir}"
    else:
        datamodule = _ready_datamodule(bench.disc.data)
        plan = plan_chain(list(bench.disc.bases), list(bench.disc.arms))
        first_per_base = {stage.base: stage.name for stage in reversed(plan)}  # the earliest stage of each base
        nets = {name: instantiate(bench.disc.segmenter, base=base, vgg16_weights=None).net.eval()
                for base, name in sorted(first_per_base.items(), reverse=True)}
        source = "FRESH untrained network (no complete glaucoma-iterations run): quality is meaningless"
        state = {}
    image = _disc_latency_image(datamodule, int(bench.disc_image_size))
    models = [BenchModel(name, net, ("image",), (image,), vgg_unet_architecture(net)) for name, net in nets.items()]
    return Pipeline(
        key="disc", task=SEGMENTATION, source=source, reference=next(iter(nets)), models=models,
        eval_batches=list(datamodule.predict_dataloader()),  # the test split, unaugmented
        calibration_batches=_take_images(datamodule.calibration_dataloader(), int(bench.calibration_images)),
        target_key="mask", dynamic_spatial=True, fingerprint=datamodule.fingerprint,
        synthetic=datamodule.is_synthetic, run_dir=run_dir, parent_run_id=state.get("parent_run_id"),
        datamodule=datamodule, sources=_source_masks(datamodule),
    )


def _source_masks(datamodule: DiscDataModule) -> list[SourceMask]:
    """Each test image's original mask and crop box, in the evaluation batches' order (the test split)."""
    dataset = datamodule.source_test_dataset(datamodule.datasets["test"])
    sources = (dataset.source(index) for index in range(len(dataset)))
    return [(item[SOURCE_MASK_KEY].numpy(), SquareCrop(*item[SOURCE_CROP_KEY].tolist())) for item in sources]


# ----------------------------------------------------------------------------------------------------- DR
def dr_pipeline(cfg: DictConfig, mode: str, run_dir: Path | None) -> Pipeline:
    """The DR models to measure: a run's finished teacher and student (``mode="run"``) or fresh networks of the
    configured architectures (``"fresh"``), with the test and calibration batches each is scored on."""
    state: dict[str, Any] = {}
    if mode == "run":
        state = read_run_state(run_dir, DR_TASK, "bench.dr_run_dir")
        stages = _done_stages(state, run_dir, DR_TASK)
        checkpoints = {}
        for name in ("teacher", "student"):
            checkpoint = stages.get(name, {}).get("checkpoint")
            if name in stages and (not checkpoint or not Path(checkpoint).is_file()):
                raise FileNotFoundError(
                    f"stage {name} of {run_dir}: its checkpoint {checkpoint!r} (run_state.json) is missing; rerun "
                    f"make {DR_TASK} ARGS=\"resume={run_dir}\" or pass bench.dr_run_dir=<another run>")
            if checkpoint:
                checkpoints[name] = checkpoint
        run_config = _run_config(run_dir)
        teacher_size = OmegaConf.select(run_config, "distill.teacher_image_size", default=None)
        datamodule = _ready_datamodule(run_config.data)
        _check_test_split(run_dir, datamodule)
        # pretrained="none": the checkpoints hold every weight; nothing is fetched. weights_only: plain values and
        # tensors only, never unpickled objects (bench.dr_run_dir may name a run someone else wrote)
        modules = {}
        if "teacher" in checkpoints:
            modules["teacher"] = TeacherClassifier.load_from_checkpoint(
                checkpoints["teacher"], map_location="cpu", pretrained="none", pretrained_path=None,
                weights_only=True)
        if "student" in checkpoints:
            modules["student"] = StudentDistiller.load_from_checkpoint(
                checkpoints["student"], map_location="cpu", pretrained="none", pretrained_path=None,
                teacher_checkpoint=None, weights_only=True)
        source = f"trained: {run_dir}"
    else:
        teacher_size = OmegaConf.select(cfg, "distill.teacher_image_size", default=None)
        datamodule = _ready_datamodule(cfg.data)
        distill = {k: v for k, v in OmegaConf.to_container(cfg.distill, resolve=True).items()
                   if k not in NOT_STUDENT_ARGUMENTS}
        modules = {
            "teacher": instantiate(cfg.model.teacher, pretrained="none", pretrained_path=None),
            "student": instantiate(cfg.model.student, pretrained="none", pretrained_path=None,
                                   topo_features=datamodule.topology_dim, teacher_checkpoint=None, **distill),
        }
        source = "FRESH untrained network (no complete dr-distill run): quality is meaningless"
    test_path = datamodule.datasets["test"].paths[0]
    image, topo = datamodule.inference_inputs(test_path, with_topology=True)
    # a teacher trained at its own resolution is timed, scored and calibrated on the same images at that size
    teacher_data = None if teacher_size is None else datamodule.with_image_size(int(teacher_size))
    models = []
    for name, module in modules.items():
        net = module.net.eval().to(memory_format=torch.contiguous_format)
        names = network_input_names(net)
        inputs = (image, topo)[:len(names)]
        own_data = teacher_data if name == "teacher" and teacher_data is not datamodule else None
        if own_data is not None:
            inputs = own_data.inference_inputs(test_path)[:len(names)]
        hparams = dict(module.hparams)
        if name == "student":
            keys = ("backbone", "num_classes", "topo_features", "topo_hidden", "topo_embedding", "cbam_rd_ratio",
                    "head_dropout")
            architecture = {"kind": "dr_student", "kwargs": {k: hparams[k] for k in keys if k in hparams}}
        else:
            architecture = {"kind": "timm", "backbone": hparams.get("backbone"),
                            "num_classes": hparams.get("num_classes")}
        models.append(BenchModel(name, net, names, inputs, architecture) if own_data is None else BenchModel(
            name, net, names, inputs, architecture, eval_batches=list(own_data.test_dataloader()),
            calibration_batches=_take_images(own_data.calibration_dataloader(), int(cfg.bench.calibration_images))))
    if not models:
        raise ValueError(f"{run_dir} holds neither a finished teacher nor a finished student")
    return Pipeline(
        key="dr", task=GRADING, source=source, reference=models[0].name, models=models,
        eval_batches=list(datamodule.test_dataloader()),
        calibration_batches=_take_images(datamodule.calibration_dataloader(), int(cfg.bench.calibration_images)),
        target_key="label", dynamic_spatial=False, fingerprint=datamodule.fingerprint,
        synthetic=datamodule.is_synthetic, run_dir=run_dir, parent_run_id=state.get("parent_run_id"),
        datamodule=datamodule,
    )


def _disc_clinic_rows(cfg: DictConfig, pipeline: Pipeline, threads: int) -> list[dict[str, Any]]:
    """The clinic's whole path for one test photograph through each measured stage's deployment bundle: decode,
    check, preprocess, the network (twice with coarse-to-fine: the whole photograph, then the crop around the
    disc it found) and the mask pasted back at the photograph's size; fp32 and, where the bundle has one, int8,
    on ONNX Runtime and, where the bundle has its IR, OpenVINO."""
    if pipeline.run_dir is None:
        return []
    test_paths = list(pipeline.datamodule.datasets["test"].paths)
    path = test_paths[0]
    runs, rows = int(cfg.bench.pipeline_runs), []
    for model in pipeline.models:
        folder = pipeline.run_dir / model.name / "deploy"
        if not (folder / "bundle.json").is_file():
            continue
        bundle = load_bundle(folder)
        passes = "two passes" if coarse_to_fine_from_spec(bundle.preprocessing).enabled else "one pass"
        for runtime, precision in itertools.product(RUNTIMES, PRECISIONS):
            try:
                predictor = Predictor(bundle, precision, threads, runtime)
            except BundleError:
                continue  # a bundle written before it held OpenVINO IR
            if predictor.precision != precision:
                continue  # no int8 model in this bundle
            latency = measure_latency(lambda predictor=predictor: predictor.predict_file(path), runs=runs, warmup=2)
            rows.append({"model": f"full pipeline ({model.name}, {passes})",
                         "backend": f"{CLINIC_BACKEND_PREFIX[runtime]}_{precision}",
                         "executed_precision": predictor.executed_precision or precision,
                         "latency_ms_median": latency.median_ms, "latency_ms_min": latency.min_ms,
                         "latency_ms_max": latency.max_ms, "runs": latency.runs, "threads": threads, "error": "",
                         **_clinic_dice(predictor, test_paths, pipeline.sources)})
    return rows


def _clinic_dice(predictor: Predictor, paths: list[str], sources: list[SourceMask] | None) -> dict[str, Any]:
    """Pooled Dice at the photographs' size of the masks ``make predict`` draws (both passes included) over the
    test split: the quality of what the clinic gets, which the per-backend rows measure on the network alone."""
    if not sources:
        return {}
    pairs = ((predictor.predict_file(path).mask, truth) for path, (truth, _) in zip(paths, sources, strict=True))
    return {"quality_metric": "dice", "quality": mask_pair_dice(pairs)["dice"]}


def _dr_clinic_rows(cfg: DictConfig, pipeline: Pipeline, workdir: Path, threads: int) -> list[dict[str, Any]]:
    """The topological features alone and the clinic's whole path for one image file (decode, preprocess,
    topology, student), with the student in fp32 eager and, where it was quantized, ONNX Runtime and OpenVINO
    int8."""
    student = next((m for m in pipeline.models if m.name == "student"), None)
    if student is None:
        return []
    datamodule: DRDataModule = pipeline.datamodule
    path = datamodule.datasets["test"].paths[0]
    uses_topology = len(student.input_names) == 2
    runs, rows = int(cfg.bench.pipeline_runs), []

    def clinic_inputs() -> tuple[Tensor, ...]:
        # decode, preprocess, (topology), normalise: uncached, as for a new patient's photograph
        return datamodule.inference_inputs(path, with_topology=uses_topology)[:len(student.input_names)]

    def add(model: str, backend: str, fn: Callable[[], object]) -> None:
        latency = measure_latency(fn, runs=runs, warmup=2)
        rows.append({"model": model, "backend": backend, "latency_ms_median": latency.median_ms,
                     "latency_ms_min": latency.min_ms, "latency_ms_max": latency.max_ms, "runs": latency.runs,
                     "threads": threads, "error": ""})

    with torch_threads(threads), torch.inference_mode():
        if uses_topology:
            preprocessed = datamodule.preprocessing(read_rgb(path))
            add(f"topological features ({datamodule.topology.resolution} px homology)", "cpu",
                lambda: datamodule.imager.transform([image_diagrams(preprocessed, datamodule.topology)]))
        add("full pipeline (student)", "eager", lambda: student.net(*clinic_inputs()))
        files = artifact_paths(workdir, student.name)
        if files["onnx_int8"].is_file():
            session = ort_session(files["onnx_int8"], threads)
            add("full pipeline (student)", "ort_int8", lambda: session.run(None, {
                name: as_ort_array(value) for name, value in zip(student.input_names, clinic_inputs(), strict=True)}))
        if files["ov_int8"].is_file():
            openvino = OpenVINOSession.open(files["ov_int8"], "fp32", threads)
            add("full pipeline (student)", "ov_int8", lambda: openvino.run(clinic_inputs()))
    return rows


# ------------------------------------------------------------------------------------------- measuring
def measure_pipeline(cfg: DictConfig, pipeline: Pipeline, workdir: Path, threads: int) -> list[dict[str, Any]]:
    """Every model of the pipeline on every configured backend (rows tagged with pipeline and source)."""
    bench = cfg.bench
    rows = []
    for model in pipeline.models:
        log.info("Benchmarking %s / %s (%s)", pipeline.key, model.name, pipeline.source)
        names = model.input_names
        eval_batches = [(tuple(b[n] for n in names), b[pipeline.target_key])
                        for b in model.eval_batches or pipeline.eval_batches]
        calibration = [tuple(b[n] for n in names) for b in model.calibration_batches or pipeline.calibration_batches]
        rows += benchmark_backends(
            model.net, model.latency_inputs, calibration, workdir, int(bench.runs), int(bench.warmup), threads,
            tuple(bench.backends), name=model.name, input_names=names, eval_batches=eval_batches,
            task=pipeline.task, threshold=float(bench.threshold),
            weight_sharing_k=None if bench.weight_sharing_k is None else int(bench.weight_sharing_k),
            architecture=model.architecture, calibration_images=int(bench.calibration_images),
            dynamic_spatial=pipeline.dynamic_spatial, exporter=str(bench.exporter),
            sources=None if model.eval_batches else pipeline.sources,
            single_thread_latency=bool(bench.single_thread_latency),
            throughput_batches=tuple(int(b) for b in bench.throughput_batches),
        )
    if pipeline.key == "dr":
        rows += _dr_clinic_rows(cfg, pipeline, workdir, threads)
    if pipeline.key == "disc":
        rows += _disc_clinic_rows(cfg, pipeline, threads)
    return [{"pipeline": pipeline.key, "source": pipeline.source} | row for row in rows]


def _metric_key(text: str) -> str:
    return "_".join(str(text).split(" (")[0].split())


def pipeline_metrics(table: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics of bench rows: ``bench/<model>/<backend>/<measure>`` and every backend's parity with fp32
    eager, ``quant/<model>/<backend>/dice_delta`` (or ``qwk_delta``) and ``quant/<model>/<backend>/agreement``
    (ONNX Runtime int8's also as ``quant/<model>/dice_delta`` and ``quant/<model>/agreement``)."""
    metrics: dict[str, float] = {}
    for row in table.to_dict("records"):
        prefix = f"bench/{_metric_key(row['model'])}/{row['backend']}"
        for column in ("latency_ms_median", "latency_ms_min", "latency_ms_max", "latency_vs_fp32",
                       "latency_vs_reference", "file_bytes", "quality", "agreement"):
            value = row.get(column)
            if isinstance(value, int | float) and not math.isnan(value):
                metrics[f"{prefix}/{column}"] = float(value)
        if row["backend"] not in ("eager", "cpu") and isinstance(row.get("quality_delta"), float) \
                and not math.isnan(row["quality_delta"]):
            model = _metric_key(row["model"])
            # every runtime x precision's parity; ort_int8's also under the names earlier runs used
            names = [f"quant/{model}/{row['backend']}"] + ([f"quant/{model}"] if row["backend"] == "ort_int8" else [])
            for name in names:
                metrics[f"{name}/{row['quality_metric']}_delta"] = row["quality_delta"]
                metrics[f"{name}/agreement"] = float(row["agreement"])
    return metrics


def _log_to_pipeline_run(ctx: RunContext, pipeline: Pipeline, table: pd.DataFrame, params: dict[str, str],
                         files: list[Path]) -> str | None:
    """A ``bench`` child run under the pipeline's parent run (the same tags RunTracker gives its children)."""
    if pipeline.parent_run_id is None:
        return None
    client = ctx.tracker.client
    try:
        parent = client.get_run(pipeline.parent_run_id)
    except MlflowException as error:
        log.warning("The parent run %s of %s is not in the MLflow store %s (%s): its bench results are logged "
                    "to the bench run only", pipeline.parent_run_id, pipeline.run_dir, ctx.tracker.tracking_uri,
                    str(error).splitlines()[0])
        return None
    child = client.create_run(parent.info.experiment_id, tags={
        MLFLOW_RUN_NAME: "bench", MLFLOW_PARENT_RUN_ID: pipeline.parent_run_id, "bench_run_dir": str(ctx.run_dir)})
    run_id = child.info.run_id
    ctx.tracker.log_context(run_id, params, [])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="bench")
    ctx.tracker.log_metrics(run_id, pipeline_metrics(table[table["pipeline"] == pipeline.key]))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def find_pipelines(cfg: DictConfig) -> list[Pipeline]:
    """The pipelines to measure, their models loaded and their data set up (bad run directories fail here)."""
    bench, output_root = cfg.bench, cfg.paths.output_root
    dr_setting = bench.run_dir if bench.get("run_dir") else bench.dr_run_dir
    dr_mode, dr_dir = resolve_run_dir(dr_setting, DR_TASK, output_root, "bench.dr_run_dir")
    disc_mode, disc_dir = resolve_run_dir(bench.chain_run_dir, CHAIN_TASK, output_root, "bench.chain_run_dir")
    if dr_mode == disc_mode == "skip":
        raise ValueError("bench.dr_run_dir and bench.chain_run_dir are both null: nothing to measure")
    for task, mode in ((CHAIN_TASK, disc_mode), (DR_TASK, dr_mode)):
        if mode == "fresh":
            log.warning("No complete %s run under %s/%s/runs: measuring FRESHLY BUILT, UNTRAINED networks on "
                        "synthetic data. Latency and size are real; the quality numbers are of untrained nets.",
                        task, output_root, task)
    pipelines = []
    if disc_mode != "skip":
        pipelines.append(_disc_pipeline(cfg, disc_mode, disc_dir))
    if dr_mode != "skip":
        pipelines.append(dr_pipeline(cfg, dr_mode, dr_dir))
    return pipelines


def _write_outputs(run_dir: Path, table: pd.DataFrame, markdown: str) -> list[Path]:
    csv_path, md_path = run_dir / "bench.csv", run_dir / "bench.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown)
    return [csv_path, md_path, pareto_plot(table, run_dir / "pareto.png")]


def run_bench(cfg: DictConfig) -> pd.DataFrame:
    """Find the models, measure them, write and log bench.csv / bench.md / pareto.png; returns the table."""
    torch.manual_seed(int(cfg.seed))
    bench = cfg.bench
    pipelines = find_pipelines(cfg)  # before any MLflow run is opened
    ctx = create_context(cfg)
    threads = default_threads() if bench.threads is None else int(bench.threads)
    cpu = cpu_description() | {"torch_threads": threads}
    busy = contention_warning(threads, cpu["load_average_1min"], int(cpu["usable_cores"]))
    if busy:
        log.warning("Before measuring: %s", busy)
    tags = standard_tags(ctx.project_root, ctx.overrides, " ".join(f"{p.key}:{p.fingerprint}" for p in pipelines),
                         any(p.synthetic for p in pipelines))
    parent = ctx.tracker.start_parent(tags | {f"{p.key}_source": p.source[:250] for p in pipelines})
    params = {f"cpu.{key}": str(value) for key, value in cpu.items()} | {"bench.threads": str(threads)}
    ctx.tracker.log_context(parent, params, [save_resolved_config(cfg, ctx.run_dir / "config.yaml")])
    with finishing(ctx):
        workdir = ctx.run_dir / "models"
        rows = []
        for pipeline in pipelines:
            rows += measure_pipeline(cfg, pipeline, workdir / pipeline.key, threads)
        table = add_ratios(pd.DataFrame(rows), {p.key: p.reference for p in pipelines})
        table = table[LEADING_COLUMNS + [c for c in table.columns if c not in LEADING_COLUMNS]]
        targets = check_targets(table, **OmegaConf.to_container(bench.targets, resolve=True))
        markdown = markdown_report(table, targets, cpu, threads, int(bench.runs), int(bench.warmup))
        files = _write_outputs(ctx.run_dir, table, markdown)
        for path in files:
            ctx.tracker.client.log_artifact(parent, str(path), artifact_path="bench")
        target_metrics = {f"target/{t['key']}": t["measured"] for t in targets if not math.isnan(t["measured"])}
        target_metrics |= {f"target/{t['key']}/met": float(t["met"]) for t in targets}
        ctx.tracker.log_metrics(parent, pipeline_metrics(table) | target_metrics)
        for pipeline in pipelines:
            _log_to_pipeline_run(ctx, pipeline, table, params, files)
        if not bench.keep_files:
            shutil.rmtree(workdir, ignore_errors=True)  # the ONNX and packed files: their sizes are in the table
    print(f"\n{markdown}\n({files[1]})")
    return table


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    quiet_onnx_tool_logs()
    run_bench(cfg)


if __name__ == "__main__":
    main()
