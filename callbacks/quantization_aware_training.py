"""Quantization-aware fine-tuning that ends in a real int8 ONNX model, checked against the fp32 network."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from compression.export import Exporter
from compression.quantization import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MAX_QWK_DROP,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_MASK_DICE,
    QuantizationParityError,
    export_qat_int8,
    int8_parity_problems,
    is_qat_prepared,
    measure_int8_parity,
    prepare_qat,
)

log = logging.getLogger(__name__)


class QuantizationAwareTraining(Callback):
    """Fine-tune ``pl_module.net`` with int8 fake quantization, then export it as an int8 ONNX model.

    ``setup("fit")`` (before the optimiser is built, so it sees the QAT parameters) replaces ``pl_module.net``
    with a QAT copy (``compression.quantization.prepare_qat``) whose activation ranges start from
    ``prepare_batches`` calibration batches. ``on_train_end`` bakes the QAT weights into a plain fp32 network,
    exports ``<output_dir>/<name>_fp32.onnx`` and ``<name>_int8.onnx`` (ONNX Runtime static QDQ, calibrated on
    ``calibration_images`` images), and compares the int8 model with that fp32 network on the validation
    loader. The results go to ``self.report`` and every logger as ``quant/*``: ``int8_size_bytes``,
    ``fp32_size_bytes``, ``mean_abs_logit_diff``, ``max_abs_logit_diff``, and for one-channel mask logits
    ``mask_dice_int8_vs_fp32`` and, when batches carry ``target_key`` (``mask``), ``dice_delta`` (pooled Dice against the
    masks, int8 minus fp32); for class logits ``agreement`` and, with ``target_key="label"``, ``qwk_delta``.

    A fit resumed after its last epoch has no training loop and so no ``on_train_end``: ``on_fit_end`` exports
    then. Afterwards ``pl_module.net`` is the plain fp32 network with the QAT weights. The int8 model is judged
    on what its outputs are for (``compression.quantization.int8_parity_problems``): masks agreeing with the fp32
    network's at Dice >= ``min_mask_dice``; class logits with top-1 agreement >= ``min_agreement`` and a QWK drop
    <= ``max_qwk_drop``; the mean logit difference only where ``max_mean_abs_logit_diff`` is set (it is always
    logged). If it fails (``QuantizationParityError``, with the reason and the ``quant/*`` numbers, already
    logged) or the export fails, ``pl_module.net`` is set back to the untouched network from before QAT and the
    error is raised.

    Calibration images come from ``datamodule.calibration_dataloader()`` (un-augmented training images) when
    the datamodule has one, else from ``train_dataloader()``. Batches are dicts holding ``input_names``.

    Fine-tune the segmenter with dropout off (``DropoutToggle``) and ``BatchNormRecalibration``: measured on
    the base-16 VGGUNet, 34 QAT steps that way gave int8 Dice 0.872 (post-training int8: 0.849), while with
    dropout on and stale BatchNorm statistics the same steps fell to 0.70. Checkpoints written during QAT hold
    the QAT parameters (``parametrizations.weight.original``, observer ranges): resume them with this callback.
    """

    def __init__(
        self,
        output_dir: str,
        input_names: Sequence[str] = ("image",),
        output_names: Sequence[str] = ("logits",),
        name: str = "model",
        calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
        prepare_batches: int = 8,
        min_mask_dice: float = DEFAULT_MIN_MASK_DICE,
        min_agreement: float = DEFAULT_MIN_AGREEMENT,
        max_qwk_drop: float = DEFAULT_MAX_QWK_DROP,
        max_mean_abs_logit_diff: float | None = None,
        threshold: float = 0.5,
        parity_batches: int | None = None,
        momentum: float = 0.01,
        exporter: Exporter = "auto",
        threads: int = 1,
        target_key: str | None = "mask",
    ):
        if calibration_images < 1:
            raise ValueError(f"calibration_images={calibration_images} must be >= 1 (100 is the default)")
        if prepare_batches < 0:
            raise ValueError(f"prepare_batches={prepare_batches} must be >= 0")
        for key, value in (("min_mask_dice", min_mask_dice), ("min_agreement", min_agreement)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value} must be in [0, 1] (1: the int8 model must agree everywhere)")
        if not 0.0 <= max_qwk_drop <= 2.0:
            raise ValueError(f"max_qwk_drop={max_qwk_drop} must be in [0, 2] (QWK lies in [-1, 1])")
        if max_mean_abs_logit_diff is not None and max_mean_abs_logit_diff < 0:
            raise ValueError(f"max_mean_abs_logit_diff={max_mean_abs_logit_diff} must be >= 0, or null to only log "
                             "the logit difference")
        if not input_names:
            raise ValueError("input_names must name the batch keys the network takes, e.g. ('image', 'topo')")
        self.output_dir = Path(output_dir)
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.name = name
        self.calibration_images = calibration_images
        self.prepare_batches = prepare_batches
        self.min_mask_dice = min_mask_dice
        self.min_agreement = min_agreement
        self.max_qwk_drop = max_qwk_drop
        self.max_mean_abs_logit_diff = max_mean_abs_logit_diff
        self.threshold = threshold
        self.parity_batches = parity_batches
        self.momentum = momentum
        self.exporter = exporter
        self.threads = threads
        self.target_key = target_key
        self.fp32_net: torch.nn.Module | None = None
        self.int8_path: Path | None = None
        self.report: dict[str, float] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.fp32_net is not None:
            return
        if trainer.datamodule is None:
            raise ValueError("QuantizationAwareTraining reads calibration and validation images from the "
                             "datamodule: call trainer.fit(module, datamodule=...)")
        original = pl_module.net
        batches = islice(self._input_batches(trainer), self.prepare_batches)
        pl_module.net = prepare_qat(original, batches, momentum=self.momentum)
        self.fp32_net = original  # prepare_qat worked on a copy: this one stays as it was
        log.info("Prepared %s for quantization-aware training (int8 weights per channel, uint8 activations)",
                 type(original).__name__)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # under DDP only rank 0 writes the file (and tests the stage); the other processes drop their copy
        if self.fp32_net is None or not trainer.is_global_zero:
            return
        self.int8_path = None
        net = pl_module.net
        device = next(net.parameters()).device
        try:
            calibration = self._input_batches(trainer)
            example = tuple(tensor[:1] for tensor in next(self._input_batches(trainer)))
            exported = export_qat_int8(net.cpu(), example, calibration, self.output_dir, self.input_names,
                                       output_names=self.output_names, name=self.name,
                                       max_images=self.calibration_images, exporter=self.exporter)
            parity = measure_int8_parity(net, exported.int8_path, trainer.datamodule.val_dataloader(),
                                         self.input_names, target_key=self.target_key, threshold=self.threshold,
                                         max_batches=self.parity_batches, threads=self.threads)
            net.to(device)
        except Exception:
            self._restore(pl_module, device)
            raise
        self.report = {"quant/int8_size_bytes": float(exported.int8_bytes),
                       "quant/fp32_size_bytes": float(exported.fp32_bytes),
                       "quant/calibration_images": float(exported.calibration_images)}
        self.report |= {f"quant/{key}": value for key, value in parity.items()
                        if key not in ("dice_fp32", "dice_int8", "qwk_fp32", "qwk_int8")}
        for logger in trainer.loggers:
            logger.log_metrics(self.report, step=trainer.global_step)
        problems = int8_parity_problems(parity, self.min_mask_dice, self.min_agreement, self.max_qwk_drop,
                                        self.max_mean_abs_logit_diff)
        if problems:
            self._restore(pl_module, device)
            raise QuantizationParityError(
                exported.int8_path,
                f"the int8 model drifts from its fp32 network on {parity['images']:.0f} validation images: "
                f"{'; '.join(problems)}",
                metrics=self.report,
                advice="pl_module.net was restored to the network from before QAT. Fine-tune longer, calibrate "
                       "on more images, or loosen the tolerance")
        self.int8_path = exported.int8_path
        log.info("Int8 model %s: %.2f MB (fp32 %.2f MB), %s", exported.int8_path, exported.int8_bytes / 1e6,
                 exported.fp32_bytes / 1e6, ", ".join(f"{key} {value:.4f}" for key, value in parity.items()))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A fit resumed from a checkpoint written after the last epoch runs no training loop, and Lightning then
        # skips on_train_end: export here, or the stage would be tested and bundled as the fake-quantized network
        # (which torch.save cannot pickle) and without its int8 model.
        if self.fp32_net is not None and is_qat_prepared(pl_module.net):
            log.info("QuantizationAwareTraining: training had already ended (resumed after the last epoch); "
                     "exporting the int8 model now")
            self.on_train_end(trainer, pl_module)

    def _restore(self, pl_module: LightningModule, device: torch.device) -> None:
        pl_module.net = self.fp32_net.to(device)

    def _input_batches(self, trainer: Trainer) -> Iterator[tuple[Tensor, ...]]:
        datamodule = trainer.datamodule
        loader = (datamodule.calibration_dataloader() if hasattr(datamodule, "calibration_dataloader")
                  else datamodule.train_dataloader())
        for batch in loader:
            yield tuple(batch[key] for key in self.input_names)
