"""Model report: parameters, MACs, weight-file size and CPU latency of the trained network."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from callbacks._mlflow import first_test_example
from callbacks.quantization_aware_training import QuantizationAwareTraining
from callbacks.weight_sharing import WeightSharing
from compression.export import as_ort_array, ort_session
from lightning_modules.profiling import (
    LatencyStats,
    count_macs,
    count_parameters,
    measure_latency,
    model_latency,
    state_dict_size_bytes,
)

log = logging.getLogger(__name__)


class ModelReport(Callback):
    """After testing, measure the deployable network on the CPU at batch 1 and log ``model/*``.

    Expects ``pl_module.net`` (the plain network) and ``pl_module.example_inputs(batch)``. If the
    datamodule has ``inference_inputs(path)`` and test image paths, the whole per-image path
    (decode, preprocess, topological features, network) is timed as ``pipeline/latency_ms_*``.
    ``model/size_bytes`` is what ``torch.save`` of the state dict weighs, measured in memory: the stage folder
    already holds the network (checkpoint, ``network.pt``, deployment bundle), and a fourth copy of a base-64
    network's weights only cost disk.

    A compression callback of the same trainer that produced a deployable file replaces the fp32 numbers
    (see :func:`deployed_report`): ``WeightSharing``'s packed file, or ``QuantizationAwareTraining``'s int8
    ONNX model and its ONNX Runtime latency.
    """

    def __init__(self, latency_runs: int = 30, warmup_runs: int = 5, pipeline_runs: int = 10):
        if latency_runs < 1 or pipeline_runs < 0 or warmup_runs < 0:
            raise ValueError("latency_runs >= 1, warmup_runs >= 0, pipeline_runs >= 0")
        self.latency_runs = latency_runs
        self.warmup_runs = warmup_runs
        self.pipeline_runs = pipeline_runs
        self.report: dict[str, float] = {}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = pl_module.net
        inputs = first_test_example(trainer, pl_module)
        device = next(net.parameters()).device
        net_cpu = net.to("cpu")
        latency = model_latency(net_cpu, inputs, runs=self.latency_runs, warmup=self.warmup_runs)
        report = {
            "model/params": float(count_parameters(net_cpu)),
            "model/macs": float(count_macs(net_cpu, inputs)),
            "model/latency_ms_median": latency.median_ms,
            "model/latency_ms_min": latency.min_ms,
            "model/latency_ms_max": latency.max_ms,
            "model/fps": latency.fps,
            "model/threads": float(latency.threads),
            "model/size_bytes": float(state_dict_size_bytes(net_cpu)),
        }
        report |= self._pipeline_latency(trainer, net_cpu)
        report |= deployed_report(trainer.callbacks, inputs, report, runs=self.latency_runs, warmup=self.warmup_runs)
        net.to(device)
        self.report = report
        for logger in trainer.loggers:
            logger.log_metrics(report, step=trainer.global_step)
        log.info("Model report: %s", {k: round(v, 3) for k, v in report.items()})

    def _pipeline_latency(self, trainer: Trainer, net: torch.nn.Module) -> dict[str, float]:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "datasets", {}).get("test")
        if self.pipeline_runs == 0 or dataset is None or not hasattr(datamodule, "inference_inputs"):
            return {}
        source = dataset.paths[0]
        # The DR student fuses topological features, whose computation is part of its per-image cost;
        # networks without that branch (teacher, segmenter) must not pay for it.
        options = {"with_topology": bool(net.uses_topology)} if hasattr(net, "uses_topology") else {}
        net.eval()

        def process_one_file() -> torch.Tensor:
            with torch.inference_mode():
                inputs = [t for t in datamodule.inference_inputs(source, **options) if t.numel() > 0]
                return net(*inputs)

        stats = measure_latency(process_one_file, runs=self.pipeline_runs, warmup=1)
        return {"pipeline/latency_ms_median": stats.median_ms, "pipeline/latency_ms_min": stats.min_ms,
                "pipeline/latency_ms_max": stats.max_ms}


def deployed_report(callbacks: Sequence[Callback], inputs: tuple[Tensor, ...], report: dict[str, float],
                    runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """What a compression stage deploys, in place of the fp32 entries of ``report``; returns the changed entries.

    A ``WeightSharing`` packed file or a ``QuantizationAwareTraining`` int8 ONNX model becomes
    ``model/size_bytes`` (the fp32 state dict's size moves to ``model/fp32_size_bytes``); the int8 model's
    ONNX Runtime latency on ``inputs`` (batch 1, PyTorch's thread count) becomes ``model/latency_ms_*`` (the
    PyTorch fp32 latency moves to ``model/fp32_latency_ms_*``).
    """
    deployed: dict[str, float] = {}
    for callback in callbacks:
        if isinstance(callback, WeightSharing) and callback.packed_path is not None:
            deployed["model/size_bytes"] = float(callback.packed_path.stat().st_size)
        elif isinstance(callback, QuantizationAwareTraining) and callback.int8_path is not None:
            deployed["model/size_bytes"] = float(callback.int8_path.stat().st_size)
            stats = _onnx_latency(callback.int8_path, inputs, runs, warmup)
            for key in ("median", "min", "max"):
                if f"model/latency_ms_{key}" in report:
                    deployed[f"model/fp32_latency_ms_{key}"] = report[f"model/latency_ms_{key}"]
                deployed[f"model/latency_ms_{key}"] = getattr(stats, f"{key}_ms")
            deployed["model/fps"] = stats.fps
    if "model/size_bytes" in deployed and "model/size_bytes" in report:
        deployed["model/fp32_size_bytes"] = report["model/size_bytes"]
    return deployed


def _onnx_latency(path: Path, inputs: tuple[Tensor, ...], runs: int, warmup: int) -> LatencyStats:
    """ONNX Runtime's latency alone: the feed is converted once, outside the timing, as ``make bench`` does."""
    session = ort_session(path, threads=torch.get_num_threads())
    feed = {node.name: as_ort_array(value) for node, value in zip(session.get_inputs(), inputs, strict=True)}
    return measure_latency(lambda: session.run(None, feed), runs=runs, warmup=warmup)
