"""Train until the validation Dice is sufficient, or patience runs out; report how long that took."""

from __future__ import annotations

import logging
import time
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping

log = logging.getLogger(__name__)


class TrainUntilSufficient(EarlyStopping):
    """Lightning's EarlyStopping (patience) plus a target that counts as sufficient, and the study's bookkeeping.

    Stops as soon as ``monitor`` reaches ``target`` (a sufficient result) or has not improved for
    ``patience`` epochs. Reports ``chain/epochs`` (trained), ``chain/epochs_to_sufficient`` (the first
    epoch, 1-based, whose validation reached the target; absent if none did), ``chain/reached_target``
    and ``chain/train_time_s`` (wall time of fitting, summed over resumed sessions).
    """

    def __init__(self, target: float = 0.9, monitor: str = "val/dice", patience: int = 10, mode: str = "max",
                 min_delta: float = 0.0):
        # The target is checked here, not by EarlyStopping's stopping_threshold, which only stops on a
        # strict improvement over it: a Dice exactly at the target is a sufficient result.
        super().__init__(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta, check_finite=True)
        self.target = target
        self.epochs_to_sufficient: int | None = None
        self.train_time_s = 0.0
        self._started: float | None = None
        self.report: dict[str, float] = {}

    def _reached(self, value: float) -> bool:
        return value >= self.target if self.mode == "max" else value <= self.target

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None and self._reached(float(value)):
            if self.epochs_to_sufficient is None:
                self.epochs_to_sufficient = trainer.current_epoch + 1
            log.info("%s = %.4f reached the target %.4f after %d epoch(s): stopping", self.monitor, float(value),
                     self.target, trainer.current_epoch + 1)
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started is not None:
            self.train_time_s += time.perf_counter() - self._started
            self._started = None
        self.report = {"chain/epochs": float(trainer.current_epoch), "chain/train_time_s": self.train_time_s,
                       "chain/reached_target": float(self.epochs_to_sufficient is not None)}
        if self.epochs_to_sufficient is not None:
            self.report["chain/epochs_to_sufficient"] = float(self.epochs_to_sufficient)
        for logger in trainer.loggers:
            logger.log_metrics(self.report, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        elapsed = self.train_time_s + (time.perf_counter() - self._started if self._started is not None else 0.0)
        return super().state_dict() | {"epochs_to_sufficient": self.epochs_to_sufficient, "train_time_s": elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.epochs_to_sufficient = state_dict.pop("epochs_to_sufficient", None)
        self.train_time_s = float(state_dict.pop("train_time_s", 0.0))
        super().load_state_dict(state_dict)
