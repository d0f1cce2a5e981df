"""Dropout off for the first epoch(s) after a prune, then back on."""

from __future__ import annotations

import logging

from lightning import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


def dropout_enabled_at(epoch: int, off_epochs: int) -> bool:
    """Whether dropout is on in ``epoch`` (0-based) when the first ``off_epochs`` epochs run without it.

    Right after a prune the network has lost half its channels; dropping a further 30% of what is
    left in the first epoch makes the recovery needlessly noisy.
    """
    return epoch >= off_epochs


class DropoutToggle(Callback):
    """Switch ``pl_module.net``'s dropout at the start of each training epoch (``net.set_dropout``)."""

    def __init__(self, off_epochs: int = 1):
        if off_epochs < 0:
            raise ValueError(f"off_epochs={off_epochs} must be >= 0")
        self.off_epochs = off_epochs

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        enabled = dropout_enabled_at(trainer.current_epoch, self.off_epochs)
        if enabled != pl_module.net.dropout_enabled:
            log.info("Epoch %d: dropout %s", trainer.current_epoch, "on" if enabled else "off")
        pl_module.net.set_dropout(enabled)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.net.set_dropout(True)  # the saved network keeps its configured dropout
