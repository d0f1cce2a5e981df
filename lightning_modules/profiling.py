"""Size, compute and CPU latency of a network: pure functions shared by callbacks and benchmarks."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass, from PyTorch's own FLOP counter (FLOPs / 2).

    Counts convolutions and matrix products, the usual convention for MACs; element-wise work
    (activations, attention gates) is not included.
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the deployed weight file weighs."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    threads: int

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"fps": self.fps}


def measure_latency(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> LatencyStats:
    """Wall-clock milliseconds of ``fn()`` over ``runs`` calls after ``warmup`` untimed calls."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        fn()
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        timings.append((time.perf_counter() - start) * 1000.0)
    return LatencyStats(statistics.median(timings), min(timings), max(timings), runs, torch.get_num_threads())


def model_latency(model: nn.Module, inputs: tuple[torch.Tensor, ...], runs: int = 30, warmup: int = 5) -> LatencyStats:
    """Batch latency of ``model(*inputs)`` in eval mode without autograd, on the inputs' device."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return measure_latency(lambda: model(*inputs), runs=runs, warmup=warmup)
    finally:
        model.train(was_training)
