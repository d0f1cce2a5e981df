"""Per-image test scores of an optic-disc stage, and overlays of its worst and best test images."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning import Callback, LightningModule, Trainer

from callbacks._mlflow import (
    first_test_loader,
    has_mlflow_logger,
    image_names,
    log_mlflow_artifact,
)
from lightning_modules.explain import plot_segmentation_overlay
from lightning_modules.seg_metrics import binarize

log = logging.getLogger(__name__)

PER_IMAGE_FILE = "test_per_image.csv"


def worst_and_best(dice: np.ndarray, count: int) -> tuple[list[int], list[int]]:
    """Positions of the ``count`` lowest-Dice images (worst first) and of the ``count`` highest (best first).

    Ties keep the test order; an image is never both (with fewer than ``2 * count`` images the best list
    is shorter).
    """
    dice = np.asarray(dice, dtype=np.float64)
    worst = [int(i) for i in np.argsort(dice, kind="stable")[:count]]
    best = [int(i) for i in np.argsort(-dice, kind="stable") if int(i) not in worst][:count]
    return worst, best


class SegmentationOverlays(Callback):
    """After an optic-disc test: the per-image scores as a table, and overlays of the extreme images.

    ``DiscSegmenter.test_per_image`` holds one row per test-split image in the order the first test loader
    served them; the batches' ``index`` (collected here, dataloader 0 only) names each row's image. Writes
    ``predictions/test_per_image.csv`` (``image`` + every per-image metric), also to ``weights_dir``
    (the stage folder, filled in by the runner) when given, and ``overlays/worst_<k>_<stem>.png`` /
    ``overlays/best_<k>_<stem>.png`` for the ``num_images`` lowest- and highest-Dice images (k = 1 is the
    extreme): the photograph at its own size (the network's preprocessed square for a test set without the
    originals), true disc contour in green, predicted in azure, false detections in red.
    Without an MLflow logger (fast_dev_run) only the stage folder's table is written.
    """

    def __init__(self, num_images: int = 3, weights_dir: str | None = None):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"SegmentationOverlays: num_images={num_images!r} must be an int >= 0 "
                             "(0: the per-image table only)")
        self.num_images = num_images
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.per_image: pd.DataFrame | None = None
        self.written: list[str] = []
        self._indices: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._indices = []

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch: dict,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0:
            return
        start = sum(len(i) for i in self._indices)
        index = batch.get("index")
        self._indices.append(index.detach().cpu() if index is not None
                             else torch.arange(start, start + len(batch["image"])))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.per_image, self.written = None, []
        rows = list(getattr(pl_module, "test_per_image", []) or [])
        if not rows or not self._indices:
            log.warning("SegmentationOverlays: %s has no per-image test scores: no table, no overlays",
                        type(pl_module).__name__)
            return
        indices = torch.cat(self._indices).numpy()
        if len(indices) != len(rows):
            raise RuntimeError(f"SegmentationOverlays: {len(rows)} per-image scores but {len(indices)} test images "
                               "were served; the scores no longer line up with the images")
        dataset = getattr(first_test_loader(trainer), "dataset", None)
        table = pd.DataFrame(rows)
        table.insert(0, "image", image_names(dataset, indices))
        self.per_image = table
        if self.weights_dir is not None:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            table.to_csv(self.weights_dir / PER_IMAGE_FILE, index=False)
        if not has_mlflow_logger(trainer):
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            table.to_csv(folder / PER_IMAGE_FILE, index=False)
            log_mlflow_artifact(trainer, folder / PER_IMAGE_FILE, "predictions")
            if self.num_images == 0:
                return
            if not all(hasattr(dataset, name) for name in ("paths", "mask_paths", "cache")):
                log.warning("SegmentationOverlays: the test dataset (%s) has no paths / mask_paths / cache: "
                            "no overlays", type(dataset).__name__)
                return
            worst, best = worst_and_best(table["dice"].to_numpy(), self.num_images)
            for kind, positions in (("worst", worst), ("best", best)):
                for rank, position in enumerate(positions, start=1):
                    path = self._overlay(pl_module, dataset, int(indices[position]), float(table["dice"][position]),
                                         folder / f"{kind}_{rank}_{Path(dataset.paths[indices[position]]).stem}.png",
                                         f"{kind} {rank}:")
                    log_mlflow_artifact(trainer, path, "overlays")
                    self.written.append(f"overlays/{path.name}")
        log.info("SegmentationOverlays: %d test images scored, overlays %s", len(table), self.written)

    @staticmethod
    def _overlay(pl_module: LightningModule, dataset, index: int, dice: float, path: Path, prefix: str) -> Path:
        """The overlay where the image was scored: on the photograph at its own size when the test set carries
        it (``with_source``, as ``test/*`` and the Dice in the title are), else on the network's square."""
        net = pl_module.net
        device = next(net.parameters()).device
        tensor = dataset[index]["image"].to(device)
        at_source = getattr(dataset, "with_source", False) and hasattr(pl_module, "predict_on_source")
        with torch.no_grad():
            if at_source:
                image, true_mask = dataset.photograph(index)
                predicted = pl_module.predict_on_source(tensor, image, dataset.cache.preprocessing.crop_of(image))
            else:
                image, true_mask = dataset.cache.load(dataset.paths[index], dataset.mask_paths[index])
                was_training = net.training
                net.eval()
                predicted = binarize(net(tensor[None]), pl_module.threshold)[0, 0].cpu().numpy()
                net.train(was_training)
        title = f"{prefix} {Path(dataset.paths[index]).name}"
        return plot_segmentation_overlay(image, true_mask, predicted, path, dice, title)
