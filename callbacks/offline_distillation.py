"""Offline distillation for the DR student: the teacher runs once per training image, not once per batch."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_modules.soft_targets import (
    VIEW_CHOICES,
    SoftTargetCache,
    soft_targets,
    teacher_key,
    tta_logits,
)

log = logging.getLogger(__name__)


class OfflineDistillation(Callback):
    """Before a distilling student trains: the teacher's soft targets of every training image, from the cache
    (``lightning_modules.soft_targets``) or computed now in evaluation mode, handed to the training split, whose
    batches then carry ``teacher_logits``; the student's ``training_step`` uses them instead of calling its
    teacher. ``views``: 1 (the image) or 2/4/8 flips and rotations averaged. A stage without a teacher (the
    teacher itself, a student alone, QAT) is left alone; ``enabled=false`` keeps online KD.

    ``teacher_image_size``: the resolution the teacher was trained at, when it differs from the student's
    (``distill.teacher_image_size``): its targets are computed from the same images prepared at that size
    (``DRDataModule.with_image_size``), so a low-resolution student learns what the teacher saw in more detail."""

    def __init__(self, views: int = 1, enabled: bool = True, batch_size: int = 64,
                 teacher_image_size: int | None = None):
        if views not in VIEW_CHOICES:
            raise ValueError(f"callbacks.offline_distillation.views={views}: choose one of {list(VIEW_CHOICES)}")
        self.views = views
        self.enabled = enabled
        self.batch_size = batch_size
        self.teacher_image_size = teacher_image_size
        self.report: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        teacher = getattr(pl_module, "teacher", None)
        checkpoint = getattr(pl_module, "hparams", {}).get("teacher_checkpoint")
        if stage != "fit" or not self.enabled or teacher is None or checkpoint is None:
            return
        datamodule = trainer.datamodule
        started = time.perf_counter()
        teachers_view = datamodule.with_image_size(self.teacher_image_size) if self.teacher_image_size else datamodule
        train = teachers_view.datasets["train"]
        cache = SoftTargetCache(datamodule.cache_dir, teacher_key(checkpoint, self.views),
                                teachers_view.preprocessing.key, pl_module.num_classes)
        targets, computed = soft_targets(train.paths, cache, lambda indices: self._compute(teacher, train, indices,
                                                                                           pl_module))
        datamodule.datasets["train"].soft_targets = targets
        self.report = {"distill/soft_targets_computed": float(computed),
                       "distill/soft_targets_s": time.perf_counter() - started}
        log.info("Offline distillation: the teacher's soft targets of %d training images (%d computed now, %d from "
                 "the cache %s, %d view(s), %d px) in %.1f s; the student's epochs run no teacher forward",
                 len(targets), computed, len(targets) - computed, cache.root, self.views,
                 teachers_view.preprocessing.image_size, self.report["distill/soft_targets_s"])

    def _compute(self, teacher: torch.nn.Module, train, indices: list[int], pl_module: LightningModule) -> np.ndarray:
        evaluation = train.evaluation_view(indices)
        loader = DataLoader(evaluation, batch_size=self.batch_size, shuffle=False, num_workers=0)
        device = next(teacher.parameters()).device
        memory_format = torch.channels_last if getattr(pl_module, "channels_last", False) else torch.contiguous_format
        teacher.eval()
        outputs = [tta_logits(teacher, batch["image"].to(device).contiguous(memory_format=memory_format),
                              self.views).cpu() for batch in loader]
        return torch.cat(outputs).numpy()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.report and pl_module.logger is not None:
            pl_module.logger.log_metrics(self.report, step=0)
