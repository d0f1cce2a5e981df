"""GradCAM (and, for the student, CBAM attention and topology) figures of test images, per DR grade."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import default_collate

from callbacks._mlflow import first_test_loader, has_mlflow_logger, log_mlflow_artifact
from lightning_modules.explain import (
    cbam_spatial_attention,
    grad_cam_heatmaps,
    grad_cam_target_layer,
    persistence_view,
    plot_grading_explanation,
)

log = logging.getLogger(__name__)


def first_indices_per_grade(labels: np.ndarray, num_classes: int, per_grade: int) -> dict[int, list[int]]:
    """The first ``per_grade`` positions holding each grade, for the grades present in ``labels`` (in grade order)."""
    labels = np.asarray(labels)
    chosen = {grade: np.flatnonzero(labels == grade)[:per_grade].tolist() for grade in range(num_classes)}
    return {grade: positions for grade, positions in chosen.items() if positions}


class GradingExplanations(Callback):
    """After a DR grading test, explain ``images_per_grade`` test images of every grade (or of ``grades`` only):
    the first ones in the test split holding it; grades absent from the split are skipped and named in the log.

    One MLflow artifact per image, ``explain/grade<g>_<image stem>.png``: the preprocessed fundus (the
    datamodule's cached image) and the GradCAM overlay of the predicted grade; for a network with CBAM
    (the student) its spatial attention map beside it; for a network fed topological features, the image's
    persistence diagram and persistence images (the datamodule's fitted ``imager``). Needs a test dataset with
    ``paths``, ``labels`` and a ``cache`` of preprocessed images (``FundusGradingDataset``), and the module's
    ``net`` and ``example_inputs(batch)``; anything else is logged and skipped, never fatal. Nothing is drawn
    without an MLflow logger (fast_dev_run).
    """

    def __init__(self, images_per_grade: int = 2, grades: Sequence[int] | None = None):
        if isinstance(images_per_grade, bool) or not isinstance(images_per_grade, int) or images_per_grade < 0:
            raise ValueError(f"GradingExplanations: images_per_grade={images_per_grade!r} must be an int >= 0 "
                             "(0 turns the figures off)")
        if grades is not None and any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in grades):
            raise ValueError(f"GradingExplanations: grades={list(grades)!r} must be grade numbers (ints >= 0), "
                             "or null for every grade")
        self.images_per_grade = images_per_grade
        self.grades = sorted(set(grades)) if grades is not None else None
        self.written: list[str] = []

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.written = []
        if self.images_per_grade == 0 or not has_mlflow_logger(trainer):
            return
        dataset = getattr(first_test_loader(trainer), "dataset", None)
        missing = [name for name in ("paths", "labels", "cache") if not hasattr(dataset, name)]
        if missing:
            log.warning("GradingExplanations: the test dataset (%s) has no %s: no explanations",
                        type(dataset).__name__, ", ".join(missing))
            return
        net = pl_module.net
        try:
            target_layer = grad_cam_target_layer(net)
        except ValueError as error:
            log.warning("GradingExplanations: %s", error)
            return
        num_classes = int(getattr(pl_module, "num_classes", int(np.max(dataset.labels)) + 1))
        chosen = first_indices_per_grade(dataset.labels, num_classes, self.images_per_grade)
        wanted = set(range(num_classes)) if self.grades is None else set(self.grades)
        chosen = {grade: positions for grade, positions in chosen.items() if grade in wanted}
        absent = sorted(wanted - set(chosen))
        if absent:
            log.info("GradingExplanations: grades %s are absent from the test split: no figures for them", absent)
        imager = getattr(trainer.datamodule, "imager", None) if getattr(net, "uses_topology", False) else None
        with tempfile.TemporaryDirectory() as tmp:
            for grade, positions in chosen.items():
                for position in positions:
                    path = self._explain(pl_module, dataset, position, grade, imager, target_layer, Path(tmp))
                    log_mlflow_artifact(trainer, path, "explain")
                    self.written.append(f"explain/{path.name}")
        log.info("GradingExplanations: %d figures for grades %s", len(self.written), sorted(chosen))

    @staticmethod
    def _explain(pl_module: LightningModule, dataset, position: int, grade: int, imager, target_layer,
                 folder: Path) -> Path:
        net = pl_module.net
        source = Path(dataset.paths[position])
        batch = default_collate([dataset[position]])
        inputs = pl_module.example_inputs(batch)
        heatmap = grad_cam_heatmaps(net, inputs, target_layer)[0]
        was_training = net.training
        net.eval()
        with torch.no_grad():
            device = next(net.parameters()).device
            probabilities = net(*(t.to(device) for t in inputs)).softmax(dim=1)[0].cpu()
        net.train(was_training)
        predicted = int(probabilities.argmax())
        attention = cbam_spatial_attention(net, inputs[0])[0] if hasattr(getattr(net, "cbam", None), "spatial") else None
        persistence = None
        image = dataset.cache.load(source)
        if imager is not None and getattr(imager, "fitted", False):
            persistence = persistence_view(image, imager)
        title = (f"{type(pl_module).__name__} - {source.name}: true grade {grade}, "
                 f"predicted {predicted} (p={float(probabilities[predicted]):.2f})")
        return plot_grading_explanation(image, heatmap, folder / f"grade{grade}_{source.stem}.png", title,
                                        attention=attention, persistence=persistence)
