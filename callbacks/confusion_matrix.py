"""Log the test confusion matrix as a PNG artifact."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer

from callbacks._mlflow import has_mlflow_logger, log_mlflow_artifact


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str = "Test confusion matrix") -> Path:
    """Counts with row-normalised shading (recall per true grade), so rare grades stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(int(count)), ha="center", va="center",
                color="white" if normalised[row, col] > 0.5 else "black")
    ticks = range(matrix.shape[0])
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted grade", ylabel="true grade", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ConfusionMatrixArtifact(Callback):
    """After testing, plot ``pl_module.test_confusion_matrix`` and log it to every MLflow logger (no plot without one)."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        matrix = getattr(pl_module, "test_confusion_matrix", None)
        if matrix is None or not has_mlflow_logger(trainer):
            return
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{type(pl_module).__name__}: test confusion matrix"
            path = plot_confusion_matrix(matrix, Path(tmp) / "confusion_matrix.png", title=title)
            log_mlflow_artifact(trainer, path, "plots")
