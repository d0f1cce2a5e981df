"""What the test-stage callbacks share: their MLflow loggers, artifact logging, and the test split's images
and example inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning import Trainer
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor
from torch.utils.data import DataLoader, Subset


def mlflow_loggers(trainer: Trainer) -> list[MLFlowLogger]:
    """The trainer's MLflow loggers (none under fast_dev_run, whose dummy logger replaces them, or without one)."""
    return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]


def has_mlflow_logger(trainer: Trainer) -> bool:
    """Whether figures would reach MLflow: not under fast_dev_run (its dummy logger), nor without a logger."""
    return bool(mlflow_loggers(trainer))


def log_mlflow_artifact(trainer: Trainer, path: Path, artifact_path: str) -> None:
    """Log a file to the run of every MLflow logger of ``trainer`` (none under fast_dev_run's dummy logger)."""
    for logger in mlflow_loggers(trainer):
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)


def first_test_loader(trainer: Trainer) -> DataLoader | None:
    """The test split's loader: with several test loaders (e.g. the test split and a hard-case set) the first."""
    loaders = trainer.test_dataloaders
    if isinstance(loaders, list | tuple):
        return loaders[0] if loaders else None
    return loaders


def first_test_example(trainer: Trainer, pl_module) -> tuple[Tensor, ...]:
    """The network's inputs for the first item of the test split (``pl_module.example_inputs``), on the CPU."""
    return tuple(t.cpu() for t in pl_module.example_inputs(next(iter(first_test_loader(trainer)))))


def image_names(dataset: object, indices: np.ndarray) -> list[str]:
    """File names (``Path(paths[i]).name``) of dataset items; the index itself where the dataset has no paths.

    ``indices`` are the items' own ``index`` entries, which the project's datasets number in their own order:
    a ``Subset`` (of a ``Subset`` ...) of such a dataset serves the wrapped dataset's numbers, so its paths name them.
    """
    while getattr(dataset, "paths", None) is None and isinstance(dataset, Subset):
        dataset = dataset.dataset
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return [str(int(i)) for i in indices]
    return [Path(paths[int(i)]).name for i in indices]
