"""Hard-example replay: every training step also trains on a batch of the highest-loss samples."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import default_collate

from datamodules.replay import ReplayBuffer

log = logging.getLogger(__name__)

#: batch keys that are per-sample tensors and get the replayed samples appended
_SAMPLE_KEYS = ("image", "mask", "index", "hard")


class HardExampleReplay(Callback):
    """Keeps the highest-loss training samples (at most one fold's size) and replays them.

    At every training step an extra batch drawn from the buffer with probability proportional to the
    loss is appended to the batch, before the module sees it (so callbacks after this one, such as
    distillation, see the whole batch). The module's ``training_step`` must return ``per_sample_loss``
    and ``index``, which refill the buffer.

    With ``define_hard_cases`` the buffer's samples at the end of training become the datamodule's
    hard-case set (for edge-case detection) when the data came without one.

    Args:
        replay_batch_size: samples appended per step; ``None`` uses the loader's batch size.
        capacity: buffer size; ``None`` uses the datamodule's ``fold_size``.
    """

    def __init__(self, replay_batch_size: int | None = None, capacity: int | None = None, seed: int = 0,
                 define_hard_cases: bool = False):
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size={replay_batch_size} must be >= 1 (or null for the batch size)")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 (or null for one fold's size)")
        self.replay_batch_size = replay_batch_size
        self.capacity = capacity
        self.seed = seed
        self.define_hard_cases = define_hard_cases
        self.buffer: ReplayBuffer | None = None
        self._restored: dict | None = None
        self.rng = np.random.default_rng(seed)
        self.report: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.buffer is not None:
            return
        capacity = self.capacity or int(getattr(trainer.datamodule, "fold_size", 0)) or 1
        self.buffer = ReplayBuffer(capacity)
        if self._restored is not None:
            self.buffer.load_state_dict(self._restored)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.buffer:
            return
        count = self.replay_batch_size or len(batch["index"])
        dataset = trainer.datamodule.datasets["train"]
        replayed = default_collate([dataset[int(i)] for i in self.buffer.sample(count, self.rng)])
        # The batch dict is the object training_step receives: extending it in place is how a callback
        # adds samples without owning the dataloader.
        for key in _SAMPLE_KEYS:
            if key in batch and key in replayed:
                extra = replayed[key].to(batch[key].device)
                if key == "image" and batch[key].is_contiguous(memory_format=torch.channels_last):
                    extra = extra.contiguous(memory_format=torch.channels_last)
                batch[key] = torch.cat([batch[key], extra])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.buffer is None or not isinstance(outputs, dict) or "per_sample_loss" not in outputs:
            raise RuntimeError("HardExampleReplay needs training_step to return per_sample_loss and index")
        self.buffer.update(outputs["index"].tolist(), outputs["per_sample_loss"].float().tolist())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.buffer:
            return
        losses = list(self.buffer.losses.values())
        self.report = {"replay/buffer_size": float(len(self.buffer)), "replay/mean_loss": float(np.mean(losses))}
        datamodule = trainer.datamodule
        if self.define_hard_cases and not datamodule.has_hard_cases:
            dataset = datamodule.datasets["train"]
            ids = [datamodule.sample_id(dataset.paths[i]) for i in self.buffer.hardest()]
            datamodule.set_hard_cases(ids, source="the hard-example replay buffer at the end of training")
            log.info("Hard-case set: the %d samples in the replay buffer", len(ids))

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict() if self.buffer else None,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("buffer")
        if self.buffer is not None and self._restored is not None:
            self.buffer.load_state_dict(self._restored)
        if "rng" in state_dict:
            self.rng.bit_generator.state = state_dict["rng"]
