"""One network on every CPU inference backend: latency, file sizes and quality, measured side by side.

``benchmark_backends`` takes a trained network and returns one row per backend:

* ``eager``: PyTorch fp32, NCHW, ``torch.inference_mode``: the reference every other row is compared with;
* ``channels_last``: the same fp32 network and inputs in channels-last memory format (oneDNN's native layout);
* ``bf16``: ``compression.quantization.bf16_module`` (BatchNorm folded, bf16 weights, channels-last);
* ``ort_fp32``: the network exported to ONNX, run by ONNX Runtime;
* ``ort_int8``: that ONNX file statically quantized to int8 by ONNX Runtime (QDQ, per-channel weights,
  ``compression.quantization.quantize_onnx_static``), calibrated on training images;
* ``ov_fp32`` / ``ov_bf16``: the same ONNX file run by OpenVINO's CPU plugin with its float part in fp32 or
  bf16 (``compression.openvino_runtime``; OpenVINO's own default on a bf16 CPU is bf16, so the hint is always
  explicit);
* ``ov_int8``: that ONNX file quantized by NNCF for OpenVINO (``quantize_openvino``), calibrated on the same
  images as ``ort_int8``, saved as IR and run with its float remainder in fp32;
* ``weight_shared``: k-means weight sharing without fine-tuning (``share_weights`` on a copy) saved in the
  packed format (``save_shared``, zlib): its file size and the quality of the shared network. It is not
  timed: ``load_shared`` decodes the file into a plain fp32 network, which runs exactly as ``eager`` does.

Every row names the precision that really ran (``executed_precision``): for OpenVINO read from the compiled
graph, whose convolutions may run in another precision than asked (bf16 asked on a CPU without it runs fp32).

Every backend runs in one process, one after the other, at batch 1, with the same number of threads
(``torch.set_num_threads``, ONNX Runtime's intra-op threads, OpenVINO's inference threads), restored
afterwards. Quality is measured on
(inputs, target) batches: pooled and per-image Dice at probability 0.5 for segmentation, quadratic-weighted
kappa (QWK) for grading, and for both the agreement of each backend with fp32 eager (Dice of the masks,
top-1 agreement of the grades).

``add_ratios``, ``check_targets``, ``pareto_plot`` and ``markdown_report`` turn the rows of several networks
into the tables and figure of ``make bench`` (``experiments/bench.py``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor, nn

from compression.export import Exporter, as_ort_array, export_onnx, ort_session
from compression.openvino_runtime import (
    OpenVINOSession,
    cpu_capabilities,
    openvino_version,
    quantize_openvino,
)
from compression.packed_format import save_shared
from compression.quantization import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_MASK_DICE,
    bf16_module,
    calibration_feeds,
    check_quantizable,
    quadratic_weighted_kappa,
    quantize_onnx_static,
)
from compression.weight_sharing import share_weights
from datamodules.fundus import SquareCrop, mask_on_source
from lightning_modules.profiling import count_macs, count_parameters, measure_latency, state_dict_size_bytes
from lightning_modules.seg_metrics import binarize, overlap_scores

log = logging.getLogger(__name__)

BACKENDS = ("eager", "channels_last", "bf16", "ort_fp32", "ort_int8", "ov_fp32", "ov_bf16", "ov_int8")
#: the backends that need calibration images
INT8_BACKENDS = ("ort_int8", "ov_int8")
WEIGHT_SHARED = "weight_shared"
#: what each PyTorch / ONNX Runtime row runs in (ONNX Runtime fuses the QDQ file's convolutions into int8
#: QLinearConv; OpenVINO's rows read theirs from the compiled graph)
_STATED_PRECISION = {"eager": "fp32", "channels_last": "fp32", "bf16": "bf16", "ort_fp32": "fp32",
                     "ort_int8": "int8", WEIGHT_SHARED: "fp32"}
SEGMENTATION, GRADING = "segmentation", "grading"
TASKS = (SEGMENTATION, GRADING)
#: the headline quality of each task (the ``quality`` column)
QUALITY_METRIC = {SEGMENTATION: "dice", GRADING: "qwk"}
#: CPU features that decide which int8 / bf16 kernels oneDNN and ONNX Runtime can use
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
#: the uncompressed model of each pipeline, which ``latency_vs_reference`` divides by
DEFAULT_REFERENCES = {"disc": "base-64", "dr": "teacher"}
PACKED_SUFFIX = ".rcws"

#: (forward inputs, target): a batch of images (and features) with their masks or grades
EvalBatch = tuple[tuple[Tensor, ...], Tensor]
#: a segmentation evaluation image's original mask (H0, W0) and the box its network input was cut from
SourceMask = tuple[np.ndarray, SquareCrop]


# ------------------------------------------------------------------------------------------ the machine
def cpu_description(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU the numbers were measured on: model name, cores, the int8/bf16-relevant flags present and
    absent (``CPU_FLAGS``), PyTorch's thread count and ISA level, and the runtime versions."""
    path = Path(cpuinfo)
    text = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator and key.strip() not in fields:  # the first processor's entry; the others repeat it
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    known = "flags" in fields
    return {
        "cpu_model": fields.get("model name") or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags_present": " ".join(flag for flag in CPU_FLAGS if flag in flags) if known else "unknown",
        "flags_absent": " ".join(flag for flag in CPU_FLAGS if flag not in flags) if known else "unknown",
        "flags_source": str(path) if known else f"{path} unreadable",
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "openvino": openvino_version(),
        # what OpenVINO's CPU plugin can run here (BF16: its default float precision is bf16)
        "openvino_capabilities": " ".join(cpu_capabilities()),
    }


def contention_warning(threads: int, load_average: float, cores: int) -> str | None:
    """A warning when other processes keep the CPU busy (1-minute ``load_average`` of the machine, this
    process's own share of at most 1 allowed), else None.

    Measured on this 2-core machine beside a 2-thread training job: EfficientNet-Lite0 eager at 192 px took
    26 ms on 1 thread and 2126 ms on 2 (min 78 ms): PyTorch's OpenMP threads wait at every parallel region
    for a peer the scheduler has taken off the CPU. ONNX Runtime's own thread pool suffered far less, so
    such a run even distorts the comparison between backends.
    """
    if load_average <= cores - threads + 1:
        return None
    return (f"the CPU is busy (1-minute load average {load_average:.2f} on {cores} cores) and the benchmark "
            f"uses {threads} threads: latencies will be slower and noisier than on an idle machine, PyTorch's "
            "multi-threaded ones by far the most (OpenMP threads wait for descheduled peers). Rerun on an idle "
            "machine, or with bench.threads=1 for numbers that are at least comparable between backends")


def default_threads() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` inside the block and restored after it."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- quality
def segmentation_quality(logits: Tensor, masks: Tensor, reference_logits: Tensor | None = None,
                         threshold: float = 0.5, sources: Sequence[SourceMask] | None = None) -> dict[str, float]:
    """Dice of (B, 1, H, W) ``logits`` at probability ``threshold`` against 0/1 ``masks``.

    ``dice``: pooled over every pixel of every image; ``dice_per_image``: the mean of the images' Dice (the
    suite's empty-mask conventions, ``lightning_modules.seg_metrics``); with ``reference_logits`` (the fp32
    eager model's) also ``agreement``: the pooled Dice of these masks against the reference's masks (at the
    network's resolution). With ``sources`` (one ``(original mask, crop box)`` per image, in order) ``dice`` and
    ``dice_per_image`` are scored at each photograph's own size (``datamodules.fundus.mask_on_source``), as the
    training run's ``test/*`` are, and the network-resolution scores become ``dice_net`` / ``dice_per_image_net``.
    """
    predicted = binarize(logits.float(), threshold).reshape(len(logits), -1)
    target = (masks.reshape(len(masks), -1) > 0.5)
    if predicted.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} hold different numbers "
                         "of pixels: score the masks at the resolution the model predicts")
    results = _dice_scores(predicted, target)
    if sources is not None:
        results = {f"{name}_net": value for name, value in results.items()} | _source_dice_scores(
            logits, sources, threshold)
    if reference_logits is not None:
        reference = binarize(reference_logits.float(), threshold).reshape(len(reference_logits), -1)
        results["agreement"] = _dice_scores(predicted, reference)["dice"]
    return results


def _source_dice_scores(logits: Tensor, sources: Sequence[SourceMask], threshold: float) -> dict[str, float]:
    if len(sources) != len(logits):
        raise ValueError(f"{len(sources)} source masks for {len(logits)} predictions")
    probabilities = torch.sigmoid(logits.float())[:, 0].numpy()
    return mask_pair_dice((mask_on_source(probability, crop, threshold), mask)
                          for probability, (mask, crop) in zip(probabilities, sources, strict=True))


def mask_pair_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``dice`` (pooled over every pixel) and ``dice_per_image`` (the mean of the images' Dice) of (predicted,
    reference) masks of any sizes, nonzero = disc, with the suite's empty-mask conventions."""
    counts = []
    for predicted, reference in pairs:
        predicted, target = np.asarray(predicted) > 0, np.asarray(reference) > 0
        counts.append([(predicted & target).sum(), (predicted & ~target).sum(), (~predicted & target).sum(),
                       (~predicted & ~target).sum()])
    tp, fp, fn, tn = torch.tensor(counts, dtype=torch.int64).T
    return {"dice": float(overlap_scores(tp.sum(), fp.sum(), fn.sum(), tn.sum())["dice"]),
            "dice_per_image": float(overlap_scores(tp, fp, fn, tn)["dice"].mean())}


def _dice_scores(predicted: Tensor, target: Tensor) -> dict[str, float]:
    tp = (predicted & target).sum(1)
    fp = (predicted & ~target).sum(1)
    fn = (~predicted & target).sum(1)
    tn = (~predicted & ~target).sum(1)
    per_image = overlap_scores(tp, fp, fn, tn)["dice"]
    pooled = overlap_scores(tp.sum(), fp.sum(), fn.sum(), tn.sum())["dice"]
    return {"dice": float(pooled), "dice_per_image": float(per_image.mean())}


def grading_quality(logits: Tensor, labels: Tensor, reference_logits: Tensor | None = None) -> dict[str, float]:
    """QWK (``compression.quantization.quadratic_weighted_kappa``) of the top-1 grades of (B, C) ``logits``;
    with ``reference_logits`` also ``agreement``: the fraction of images given the reference's grade."""
    predicted = logits.argmax(1).cpu().numpy()
    truth = labels.reshape(-1).cpu().numpy()
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    results = {"qwk": quadratic_weighted_kappa(labels.reshape(-1), logits.argmax(1), logits.shape[1])}
    if reference_logits is not None:
        results["agreement"] = float(np.mean(predicted == reference_logits.argmax(1).cpu().numpy()))
    return results


def task_quality(task: str, outputs: Tensor, targets: Tensor, reference_outputs: Tensor | None = None,
                 threshold: float = 0.5, sources: Sequence[SourceMask] | None = None) -> dict[str, float]:
    """:func:`segmentation_quality` or :func:`grading_quality`, plus ``quality``: the task's headline metric."""
    if task == SEGMENTATION:
        results = segmentation_quality(outputs, targets, reference_outputs, threshold, sources)
    elif task == GRADING:
        results = grading_quality(outputs, targets, reference_outputs)
    else:
        raise ValueError(f"task={task!r}: choose one of {TASKS}")
    return results | {"quality": results[QUALITY_METRIC[task]]}


def predict_all(predict: Callable[[tuple[Tensor, ...]], Tensor], batches: Iterable[EvalBatch]
                ) -> tuple[Tensor, Tensor]:
    """(outputs, targets) of ``predict`` over every batch, concatenated, as float32 / as given on the CPU."""
    outputs, targets = [], []
    with torch.inference_mode():
        for inputs, target in batches:
            outputs.append(predict(tuple(inputs)).float().cpu())
            targets.append(target.cpu())
    if not outputs:
        raise ValueError("quality needs at least one evaluation batch: the evaluation split is empty")
    return torch.cat(outputs), torch.cat(targets)


# --------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class _Runner:
    """How one backend runs: ``prepare`` turns forward inputs into its own form once (outside the timing),
    ``call`` runs it and returns the first output as a float32 tensor."""

    prepare: Callable[[tuple[Tensor, ...]], Any]
    call: Callable[[Any], Tensor]
    file_bytes: float

    def predict(self, inputs: tuple[Tensor, ...]) -> Tensor:
        return self.call(self.prepare(inputs))


def _channels_last(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t for t in inputs)


def _torch_runner(net: nn.Module, file_bytes: float, prepare=lambda inputs: inputs) -> _Runner:
    def call(inputs: tuple[Tensor, ...]) -> Tensor:
        output = net(*inputs)
        return output if isinstance(output, Tensor) else output[0]

    return _Runner(prepare, call, float(file_bytes))


def _ort_runner(path: Path, input_names: Sequence[str], threads: int) -> _Runner:
    session = ort_session(path, threads)
    declared = [node.name for node in session.get_inputs()]
    if sorted(declared) != sorted(input_names):
        raise ValueError(f"{str(path)!r} takes inputs {declared}, the benchmark feeds {list(input_names)}")

    def prepare(inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
        return {name: as_ort_array(value) for name, value in zip(input_names, inputs, strict=True)}

    return _Runner(prepare, lambda feed: torch.from_numpy(session.run(None, feed)[0]), float(path.stat().st_size))


def _openvino_runner(session: OpenVINOSession, file_bytes: float) -> _Runner:
    def prepare(inputs: tuple[Tensor, ...]) -> list[np.ndarray]:
        return [as_ort_array(value) for value in inputs]

    return _Runner(prepare, lambda arrays: torch.from_numpy(session.run(arrays)[0]), float(file_bytes))


def artifact_paths(workdir: str | os.PathLike, name: str, k: int = 16) -> dict[str, Path]:
    """Where :func:`benchmark_backends` writes a model's files: ``onnx_fp32``, ``onnx_int8``, ``ov_int8`` (IR
    ``.xml``, its weights in the ``.bin`` beside it), ``shared``."""
    workdir = Path(workdir)
    return {"onnx_fp32": workdir / f"{name}_fp32.onnx", "onnx_int8": workdir / f"{name}_int8.onnx",
            "ov_int8": workdir / f"{name}_ov_int8.xml", "shared": workdir / f"{name}_shared_k{k}{PACKED_SUFFIX}"}


def _ir_bytes(xml_path: Path) -> float:
    return float(xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size)


def benchmark_backends(
    net: nn.Module,
    example_inputs: tuple[Tensor, ...],
    calibration_batches: Iterable[Tensor | Sequence[Tensor]],
    workdir: str | os.PathLike,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    backends: Sequence[str] = BACKENDS,
    *,
    name: str = "model",
    input_names: Sequence[str] = ("image",),
    eval_batches: Iterable[EvalBatch] | None = None,
    task: str | None = None,
    threshold: float = 0.5,
    weight_sharing_k: int | None = 16,
    architecture: Mapping[str, Any] | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    dynamic_spatial: bool = False,
    exporter: Exporter = "auto",
    sources: Sequence[SourceMask] | None = None,
    single_thread_latency: bool = False,
    throughput_batches: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Latency, sizes and quality of ``net`` on every backend of ``backends`` (see the module docstring),
    plus a ``weight_shared`` row unless ``weight_sharing_k`` is None.

    Args:
        net: the trained network (left untouched: every backend works on a copy or an export).
        example_inputs: the batch-1 forward inputs the latency is measured on (e.g. a 256x256 image).
        calibration_batches: training inputs for int8 (tensors, or tuples in ``input_names`` order); at most
            ``calibration_images`` images are used.
        workdir: where the ONNX and packed files are written (``artifact_paths``).
        runs, warmup: timed calls (the median, min and max are reported) after untimed ones.
        threads: PyTorch, ONNX Runtime and OpenVINO threads for every backend; default every usable core.
        backends: a subset of ``BACKENDS`` to report; ``eager`` is measured first in any case (it is the
            reference of the quality deltas and agreements).
        name: the model's name in the rows and file names.
        input_names: one name per forward argument, e.g. ``("image", "topo")`` for the DR student.
        eval_batches: (inputs, target) batches for quality, iterated once per backend (a list or a
            DataLoader-backed iterable, not a one-shot generator); None skips quality.
        task: ``"segmentation"`` (masks) or ``"grading"`` (class labels); needed with ``eval_batches``.
        threshold: the probability above which a pixel is foreground.
        weight_sharing_k: clusters per layer of the weight-shared row; None leaves the row out.
        architecture: the ``architecture`` entry of the packed file (``save_shared``); default
            ``{"kind": <class name>}``, enough to measure the size (``load_shared`` needs a builder for it).
        calibration_images: the number of calibration images for int8.
        dynamic_spatial: export with symbolic height and width (``export_onnx``), for quality measured at
            another image size than the latency.
        sources: segmentation: each evaluation image's original mask and crop box, in ``eval_batches`` order;
            the Dice is then scored at the photographs' own size (:func:`segmentation_quality`).
        exporter: the ONNX exporter (``export_onnx``).
        single_thread_latency: also time every backend at batch 1 on one thread (``latency_ms_1_thread``):
            what a clinic PC busy with other work gets.
        throughput_batches: batch sizes to time each backend at (``threads`` threads); the one giving the
            most images per second is reported (``throughput_batch``, ``throughput_images_per_s``): a clinic
            grades a day's folder at once.

    Returns:
        One dict per backend: ``model``, ``backend``, ``executed_precision``, ``params``, ``macs`` (at
        ``example_inputs``), ``input_shape``, ``state_dict_bytes``, ``onnx_fp32_bytes``, ``onnx_int8_bytes``,
        ``ov_int8_bytes``, ``shared_bytes``,
        ``file_bytes`` (the file this backend deploys), ``latency_ms_median`` / ``_min`` / ``_max``, ``runs``,
        ``threads``, with ``single_thread_latency`` / ``throughput_batches`` also ``latency_ms_1_thread`` /
        ``throughput_batch`` and ``throughput_images_per_s``, quality (``quality``, ``quality_delta`` =
        quality - eager's, ``agreement``, and ``dice``,
        ``dice_per_image`` or ``qwk``) and ``error`` (empty unless this backend failed: a model type int8
        cannot quantize, a failed export; the other backends still run).

    Raises:
        ValueError: bad arguments, or an int8 backend (``ort_int8``, ``ov_int8``) with zero calibration images.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backends {unknown}: choose from {BACKENDS}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in throughput_batches):
        raise ValueError(f"throughput_batches={list(throughput_batches)}: batch sizes must be ints >= 1")
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(example_inputs)} example inputs but input_names {list(input_names)}: give one "
                         "name per forward argument")
    if eval_batches is not None and task not in TASKS:
        raise ValueError(f"task={task!r}: quality on eval_batches needs task 'segmentation' or 'grading'")
    threads = default_threads() if threads is None else int(threads)
    paths = artifact_paths(workdir, name, weight_sharing_k or 16)
    feeds: list[dict[str, np.ndarray]] = []
    if set(INT8_BACKENDS) & set(backends):
        feeds = calibration_feeds(calibration_batches, input_names, calibration_images)
        if not feeds:
            raise ValueError(f"calibration with zero images for {name!r}: int8 needs training images to set "
                             "the activation ranges; check that the calibration split is not empty "
                             f"(bench.calibration_images={calibration_images})")
    net = copy.deepcopy(net).cpu().eval()
    inputs = tuple(t.detach().cpu().contiguous() for t in example_inputs)
    common = {"model": name, "params": count_parameters(net), "macs": count_macs(net, inputs),
              "input_shape": " ".join("x".join(map(str, t.shape)) for t in inputs),
              "state_dict_bytes": state_dict_size_bytes(net), "threads": threads,
              "quality_metric": QUALITY_METRIC[task] if eval_batches is not None else ""}

    written: dict[str, Path] = {}  # the files this call wrote (never a stale file left in workdir)
    executed = dict(_STATED_PRECISION)  # OpenVINO's rows add what their compiled graphs run in

    def export() -> Path:
        if "onnx_fp32" not in written:
            written["onnx_fp32"] = export_onnx(net, inputs, paths["onnx_fp32"], input_names, exporter=exporter,
                                               dynamic_spatial=dynamic_spatial)
        return written["onnx_fp32"]

    def build(backend: str, threads: int = threads) -> _Runner:
        """The backend's runner on ``threads`` threads (ONNX Runtime's and OpenVINO's own; PyTorch's are set
        around the timing); files already written for it are reused."""
        if backend == "eager":
            return _torch_runner(net, common["state_dict_bytes"])
        if backend == "channels_last":
            return _torch_runner(copy.deepcopy(net).to(memory_format=torch.channels_last),
                                 common["state_dict_bytes"], _channels_last)
        if backend == "bf16":
            converted = bf16_module(net)
            return _torch_runner(converted, state_dict_size_bytes(converted.model))
        if backend == "ort_fp32":
            return _ort_runner(export(), input_names, threads)
        if backend in ("ov_fp32", "ov_bf16"):
            session = OpenVINOSession.open(export(), backend.removeprefix("ov_"), threads)
            executed[backend] = session.executed
            return _openvino_runner(session, export().stat().st_size)
        check_quantizable(net)  # int8: a model int8 cannot quantize fails here, with the reason
        if backend == "ort_int8":
            if "onnx_int8" not in written:
                written["onnx_int8"] = quantize_onnx_static(export(), paths["onnx_int8"], feeds)
            return _ort_runner(written["onnx_int8"], input_names, threads)
        if "ov_int8" not in written:
            written["ov_int8"], _ = quantize_openvino(export(), feeds, paths["ov_int8"])
        session = OpenVINOSession.open(written["ov_int8"], "fp32", threads)
        executed[backend] = session.executed
        return _openvino_runner(session, _ir_bytes(written["ov_int8"]))

    rows: list[dict[str, Any]] = []
    reference: Tensor | None = None
    eager_quality = math.nan
    ordered = ["eager", *[b for b in backends if b != "eager"]]
    with torch_threads(threads):
        for backend in ordered:
            row: dict[str, Any] = {"backend": backend, "error": ""}
            try:
                runner = build(backend)
                prepared = runner.prepare(inputs)
                with torch.inference_mode():
                    latency = measure_latency(lambda runner=runner, prepared=prepared: runner.call(prepared),
                                              runs=runs, warmup=warmup)
                row |= {"executed_precision": executed.get(backend, ""),
                        "file_bytes": runner.file_bytes, "latency_ms_median": latency.median_ms,
                        "latency_ms_min": latency.min_ms, "latency_ms_max": latency.max_ms, "runs": latency.runs}
                if single_thread_latency:
                    row["latency_ms_1_thread"] = _latency_ms(build(backend, 1), inputs, 1, runs, warmup)
                if throughput_batches:
                    row |= _best_throughput(runner, inputs, throughput_batches, threads, runs)
                if eval_batches is not None:
                    outputs, targets = predict_all(runner.predict, eval_batches)
                    row |= task_quality(task, outputs, targets, outputs if reference is None else reference,
                                        threshold, sources)
                    if backend == "eager":
                        reference, eager_quality = outputs, row["quality"]
                    row["quality_delta"] = row["quality"] - eager_quality
            except Exception as error:
                if backend == "eager":
                    raise  # the reference: without it no row means anything
                # one backend's failure (an unsupported layer, a failed export) must not lose the others
                row["error"] = _describe(error)
                log.warning("%s on %s failed: %s", name, backend, row["error"])
            if backend in backends:
                rows.append(common | row)
        if weight_sharing_k is not None:
            shared_row = _weight_shared_row(net, paths["shared"], weight_sharing_k, architecture, eval_batches,
                                            task, threshold, reference, eager_quality, sources)
            rows.append(common | shared_row)
            if not shared_row["error"]:
                written["shared"] = paths["shared"]
    sizes = {f"{kind}_bytes": float(written[kind].stat().st_size) if kind in written else math.nan
             for kind in ("onnx_fp32", "onnx_int8", "shared")}
    sizes["ov_int8_bytes"] = _ir_bytes(written["ov_int8"]) if "ov_int8" in written else math.nan
    return [row | sizes for row in rows]


def _latency_ms(runner: _Runner, inputs: tuple[Tensor, ...], threads: int, runs: int, warmup: int) -> float:
    """Median ms of ``runner`` on ``inputs`` with PyTorch on ``threads`` threads."""
    prepared = runner.prepare(inputs)
    with torch_threads(threads), torch.inference_mode():
        return measure_latency(lambda: runner.call(prepared), runs=runs, warmup=warmup).median_ms


def _best_throughput(runner: _Runner, inputs: tuple[Tensor, ...], batches: Sequence[int], threads: int,
                     runs: int) -> dict[str, float]:
    """The batch size of ``batches`` at which ``runner`` gets through the most images per second, and that rate
    (each batch size timed over about ``runs`` images, at least 3 calls, after one untimed call)."""
    rates = {}
    for batch in batches:
        batched = tuple(t.expand(batch, *t.shape[1:]).contiguous() for t in inputs)
        milliseconds = _latency_ms(runner, batched, threads, max(3, runs // batch), warmup=1)
        rates[batch] = batch / (milliseconds / 1e3)
    best = max(rates, key=rates.get)
    return {"throughput_batch": float(best), "throughput_images_per_s": rates[best]}


def _weight_shared_row(net: nn.Module, path: Path, k: int, architecture: Mapping[str, Any] | None,
                       eval_batches: Iterable[EvalBatch] | None, task: str | None, threshold: float,
                       reference: Tensor | None, eager_quality: float,
                       sources: Sequence[SourceMask] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"backend": WEIGHT_SHARED, "error": "", "executed_precision": _STATED_PRECISION[WEIGHT_SHARED]}
    try:
        shared = copy.deepcopy(net)  # sharing parametrizes the layers in place
        share_weights(shared, k=k)
        # zlib: as small as lzma for these networks and 10x faster (compression.packed_format)
        save_shared(shared, path, dict(architecture or {"kind": type(net).__name__}), compression="zlib")
        row["file_bytes"] = float(path.stat().st_size)
        if eval_batches is not None:
            runner = _torch_runner(shared.eval(), row["file_bytes"])
            outputs, targets = predict_all(runner.predict, eval_batches)
            row |= task_quality(task, outputs, targets, reference, threshold, sources)
            row["quality_delta"] = row["quality"] - eager_quality
    except Exception as error:  # e.g. a network without a layer worth sharing
        row["error"] = _describe(error)
        log.warning("weight sharing of %s failed: %s", type(net).__name__, row["error"])
    return row


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]


# ------------------------------------------------------------------------------------------ the table
def add_ratios(table: pd.DataFrame, references: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A copy of ``table`` (columns ``pipeline``, ``model``, ``backend``, ``latency_ms_median``) with

    * ``latency_vs_fp32``: each latency over the eager fp32 latency of the same model in the same pipeline;
    * ``latency_vs_reference``: over the eager fp32 latency of the pipeline's uncompressed reference model,
      ``references[pipeline]`` (default ``DEFAULT_REFERENCES``: base-64 for the disc, the teacher for DR).

    Ratios whose denominator was not measured are NaN.
    """
    references = DEFAULT_REFERENCES if references is None else references
    table = table.copy()
    eager = table[table["backend"] == "eager"].set_index(["pipeline", "model"])["latency_ms_median"]
    own = [eager.get((pipeline, model), math.nan) for pipeline, model in zip(table["pipeline"], table["model"],
                                                                             strict=True)]
    reference = [eager.get((pipeline, references.get(pipeline)), math.nan) for pipeline in table["pipeline"]]
    table["latency_vs_fp32"] = table["latency_ms_median"] / np.asarray(own, dtype=float)
    table["latency_vs_reference"] = table["latency_ms_median"] / np.asarray(reference, dtype=float)
    return table


def _value(table: pd.DataFrame, pipeline: str, model: str, backend: str, column: str) -> float:
    match = table[(table["pipeline"] == pipeline) & (table["model"] == model) & (table["backend"] == backend)]
    if match.empty or column not in match:
        return math.nan
    return float(match[column].iloc[0])


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either was not measured or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def _criterion(key: str, target: str, measured: float, comparison: str, required: float,
               unit: str = "", backend: str = "") -> dict[str, Any]:
    if math.isnan(measured):
        return {"key": key, "target": target, "measured": measured, "required": f"{comparison} {required:.4g}{unit}",
                "met": False, "backend": backend,
                "note": "not measured: a model or backend it needs is missing from this run, failed, or lost "
                        "more quality than its parity limit"}
    met = measured >= required if comparison == ">=" else measured <= required
    gap = abs(measured - required)
    note = (f"met with {gap:.3g}{unit} to spare" if met
            else f"missed by {gap:.3g}{unit} ({measured:.4g}{unit} {'<' if comparison == '>=' else '>'} "
                 f"{required:.4g}{unit})")
    return {"key": key, "target": target, "measured": measured, "required": f"{comparison} {required:.4g}{unit}",
            "met": bool(met), "note": note, "backend": backend}


#: the rows that are a deployment of a model (what a clinic would run), as against the PyTorch fp32 references
DEPLOYED_BACKENDS = ("bf16", "ort_fp32", "ort_int8", "ov_fp32", "ov_bf16", "ov_int8")
#: when a deployed row still gives its fp32 eager's answers: masks with a Dice of at least 0.98 against fp32
#: eager's, grades agreeing on at least 90% of the images (the defaults of the suite's int8 parity checks,
#: compression.quantization.int8_parity_problems), with a QWK loss of at most 0.02 (the DR student's target
#: below). A fast row that changes the answers is no deployment, and never counts for a speed target.
MIN_MASK_AGREEMENT = DEFAULT_MIN_MASK_DICE
MIN_GRADE_AGREEMENT = DEFAULT_MIN_AGREEMENT
MAX_QWK_LOSS = 0.02


def within_parity(row: Mapping[str, Any]) -> bool:
    """Whether a bench row gives its eager fp32's answers within the parity limits (a row without quality
    measured counts: nothing says otherwise)."""
    agreement, delta = row.get("agreement", math.nan), row.get("quality_delta", math.nan)
    measured = [v for v in (agreement, delta) if isinstance(v, float) and not math.isnan(v)]
    if not measured:
        return True
    if row.get("quality_metric") == "dice":
        return not agreement < MIN_MASK_AGREEMENT
    return not (agreement < MIN_GRADE_AGREEMENT or delta < -MAX_QWK_LOSS)


def fastest_deployed(table: pd.DataFrame, pipeline: str, model: str,
                     backends: Sequence[str] = DEPLOYED_BACKENDS) -> tuple[float, str]:
    """(median latency, backend) of ``model``'s fastest row among ``backends`` that is ``within_parity``;
    (NaN, "") when none is."""
    rows = table[(table["pipeline"] == pipeline) & (table["model"] == model) & table["backend"].isin(backends)]
    best = (math.nan, "")
    for row in rows.to_dict("records"):
        latency = float(row.get("latency_ms_median", math.nan))
        failed = isinstance(row.get("error"), str) and bool(row["error"])  # a table read back has NaN, not ""
        if failed or math.isnan(latency) or not within_parity(row):
            continue
        if math.isnan(best[0]) or latency < best[0]:
            best = (latency, str(row["backend"]))
    return best


def check_targets(table: pd.DataFrame, disc_reference: str = "base-64", disc_pruned: str = "prune-16",
                  dr_student: str = "student") -> list[dict[str, Any]]:
    """The benchmark targets, each criterion as ``{key, target, measured, required, met, note, backend}``.

    1. ``disc_reference``'s fastest deployed row (``fastest_deployed``: any runtime and precision whose masks
       are ``within_parity`` of its fp32 eager's) >= 8x faster than its eager fp32;
    2. ``disc_pruned``'s fastest int8 row (ONNX Runtime or OpenVINO) >= 100x faster than ``disc_reference``
       eager fp32, and its Dice within 5% (relative) of the reference's eager Dice;
    3. the weight-shared file of ``disc_reference`` >= 7x smaller than its fp32 state dict, with a Dice loss
       of at most 1 point (0.01);
    4. the DR student's fastest deployed row at most 1/3 of its ONNX Runtime fp32 latency, with a QWK loss
       <= 0.02 against its eager fp32.

    Speed-ups are ratios of median latencies; qualities are the ``quality`` column (Dice, QWK). ``backend``
    names the row a criterion was measured on.
    """
    def value(model: str, backend: str, column: str, pipeline: str = "disc") -> float:
        return _value(table, pipeline, model, backend, column)

    base_eager = value(disc_reference, "eager", "latency_ms_median")
    base_quality = value(disc_reference, "eager", "quality")
    base_deployed, base_backend = fastest_deployed(table, "disc", disc_reference)
    pruned_int8, pruned_backend = fastest_deployed(table, "disc", disc_pruned, INT8_BACKENDS)
    student_deployed, student_backend = fastest_deployed(table, "dr", dr_student)
    return [
        _criterion("disc_deployed_speedup", f"{disc_reference}: fastest deployed row's speed-up over its fp32 eager",
                   _ratio(base_eager, base_deployed), ">=", 8.0, "x", base_backend),
        _criterion("pruned_int8_speedup", f"{disc_pruned} int8: speed-up over {disc_reference} fp32 eager",
                   _ratio(base_eager, pruned_int8), ">=", 100.0, "x", pruned_backend),
        _criterion("pruned_int8_dice_loss", f"{disc_pruned} int8: Dice loss relative to {disc_reference} fp32 eager",
                   _ratio(base_quality - value(disc_pruned, pruned_backend, "quality"), base_quality), "<=", 0.05,
                   backend=pruned_backend),
        _criterion("shared_size_reduction", f"{disc_reference} weight-shared file: size reduction vs the fp32 state dict",
                   _ratio(value(disc_reference, WEIGHT_SHARED, "state_dict_bytes"),
                          value(disc_reference, WEIGHT_SHARED, "file_bytes")), ">=", 7.0, "x", WEIGHT_SHARED),
        _criterion("shared_dice_loss", f"{disc_reference} weight-shared: Dice loss vs fp32 eager",
                   base_quality - value(disc_reference, WEIGHT_SHARED, "quality"), "<=", 0.01, backend=WEIGHT_SHARED),
        _criterion("student_deployed_latency_fraction",
                   f"DR {dr_student}: fastest deployed row's latency as a fraction of its ONNX Runtime fp32",
                   _ratio(student_deployed, value(dr_student, "ort_fp32", "latency_ms_median", "dr")), "<=", 1 / 3,
                   backend=student_backend),
        _criterion("student_deployed_qwk_loss", f"DR {dr_student}: that row's QWK loss vs fp32 eager",
                   value(dr_student, "eager", "quality", "dr") - value(dr_student, student_backend, "quality", "dr"),
                   "<=", MAX_QWK_LOSS, backend=student_backend),
    ]


# ------------------------------------------------------------------------------------------ the figure
_MARKERS = {"eager": "o", "channels_last": "s", "bf16": "D", "ort_fp32": "^", "ort_int8": "v", "ov_fp32": "<",
            "ov_bf16": "P", "ov_int8": ">", WEIGHT_SHARED: "*"}


def pareto_front(latency: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Bool mask of the points no other point beats on both axes (lower latency and higher quality, one of
    them strictly). Written here because none of the suite's libraries has a 2-D Pareto filter: sorted by
    latency (ties: best quality first), a point is on the front when it beats the best quality seen so far."""
    latency, quality = np.asarray(latency, dtype=float), np.asarray(quality, dtype=float)
    on_front = np.zeros(len(latency), dtype=bool)
    best = -math.inf
    for index in np.lexsort((-quality, latency)):
        if quality[index] > best:
            on_front[index] = True
            best = quality[index]
    return on_front


def pareto_plot(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Quality against batch-1 latency (log scale), one panel per pipeline: a colour per model, a marker per
    backend, point area proportional to the backend's file size, and the Pareto front as a dashed line.

    Weight-shared points sit at their model's eager latency: the packed file is decoded into the same fp32
    network at load time. Rows without a quality or a latency are left out. Saved as PNG; returns ``path``.
    """
    points = table.copy()
    eager = points[points["backend"] == "eager"].set_index(["pipeline", "model"])["latency_ms_median"]
    shared = points["backend"] == WEIGHT_SHARED
    points.loc[shared, "latency_ms_median"] = [eager.get((p, m), math.nan)
                                               for p, m in zip(points.loc[shared, "pipeline"],
                                                               points.loc[shared, "model"], strict=True)]
    for column in ("latency_ms_median", "quality", "file_bytes", "quality_metric"):
        if column not in points:
            points[column] = math.nan
    points = points.dropna(subset=["latency_ms_median", "quality", "file_bytes"])
    pipelines = list(dict.fromkeys(points["pipeline"])) or ["(nothing measured)"]
    figure = Figure(figsize=(6.5 * len(pipelines), 5.2), layout="constrained")
    axes = figure.subplots(1, len(pipelines), squeeze=False)[0]
    largest = float(points["file_bytes"].max()) if len(points) else 1.0
    for axis, pipeline in zip(axes, pipelines, strict=True):
        panel = points[points["pipeline"] == pipeline]
        models = list(dict.fromkeys(panel["model"]))
        colours = {model: f"C{index % 10}" for index, model in enumerate(models)}
        for row in panel.itertuples():
            axis.scatter(row.latency_ms_median, row.quality, s=20 + 400 * row.file_bytes / largest,
                         marker=_MARKERS.get(row.backend, "X"), color=colours[row.model], alpha=0.75,
                         edgecolors="black", linewidths=0.5)
        if len(panel):
            front = panel[pareto_front(panel["latency_ms_median"], panel["quality"])]
            front = front.sort_values("latency_ms_median")
            axis.step(front["latency_ms_median"], front["quality"], where="post", color="black",
                      linestyle="--", linewidth=1, label="Pareto front")
            metric = ", ".join(sorted(set(panel["quality_metric"].dropna().astype(str)))) or "quality"
            axis.set_xscale("log")
            # quality from zero, as in make report: differences in the third decimal are not drawn as a cliff
            axis.set_ylim(bottom=min(0.0, float(panel["quality"].min())), top=1.02)
            axis.set_ylabel(f"quality ({metric})")
        axis.set_xlabel("batch-1 latency, median (ms, log scale)")
        axis.set_title(f"{pipeline}: quality vs latency (point area ~ file size)")
        handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=model)
                   for model, colour in colours.items()]
        handles += [Line2D([], [], marker=marker, linestyle="", color="grey", label=backend)
                    for backend, marker in _MARKERS.items() if backend in set(panel["backend"])]
        if handles:
            axis.legend(handles=handles, fontsize="small", loc="best")
        axis.grid(True, which="both", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


# ------------------------------------------------------------------------------------------ the report
TABLE_COLUMNS = {
    "pipeline": "pipeline", "model": "model", "backend": "backend", "executed_precision": "ran in",
    "params": "params", "MMACs": "MMACs", "size_MB": "file MB", "latency_ms_median": "median ms",
    "latency_ms_min": "min ms", "latency_ms_max": "max ms", "latency_ms_1_thread": "1-thread ms",
    "throughput_images_per_s": "images/s", "throughput_batch": "at batch",
    "latency_vs_fp32": "vs fp32", "latency_vs_reference": "vs reference",
    "quality_metric": "metric", "quality": "quality", "quality_delta": "delta vs fp32", "agreement": "agreement",
    "error": "error",
}


def markdown_table(table: pd.DataFrame) -> str:
    """The benchmark rows as one Markdown table (sizes in MB: each row's own deployable file)."""
    shown = table.assign(MMACs=table["macs"] / 1e6, size_MB=table["file_bytes"] / 1e6)
    shown = shown[[c for c in TABLE_COLUMNS if c in shown]].rename(columns=TABLE_COLUMNS)
    # blanks instead of "nan" for what a row does not have (no quality, no timing of the shared file)
    shown = shown.astype(object).where(shown.notna(), None)
    return shown.to_markdown(index=False, floatfmt=".4g", missingval="")


def markdown_report(table: pd.DataFrame, targets: Sequence[Mapping[str, Any]], cpu: Mapping[str, Any],
                    threads: int, runs: int | None = None, warmup: int | None = None,
                    title: str = "CPU inference benchmark") -> str:
    """bench.md: the table, the targets (met / missed and by how much), the CPU and the thread count."""
    timing = f"{runs} timed runs after {warmup} warm-up runs" if runs is not None else "the timed runs"
    lines = [f"# {title}", "", f"Batch 1, {threads} threads (PyTorch, ONNX Runtime and OpenVINO); latency over "
             f"{timing}; `1-thread ms`: the same on one thread; `images/s`: the most images per second over the "
             "batch sizes tried (`at batch`); ratios to the same model's fp32 eager (`vs fp32`) and to the "
             "pipeline's uncompressed model (`vs reference`). `ran in`: the precision the compute layers really "
             "ran in (OpenVINO's read from its compiled graph). `file MB`: the file each backend deploys (fp32 "
             "state dict, bf16 state dict, ONNX fp32 / int8, OpenVINO int8 IR, packed weight-shared file).", "",
             markdown_table(table), "",
             "## Targets", ""]
    target_table = pd.DataFrame(list(targets), columns=["target", "backend", "measured", "required", "met", "note"])
    target_table["met"] = target_table["met"].map({True: "met", False: "MISSED"})
    lines += [target_table.to_markdown(index=False, floatfmt=".4g"), "", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in cpu.items()]
    lines += [f"- benchmark threads: {threads}", ""]
    return "\n".join(lines)
