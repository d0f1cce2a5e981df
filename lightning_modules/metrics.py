"""Grading metrics (torchmetrics) and their stable MLflow names."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

PER_CLASS_METRICS = ("precision", "recall", "f1", "auroc")


def grading_metrics(num_classes: int, per_class: bool = True) -> MetricCollection:
    """Accuracy, macro/weighted F1, quadratic weighted kappa (the APTOS metric), and per-grade metrics."""
    metrics: dict[str, torch.nn.Module] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "f1_weighted": MulticlassF1Score(num_classes, average="weighted"),
        "qwk": MulticlassCohenKappa(num_classes, weights="quadratic"),
    }
    if per_class:
        metrics |= {
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
            "auroc": MulticlassAUROC(num_classes, average=None),
        }
    return MetricCollection(metrics)


def confusion_matrix_metric(num_classes: int) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(num_classes)


def flatten_metrics(results: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """``{"recall": tensor([..5..])}`` -> ``{"test/recall_0": .., ..}``; scalars keep their name."""
    flat: dict[str, float] = {}
    for name, value in results.items():
        value = value.detach().float().cpu()
        if value.ndim == 0:
            flat[f"{prefix}/{name}"] = float(value)
        else:
            for grade, item in enumerate(value.tolist()):
                flat[f"{prefix}/{name}_{grade}"] = float(item)
    return flat
