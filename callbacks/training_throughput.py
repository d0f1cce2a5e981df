"""How fast a stage trains and how much memory the process holds: ``train/images_per_s``, ``sys/peak_rss_mb``."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``getrusage``: KiB on Linux, bytes on macOS).
    DataLoader worker processes are not included: each has its own."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def images_in_batch(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor (dicts, tuples, tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, str | bytes):
        return 0
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    for value in values:
        count = images_in_batch(value)
        if count:
            return count
    return 0


class TrainingThroughput(Callback):
    """After each training epoch: ``train/images_per_s`` (training images over the time from the epoch's start
    to its last training batch: loading, forward, backward and step; not validation) and ``sys/peak_rss_mb``.
    ``self.report`` keeps the last epoch's values (the stage's record and MLflow run get them)."""

    def __init__(self) -> None:
        self.report: dict[str, float] = {}
        self._started = 0.0
        self._last_batch_end = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = self._last_batch_end = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += images_in_batch(batch)
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self._last_batch_end - self._started
        if self._images == 0 or elapsed <= 0:
            return
        self.report = {"train/images_per_s": self._images / elapsed, "sys/peak_rss_mb": peak_rss_mb()}
        for name, value in self.report.items():
            pl_module.log(name, value, on_epoch=True, logger=True)
