"""DR grading LightningModules: a teacher, and a student distilled from it (or trained alone).

The networks live in ``lightning_modules.nets``; the losses in ``lightning_modules.losses``. These
classes only wire them to Lightning: optimiser, schedule, metrics and logging.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from lightning_modules.losses import (
    consistency_loss,
    head_consistency_loss,
    head_distillation_loss,
    head_supervised_loss,
    linear_alpha,
)
from lightning_modules.metrics import confusion_matrix_metric, flatten_metrics, grading_metrics
from lightning_modules.nets.backbones import create_backbone
from lightning_modules.nets.grading_head import CLASSIFICATION, continuous_grade
from lightning_modules.nets.student import TopoFusionNet, build_student_net
from lightning_modules.optim import adamw_one_cycle
from lightning_modules.ordinal import fit_decoder_scale, fit_qwk_thresholds

log = logging.getLogger(__name__)


def reset_classifier_small(head: nn.Module) -> None:
    """Near-zero init of a fresh head on pretrained features.

    timm initialises EfficientNet's classifier uniformly in +-1/sqrt(num_classes) (0.45 for 5
    grades); on 1280 ImageNet features that gives logits of about +-9 and a first-epoch loss of
    3.5 instead of ln 5 = 1.6, which the pretrained backbone then pays for in large, noisy gradients.
    """
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def with_rotated_view(image: Tensor, channels_last: bool) -> Tensor:
    """``image`` and its 90-degree rotation stacked along the batch: both views of the consistency loss in one
    forward pass (one backbone call instead of two on a 2-core CPU)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    rotated = torch.rot90(image, k=1, dims=(2, 3)).contiguous(memory_format=memory_format)
    return torch.cat([image, rotated])


class GradingModule(LightningModule):
    """Shared plumbing: AdamW + OneCycleLR, val/test metrics under stable names, test confusion matrix."""

    #: set by subclasses: the plain nn.Module that is deployed (measured, exported)
    net: nn.Module

    def __init__(self, num_classes: int, lr: float, weight_decay: float, pct_start: float,
                 class_weights: list[float] | None, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.pct_start = pct_start
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_metrics = grading_metrics(num_classes, per_class=False)
        self.test_metrics = grading_metrics(num_classes, per_class=True)
        self.test_confusion = confusion_matrix_metric(num_classes)
        self.test_confusion_matrix: np.ndarray | None = None
        self.test_results: dict[str, float] = {}

    # Measured on this project's 2-core CPU (EfficientNet-Lite0 student step, batch 32 at 224 px):
    # 10.4 s in NCHW, 5.5 s in channels-last, because oneDNN's depthwise and 1x1 convolutions run
    # natively on NHWC. GPUs with tensor cores prefer it as well.
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        if self.channels_last and "image" in batch:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    # ------------------------------------------------------------------ what subclasses provide
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def example_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Inputs of ``self.net`` for the first item of a batch (model report, export)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Tensor], metrics, prefix: str) -> Tensor:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["label"])
        probabilities = logits.softmax(dim=1)
        metrics.update(probabilities, batch["label"])
        self.log(f"{prefix}/loss", loss, prog_bar=False, batch_size=len(logits))
        return probabilities

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        results = flatten_metrics(self.val_metrics.compute(), "val")
        self.val_metrics.reset()
        qwk = results.pop("val/qwk")
        self.log_dict(results)
        self.log("val/qwk", qwk, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Returns the (B, K) softmax probabilities: callbacks (calibration, per-image predictions) collect them."""
        probabilities = self._evaluate(batch, self.test_metrics, "test")
        self.test_confusion.update(probabilities.argmax(dim=1), batch["label"])
        return probabilities

    def on_test_epoch_end(self) -> None:
        self.test_results = flatten_metrics(self.test_metrics.compute(), "test")
        self.test_metrics.reset()
        self.test_confusion_matrix = self.test_confusion.compute().cpu().numpy()
        self.test_confusion.reset()
        self.log_dict(self.test_results)

    # ------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        return adamw_one_cycle(self.trainable_parameters(), self.lr, self.weight_decay, self.pct_start,
                               self.trainer.estimated_stepping_batches)

    def trainable_parameters(self):
        return self.net.parameters()


class TeacherClassifier(GradingModule):
    """A timm backbone trained with label-smoothed, class-weighted cross-entropy.

    Also the architecture baselines of ``experiment=dr_baselines``: any timm classifier (``backbone_kwargs``
    reach ``timm.create_model``, e.g. ``{"kernel_sizes": 5}`` for ConvNeXt's depthwise kernels), trained with the
    student's loss when ``label_smoothing=0`` and ``consistency_weight`` is the student's rotation-consistency weight.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite2",
        pretrained: str = "lite",
        pretrained_path: str | None = None,
        num_classes: int = 5,
        drop_rate: float = 0.3,
        label_smoothing: float = 0.1,
        class_weights: list[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        pct_start: float = 0.3,
        channels_last: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
        consistency_weight: float = 0.0,
        role: str = "Teacher",
    ):
        super().__init__(num_classes, lr, weight_decay, pct_start, class_weights, channels_last)
        self.save_hyperparameters()
        self.net = create_backbone(backbone, pretrained=pretrained, pretrained_path=pretrained_path,
                                   num_classes=num_classes, drop_rate=drop_rate, **(backbone_kwargs or {}))
        if pretrained != "none" or pretrained_path:
            reset_classifier_small(self.net.get_classifier())
        log.info("%s %s%s: %s", role, backbone, f" {backbone_kwargs}" if backbone_kwargs else "",
                 getattr(self.net, "pretrained_report", f"pretrained={pretrained}"))
        self.label_smoothing = label_smoothing
        self.consistency_weight = consistency_weight

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["image"])

    def example_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return (batch["image"][:1],)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        target = batch["label"]
        if self.consistency_weight > 0:
            logits, logits_rotated = self.net(with_rotated_view(batch["image"], self.channels_last)).chunk(2)
        else:
            logits = self.logits(batch)
        loss = F.cross_entropy(logits, target, weight=self.class_weights, label_smoothing=self.label_smoothing)
        if self.consistency_weight > 0:
            consistency = consistency_loss(logits, logits_rotated)
            self.log_dict({"train/ce": loss, "train/consistency": consistency}, batch_size=len(target))
            loss = loss + self.consistency_weight * consistency
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss


class StudentDistiller(GradingModule):
    """The CBAM + topology student, trained with KD from a frozen teacher plus rotation consistency.

    ``teacher_checkpoint=None`` (or ``alpha_start = alpha_end = 0``) trains the same student without a
    teacher: the ablation that measures the distillation gain.

    ``head``: ``classification``, ``regression`` or ``ordinal`` (``lightning_modules.nets.grading_head``). For
    the last two, every validation epoch fits the four decision thresholds (QWK-maximising) and the
    probability scale on the validation split and stores them in the network's decoder, so the checkpoint of
    the best epoch carries the thresholds of that epoch and ``val/qwk`` is measured with them.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "lite",
        pretrained_path: str | None = None,
        num_classes: int = 5,
        topo_features: int = 2048,
        topo_hidden: int = 256,
        topo_embedding: int = 64,
        cbam_rd_ratio: float = 1 / 16,
        head_dropout: float = 0.5,
        drop_rate: float = 0.2,
        teacher_checkpoint: str | None = None,
        temperature: float = 4.0,
        alpha_start: float = 0.2,
        alpha_end: float = 0.8,
        consistency_weight: float = 0.5,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        pct_start: float = 0.3,
        channels_last: bool = True,
        head: str = CLASSIFICATION,
        use_cbam: bool = True,
    ):
        super().__init__(num_classes, lr, weight_decay, pct_start, class_weights, channels_last)
        self.save_hyperparameters()
        self.net: TopoFusionNet = build_student_net(
            backbone, pretrained, pretrained_path, num_classes, topo_features, topo_hidden, topo_embedding,
            cbam_rd_ratio, head_dropout, drop_rate, head, use_cbam,
        )
        self.head = head
        self._val_scores: list[Tensor] = []
        self._val_labels: list[Tensor] = []
        log.info("Student %s: %s", backbone, getattr(self.net.backbone, "pretrained_report", pretrained))
        self.temperature = temperature
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.consistency_weight = consistency_weight
        self.label_smoothing = label_smoothing
        self.teacher = self._load_teacher(teacher_checkpoint) if self.distills(teacher_checkpoint) else None

    def distills(self, teacher_checkpoint: str | None) -> bool:
        return teacher_checkpoint is not None and (self.alpha_start > 0 or self.alpha_end > 0)

    @staticmethod
    def _load_teacher(path: str) -> nn.Module:
        # pretrained="none": the checkpoint holds the trained weights; never reach for a hub here. weights_only:
        # a user-given file (distill.teacher_checkpoint) must not run code; our checkpoints hold plain values only
        teacher = TeacherClassifier.load_from_checkpoint(path, map_location="cpu", pretrained="none",
                                                         pretrained_path=None, weights_only=True).net
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    # The teacher is frozen and lives in its own checkpoint: keep it out of the student's files,
    # and put it back before a checkpoint's state dict is loaded so strict loading still checks
    # every student key.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # dropout/BN statistics of the teacher must not change while distilling
        return self

    def forward(self, image: Tensor, topo: Tensor | None = None) -> Tensor:
        return self.net(image, topo)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.net(batch["image"], batch["topo"])

    def example_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if self.net.uses_topology:
            return batch["image"][:1], batch["topo"][:1]
        return (batch["image"][:1],)

    @property
    def alpha(self) -> float:
        if self.teacher is None:
            return 0.0
        return linear_alpha(self.current_epoch, self.trainer.max_epochs, self.alpha_start, self.alpha_end)

    def _fits_thresholds(self) -> bool:
        """A regression/ordinal head whose decoder this module can still set (not a QAT-prepared graph)."""
        return getattr(self.net, "decoder", None) is not None and hasattr(self.net, "raw_outputs")

    def _raw_outputs(self, image: Tensor, topo: Tensor | None) -> tuple[Tensor, str]:
        """The head's raw outputs and the head they belong to. A QAT-prepared network (``student_qat``) only has
        its traced ``forward``, the decoded class logits: it fine-tunes on their cross-entropy, which for the
        threshold heads is the likelihood of the fitted adjacent-category model."""
        if hasattr(self.net, "raw_outputs"):
            return self.net.raw_outputs(image, topo), self.head
        return self.net(image, topo), CLASSIFICATION

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, topo, target = batch["image"], batch["topo"], batch["label"]
        # Both views in one forward pass: one backbone call instead of two on a 2-core CPU.
        # Persistent homology is invariant to 90-degree rotation, so the rotated view keeps its features.
        both, head = self._raw_outputs(with_rotated_view(image, self.channels_last),
                                       torch.cat([topo, topo]) if self.net.uses_topology else None)
        raw, raw_rotated = both.chunk(2)
        alpha = self.alpha
        if self.teacher is not None:
            if "teacher_logits" in batch:  # offline distillation (callbacks.offline_distillation): cached targets
                teacher_logits = batch["teacher_logits"]
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(image)
            loss, kd, supervised = head_distillation_loss(
                raw, teacher_logits, target, head, self.num_classes, temperature=self.temperature, alpha=alpha,
                class_weights=self.class_weights, label_smoothing=self.label_smoothing)
            self.log("train/kd", kd, batch_size=len(target))
        else:
            supervised = head_supervised_loss(raw, target, head, self.num_classes, self.class_weights,
                                              self.label_smoothing)
            loss = supervised
        consistency = head_consistency_loss(raw, raw_rotated, head)
        loss = loss + self.consistency_weight * consistency
        # train/ce keeps its name for every head (the supervised term): runs of different heads share one chart
        self.log_dict({"train/ce": supervised, "train/consistency": consistency, "train/alpha": alpha},
                      batch_size=len(target))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    # ------------------------------------------------------------- thresholds of regression / ordinal heads
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not self._fits_thresholds():
            return super().validation_step(batch, batch_idx)
        raw = self.net.raw_outputs(batch["image"], batch["topo"])
        self._val_scores.append(continuous_grade(raw, self.head).detach().float())
        self._val_labels.append(batch["label"].detach())
        self.log("val/loss", head_supervised_loss(raw, batch["label"], self.head, self.num_classes),
                 batch_size=len(raw))

    def on_validation_epoch_end(self) -> None:
        if self._fits_thresholds() and self._val_scores:
            scores, labels = self._gathered_validation()
            if not self.trainer.sanity_checking:  # two sanity batches are no basis for thresholds
                thresholds = fit_qwk_thresholds(scores.cpu().numpy(), labels.cpu().numpy(), self.num_classes)
                scale = fit_decoder_scale(scores.cpu().numpy(), labels.cpu().numpy(), thresholds)
                self.net.decoder.set_fit(thresholds, scale)
                self.log_dict({f"val/threshold_{k + 1}": float(t) for k, t in enumerate(thresholds)})
                self.log("val/decoder_scale", scale)
            self.val_metrics.update(self.net.decoder(scores).softmax(dim=1), labels)
        super().on_validation_epoch_end()

    def _gathered_validation(self) -> tuple[Tensor, Tensor]:
        """This epoch's validation scores and labels from every process (the thresholds must agree on all)."""
        scores, labels = torch.cat(self._val_scores), torch.cat(self._val_labels)
        self._val_scores, self._val_labels = [], []
        if self.trainer.world_size > 1:
            scores, labels = self.all_gather(scores).reshape(-1), self.all_gather(labels).reshape(-1)
        return scores, labels
