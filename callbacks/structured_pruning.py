"""Structured pruning at the start of a fine-tuning stage: channels physically removed, not masked."""

from __future__ import annotations

import copy
import logging
from itertools import islice

import torch
from lightning import Callback, LightningModule, Trainer

from compression.pruning import prune_channels, recalibrate_batchnorm, refit_output_layer
from lightning_modules.profiling import count_parameters

log = logging.getLogger(__name__)


class StructuredPruning(Callback):
    """Remove ``ratio`` of the channels of every prunable convolution of ``pl_module.net`` before fitting.

    Runs in ``setup("fit")``, before the optimiser is built, so the optimiser only ever sees the pruned
    parameters (an optimiser made before a prune holds references to tensors that no longer exist).
    After the prune, on un-augmented training images, the BatchNorm statistics are re-estimated and the
    one-channel logits head is refitted by least squares to the unpruned network's logits (see
    ``compression.pruning``): without both, a freshly pruned network predicted no disc at all.
    On a resumed stage the module starts again from the unpruned network and is pruned again; the
    checkpoint's weights, which have the pruned widths, are then loaded on top.
    """

    def __init__(self, ratio: float = 0.5, example_size: int | None = None, recalibration_batches: int = 8,
                 refit_batches: int = 8):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio={ratio}: the fraction of channels to remove must lie in (0, 1)")
        if recalibration_batches < 0 or refit_batches < 0:
            raise ValueError(f"recalibration_batches={recalibration_batches} and refit_batches={refit_batches} "
                             "must be >= 0 (0 skips that step)")
        self.ratio = ratio
        self.example_size = example_size
        self.recalibration_batches = recalibration_batches
        self.refit_batches = refit_batches
        self.pruned = False
        self.report: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.pruned:
            return
        size = self.example_size or int(getattr(trainer.datamodule, "image_size", 64))
        net = pl_module.net
        before = count_parameters(net)
        example = torch.zeros(1, net.in_channels, size, size, device=next(net.parameters()).device)
        was_training = net.training
        net.eval()
        reference = copy.deepcopy(net) if self.refit_batches else None
        prune_channels(net, self.ratio, example)
        used = self._recalibrate(trainer, net)
        rms = self._refit_head(trainer, net, reference) if reference is not None else float("nan")
        net.train(was_training)
        after = count_parameters(net)
        self.pruned = True
        self.report = {"prune/ratio": self.ratio, "prune/params_before": float(before),
                       "prune/params_after": float(after), "prune/head_refit_rms": rms}
        for logger in trainer.loggers:
            logger.log_metrics(self.report, step=0)
        log.info("Pruned %.0f%% of the channels: %d -> %d parameters (widths of base %s); BatchNorm statistics "
                 "re-estimated on %d training batches; logits head refitted (RMS error %.3f)", 100 * self.ratio,
                 before, after, net.base, used, rms)

    def _images(self, trainer: Trainer, net: torch.nn.Module, batches: int):
        device = next(net.parameters()).device
        loader = trainer.datamodule.calibration_dataloader()
        return (batch["image"].to(device) for batch in islice(loader, batches))

    def _recalibrate(self, trainer: Trainer, net: torch.nn.Module) -> int:
        if self.recalibration_batches == 0:
            return 0
        with torch.no_grad():
            return recalibrate_batchnorm(net, self._images(trainer, net, self.recalibration_batches))

    def _refit_head(self, trainer: Trainer, net: torch.nn.Module, reference: torch.nn.Module) -> float:
        return refit_output_layer(net, reference, self._images(trainer, net, self.refit_batches))
