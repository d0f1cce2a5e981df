"""Write the stage's deployment bundle (``compression.deploy``) after testing, for ``make predict``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor

from callbacks.quantization_aware_training import QuantizationAwareTraining
from compression.deploy import DEFAULT_THRESHOLD, DEPLOY_DIR_TAG, DEPLOY_FOLDER, Bundle, write_bundle
from compression.export import Exporter
from compression.quantization import DEFAULT_CALIBRATION_IMAGES

log = logging.getLogger(__name__)


class DeploymentBundle(Callback):
    """After testing, write ``<weights_dir>/deploy/`` from ``pl_module.net`` and log it to MLflow.

    The preprocessing comes from ``datamodule.inference_spec()``, the example input from the first test
    batch (``pl_module.example_inputs``). Int8: the int8 file of a ``QuantizationAwareTraining`` callback of
    the same trainer when it wrote one; else post-training int8 calibrated on ``calibration_images`` images of
    ``datamodule.calibration_dataloader()`` (``int8=False``: an fp32-only bundle). A failing int8 step leaves
    an fp32-only bundle (a warning). Every MLflow logger gets the folder as artifacts under ``deploy/`` and
    the tag ``deploy_dir``. ``weights_dir`` is the stage folder (injected by
    ``experiments.runner.build_callbacks``); None: the trainer's ``default_root_dir``.
    """

    def __init__(self, weights_dir: str | None = None, int8: bool = True,
                 calibration_images: int = DEFAULT_CALIBRATION_IMAGES, exporter: Exporter = "auto",
                 threads: int = 1):
        if calibration_images < 1:
            raise ValueError(f"calibration_images={calibration_images} must be >= 1 (100 is the default)")
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self.weights_dir = weights_dir
        self.int8 = int8
        self.calibration_images = calibration_images
        self.exporter = exporter
        self.threads = threads
        self.bundle: Bundle | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "inference_spec"):
            raise ValueError("DeploymentBundle reads the preprocessing from the datamodule: call "
                             "trainer.test(module, datamodule=...) with one that has inference_spec()")
        folder = Path(self.weights_dir or trainer.default_root_dir) / DEPLOY_FOLDER
        net = pl_module.net
        spec = datamodule.inference_spec()
        input_names = ("image", "topo") if getattr(net, "uses_topology", False) else ("image",)
        loaders = trainer.test_dataloaders
        # several test loaders (the test split and a hard-case set): the first is the test split
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        example = tuple(t.cpu() for t in pl_module.example_inputs(next(iter(loader))))
        mlflow_loggers = [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]
        extra = {"stage": folder.parent.name, "module": type(pl_module).__name__}
        if spec["task"] == "disc":
            extra["threshold"] = float(getattr(pl_module, "threshold", DEFAULT_THRESHOLD))
        elif hasattr(pl_module, "num_classes"):
            extra["class_names"] = [str(grade) for grade in range(int(pl_module.num_classes))]
        if mlflow_loggers:
            extra["mlflow_run_id"] = mlflow_loggers[0].run_id
        qat_int8 = next((c.int8_path for c in trainer.callbacks
                         if isinstance(c, QuantizationAwareTraining) and c.int8_path is not None), None)
        # with a QAT model the calibration images only measure its parity
        calibration = self._calibration(datamodule, input_names) if self.int8 else None
        self.bundle = write_bundle(folder, net, example, input_names, spec["task"], spec, extra,
                                   calibration_batches=calibration, int8_onnx=qat_int8 if self.int8 else None,
                                   calibration_images=self.calibration_images, exporter=self.exporter,
                                   threads=self.threads)
        for logger in mlflow_loggers:
            logger.experiment.log_artifacts(logger.run_id, str(folder), artifact_path=DEPLOY_FOLDER)
            logger.experiment.set_tag(logger.run_id, DEPLOY_DIR_TAG, str(folder.resolve()))

    @staticmethod
    def _calibration(datamodule, input_names: tuple[str, ...]) -> Iterator[tuple[Tensor, ...]]:
        loader = (datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader")
                  else datamodule.train_dataloader())
        for batch in loader:
            yield tuple(batch[name] for name in input_names)
