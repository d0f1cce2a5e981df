"""Distillation of a segmentation network from a frozen teacher's soft masks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_modules.nets.vgg_unet import load_network

log = logging.getLogger(__name__)


class Distillation(Callback):
    """Puts the teacher's logits into every training batch as ``teacher_logits``.

    The module mixes them into its loss (pixel-wise KD with its ``kd_alpha`` and ``kd_temperature``).
    The teacher is a saved network file (``save_network``), loaded frozen in eval mode: its dropout and
    BatchNorm statistics never change while the student learns. Place this callback after any
    callback that adds samples to the batch (hard-example replay) so the teacher sees them too.
    """

    def __init__(self, teacher_path: str):
        if not Path(teacher_path).is_file():
            raise FileNotFoundError(f"Distillation teacher {teacher_path} does not exist: train the base network "
                                    "first (chain arm 'base') or point chain.teacher_path at a saved network")
        self.teacher_path = teacher_path
        self.teacher: torch.nn.Module | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.teacher is not None:
            return
        teacher = load_network(self.teacher_path)
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        log.info("Distilling from %s (base %s)", self.teacher_path, teacher.base)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        memory_format = torch.channels_last if getattr(pl_module, "channels_last", False) else torch.contiguous_format
        self.teacher.to(device=pl_module.device, memory_format=memory_format)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            batch["teacher_logits"] = self.teacher(batch["image"])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.teacher = None  # free its memory; the student's test does not need it
