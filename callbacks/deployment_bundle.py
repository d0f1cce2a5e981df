"""Write the stage's deployment bundle (``compression.deploy``) after testing, for ``make predict``."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.utils import parametrize

from callbacks._mlflow import first_test_example, mlflow_loggers
from callbacks.quantization_aware_training import QuantizationAwareTraining
from compression.deploy import DEFAULT_THRESHOLD, DEPLOY_DIR_TAG, DEPLOY_FOLDER, Bundle, write_bundle
from compression.export import Exporter, network_input_names
from compression.packed_format import describe_network
from compression.quantization import DEFAULT_CALIBRATION_IMAGES, is_qat_prepared, strip_qat

log = logging.getLogger(__name__)


def grading_head_manifest(net: nn.Module, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """bundle.json's record of a grading head: its kind and, for a regression or ordinal head, the decision
    thresholds and probability scale fitted on the validation split. The ONNX graphs carry them as constants;
    this copy lets a reader see which cut points the deployed model uses."""
    head = hparams.get("head", "classification") if hparams else "classification"
    record: dict[str, Any] = {"grading_head": {"kind": head}}
    decoder = getattr(net, "decoder", None)
    if decoder is not None and hasattr(decoder, "thresholds"):
        record["grading_head"] |= {"thresholds": [round(float(t), 6) for t in decoder.thresholds],
                                   "scale": round(float(decoder.scale), 6)}
    return record


class DeploymentBundle(Callback):
    """After testing, write ``<weights_dir>/deploy/`` from ``pl_module.net`` and log it to MLflow.

    The preprocessing comes from ``datamodule.inference_spec()``, the example input from the first test
    batch (``pl_module.example_inputs``). Int8: the int8 file of a ``QuantizationAwareTraining`` callback of
    the same trainer when it wrote one; else post-training int8 calibrated on ``calibration_images`` images of
    ``datamodule.calibration_dataloader()`` (``int8=False``: an fp32-only bundle). A failing int8 step leaves
    an fp32-only bundle (a warning). Every MLflow logger gets the folder as artifacts under ``deploy/`` and
    the tag ``deploy_dir``. ``weights_dir`` is the stage folder (injected by
    ``experiments.runner.build_callbacks``); None: the trainer's ``default_root_dir``.

    A network still prepared for quantization-aware training (fake-quantized weights) is bundled as a plain fp32
    copy with those weights baked in; ``pl_module.net`` stays as it is. The bundle's network file (GradCAM) is
    described by ``describe_network(net, pl_module.hparams)``: a segmentation network by its spec, the DR student
    and the timm classifiers by the hyperparameters that built them.

    A bundle that cannot be written (an export error, ``ExportParityError``, anything else) does not fail the
    stage, whose training and test results are worth keeping: the error is logged with what to do, the
    half-written ``deploy/`` folder is removed (so ``make predict`` finds no bundle rather than a broken or stale
    one), nothing goes to MLflow, and ``self.report`` holds ``deploy/failed`` = 1.0.
    """

    def __init__(self, weights_dir: str | None = None, int8: bool = True,
                 calibration_images: int = DEFAULT_CALIBRATION_IMAGES, exporter: Exporter = "auto",
                 threads: int = 1, openvino: bool = True):
        if calibration_images < 1:
            raise ValueError(f"calibration_images={calibration_images} must be >= 1 (100 is the default)")
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self.weights_dir = weights_dir
        self.int8 = int8
        self.calibration_images = calibration_images
        self.exporter = exporter
        self.threads = threads
        self.openvino = openvino
        self.bundle: Bundle | None = None
        self.report: dict[str, float] = {}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.bundle, self.report = None, {}
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "inference_spec"):
            raise ValueError("DeploymentBundle reads the preprocessing from the datamodule: call "
                             "trainer.test(module, datamodule=...) with one that has inference_spec()")
        folder = Path(self.weights_dir or trainer.default_root_dir) / DEPLOY_FOLDER
        loggers = mlflow_loggers(trainer)
        try:
            self.bundle = self._write(trainer, pl_module, folder, loggers[0].run_id if loggers else None)
        except Exception as error:  # any failure: the stage's training and test results must survive it
            shutil.rmtree(folder, ignore_errors=True)
            log.error("Stage folder %s: the deployment bundle could not be written (%s: %s), so make predict "
                      "cannot use this stage; its weights and test results are kept. Fix the cause, then write "
                      "the bundle with `retest=true resume=%s` (the same overrides as the run)",
                      folder.parent, type(error).__name__, error, folder.parent.parent, exc_info=True)
            self.report = {"deploy/failed": 1.0}
            return
        for logger in loggers:
            logger.experiment.log_artifacts(logger.run_id, str(folder), artifact_path=DEPLOY_FOLDER)
            logger.experiment.set_tag(logger.run_id, DEPLOY_DIR_TAG, str(folder.resolve()))

    def _write(self, trainer: Trainer, pl_module: LightningModule, folder: Path, run_id: str | None) -> Bundle:
        datamodule = trainer.datamodule
        net = pl_module.net
        if is_qat_prepared(net):
            log.warning("DeploymentBundle: %s is still prepared for quantization-aware training; bundling a "
                        "plain fp32 copy with its fake-quantized weights", type(net).__name__)
            net = baked_qat_copy(net)
        spec = datamodule.inference_spec()
        input_names = network_input_names(net)
        example = first_test_example(trainer, pl_module)
        extra = {"stage": folder.parent.name, "module": type(pl_module).__name__}
        if spec["task"] == "disc":
            extra["threshold"] = float(getattr(pl_module, "threshold", DEFAULT_THRESHOLD))
        elif hasattr(pl_module, "num_classes"):
            extra["class_names"] = [str(grade) for grade in range(int(pl_module.num_classes))]
            extra |= grading_head_manifest(pl_module.net, getattr(pl_module, "hparams", {}))
        if run_id is not None:
            extra["mlflow_run_id"] = run_id
        qat_int8 = next((c.int8_path for c in trainer.callbacks
                         if isinstance(c, QuantizationAwareTraining) and c.int8_path is not None), None)
        # with a QAT model the calibration images only measure its parity
        calibration = self._calibration(datamodule, input_names) if self.int8 else None
        try:
            architecture = describe_network(net, getattr(pl_module, "hparams", None))
        except ValueError:
            architecture = None  # write_bundle tries the network alone, and warns that it has no network file
        return write_bundle(folder, net, example, input_names, spec["task"], spec, extra,
                            calibration_batches=calibration, int8_onnx=qat_int8 if self.int8 else None,
                            calibration_images=self.calibration_images, exporter=self.exporter,
                            threads=self.threads, architecture=architecture, openvino=self.openvino)

    @staticmethod
    def _calibration(datamodule, input_names: tuple[str, ...]) -> Iterator[tuple[Tensor, ...]]:
        loader = (datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader")
                  else datamodule.train_dataloader())
        for batch in loader:
            yield tuple(batch[name] for name in input_names)


def baked_qat_copy(net: nn.Module) -> nn.Module:
    """A plain fp32 copy of a network prepared by ``compression.quantization.prepare_qat``: its fake-quantized
    weights baked in, no parametrization, observer or hook; ``net`` is left as it is.

    Hand-written rather than ``parametrize.remove_parametrizations`` on a deep copy: that function deletes the
    weight property from the parametrized class, which the copy shares with ``net``, and so would break ``net``.
    Here the copy's modules only get their original class back and the baked weight as a new parameter.
    """
    plain = copy.deepcopy(net)
    for module in plain.modules():
        if not parametrize.is_parametrized(module):
            continue
        baked = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
        module.__class__ = type(module).__bases__[0]  # the class parametrize injected derives from the original
        del module.parametrizations
        for name, value in baked.items():
            module.register_parameter(name, nn.Parameter(value))
    return strip_qat(plain)  # no parametrization left: removes the observers and their hooks
