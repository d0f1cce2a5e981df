"""Per-image test predictions, precision-recall curves and calibration of a DR grading stage."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning import Callback, LightningModule, Trainer
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

from callbacks._mlflow import first_test_loader, has_mlflow_logger, image_names, log_mlflow_artifact
from lightning_modules.explain import (
    expected_calibration_error,
    plot_precision_recall_curves,
    plot_reliability_diagram,
)

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "test_predictions.csv"


def predictions_table(names: list[str], labels: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """The per-image predictions file: ``image``, ``label``, ``prediction`` (argmax), ``prob_0`` ... ``prob_{K-1}``, one row per image."""
    if not len(names) == len(labels) == len(probabilities):
        raise ValueError(f"{len(names)} names, {len(labels)} labels and {len(probabilities)} probability rows")
    table = pd.DataFrame({"image": names, "label": np.asarray(labels, dtype=np.int64),
                          "prediction": np.asarray(probabilities).argmax(axis=1).astype(np.int64)})
    for k in range(probabilities.shape[1]):
        table[f"prob_{k}"] = probabilities[:, k].astype(np.float64)
    return table


def per_source_metrics(predictions: pd.DataFrame, sources: np.ndarray, num_classes: int) -> dict[str, float]:
    """``test/<set>/qwk``, ``test/<set>/acc``, ``test/<set>/f1_macro`` and ``test/<set>/images`` for each labelled
    set of a data=multi test split (``sources``: each predictions row's set)."""
    grades = list(range(num_classes))
    results: dict[str, float] = {}
    for source in sorted(set(sources.tolist())):
        rows = predictions[np.asarray(sources) == source]
        truth, predicted = rows["label"].to_numpy(), rows["prediction"].to_numpy()
        results |= {
            f"test/{source}/qwk": float(cohen_kappa_score(truth, predicted, labels=grades, weights="quadratic")),
            f"test/{source}/acc": float(accuracy_score(truth, predicted)),
            f"test/{source}/f1_macro": float(f1_score(truth, predicted, labels=grades, average="macro",
                                                      zero_division=0.0)),
            f"test/{source}/images": float(len(rows)),
        }
    return results


class ClassificationDiagnostics(Callback):
    """After a DR grading test: ``test/ece``, precision-recall curves, reliability diagram, per-image predictions.

    Collects the probabilities the module's ``test_step`` returns (dataloader 0 only: the test split), with the
    batch's ``label`` and ``index`` (the position in the test dataset; the loader's order without it). Logs
    ``test/ece`` (top-label L1 calibration error, ``n_bins`` bins) at the end of the test epoch and keeps it in
    ``self.report``; at the end of testing logs the MLflow artifacts ``plots/pr_curves.png``,
    ``plots/reliability.png`` and ``predictions/test_predictions.csv`` (see ``predictions_table``), and writes that CSV to
    ``weights_dir`` (the stage folder, which the runner fills in) when given. Without an MLflow logger
    (fast_dev_run) the plots are not drawn.
    """

    def __init__(self, n_bins: int = 10, weights_dir: str | None = None):
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"ClassificationDiagnostics: n_bins={n_bins!r} must be a positive int")
        self.n_bins = n_bins
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.report: dict[str, float] = {}
        self.predictions: pd.DataFrame | None = None
        self._probabilities: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probabilities, self._labels, self._indices = [], [], []
        self.predictions = None

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch: dict,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0:
            return
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
            raise TypeError(f"ClassificationDiagnostics needs {type(pl_module).__name__}.test_step to return the "
                            f"(B, K) class probabilities, got {type(outputs).__name__}")
        self._probabilities.append(outputs.detach().float().cpu())
        self._labels.append(batch["label"].detach().cpu())
        start = sum(len(p) for p in self._indices)
        index = batch.get("index")
        self._indices.append(index.detach().cpu() if index is not None else torch.arange(start, start + len(outputs)))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._probabilities:
            return
        probabilities = torch.cat(self._probabilities).numpy()
        labels = torch.cat(self._labels).numpy()
        ece = expected_calibration_error(probabilities, labels, self.n_bins)
        pl_module.log("test/ece", ece, add_dataloader_idx=False)
        self.report = {"test/ece": ece}
        loader = first_test_loader(trainer)
        indices = torch.cat(self._indices).numpy()
        dataset = getattr(loader, "dataset", None)
        names = image_names(dataset, indices)
        self.predictions = predictions_table(names, labels, probabilities)
        sources = getattr(dataset, "sources", None)
        if sources is not None:  # data=multi: each labelled set's own test metrics too
            sources = np.asarray(sources)[indices]
            self.predictions.insert(1, "dataset", sources)
            per_source = per_source_metrics(self.predictions, sources, probabilities.shape[1])
            pl_module.log_dict(per_source, add_dataloader_idx=False)
            self.report |= per_source

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.predictions is None:
            return
        probabilities = self.predictions.filter(like="prob_").to_numpy()
        labels = self.predictions["label"].to_numpy()
        stage = type(pl_module).__name__
        if self.weights_dir is not None:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            self.predictions.to_csv(self.weights_dir / PREDICTIONS_FILE, index=False)
        if not has_mlflow_logger(trainer):
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            csv = folder / PREDICTIONS_FILE
            self.predictions.to_csv(csv, index=False)
            log_mlflow_artifact(trainer, csv, "predictions")
            plots = [
                plot_precision_recall_curves(probabilities, labels, folder / "pr_curves.png",
                                             title=f"{stage}: test precision-recall"),
                plot_reliability_diagram(probabilities, labels, folder / "reliability.png", self.n_bins,
                                         title=f"{stage}: test reliability"),
            ]
            for plot in plots:
                log_mlflow_artifact(trainer, plot, "plots")
        log.info("%s: test ECE %.4f over %d images", stage, self.report.get("test/ece", float("nan")),
                 len(self.predictions))
