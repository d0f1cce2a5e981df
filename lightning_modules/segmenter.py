"""Optic-disc segmentation LightningModule: the VGG16-style U-Net (or a transformer), BCE + Dice, the metrics.

The networks (``lightning_modules.nets.vgg_unet``, ``lightning_modules.nets.transformer_seg``), the losses
(``lightning_modules.losses``) and the metrics (``lightning_modules.seg_metrics``) are plain and tested on
their own; this class wires them to Lightning. The compression steps (pruning, distillation, hard-example
replay, dropout toggling) are callbacks that act on this module through three small surfaces:

* ``self.net`` is the deployable network, replaced in place by a pruning callback;
* a batch may carry ``teacher_logits`` (put there by the distillation callback): the loss then mixes
  pixel-wise KD with weight ``kd_alpha``;
* ``training_step`` returns the per-sample losses and dataset indices the replay buffer ranks by.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning import LightningModule
from torch import Tensor

from datamodules.disc_crops import FOUND, NO_DISC, SEVERAL, CoarseToFine
from datamodules.fundus import SquareCrop, mask_on_source
from datamodules.optic_disc import (
    DISC_TASK,
    SOURCE_CROP_KEY,
    SOURCE_IMAGE_KEY,
    SOURCE_MASK_KEY,
    DiscPreprocessing,
    coarse_to_fine_from_spec,
    coarse_to_fine_mask,
    disc_preprocessing_from_spec,
)
from lightning_modules.losses import bce_dice_loss_per_sample, mask_distillation_loss_per_sample
from lightning_modules.nets.networks import (
    ARCHITECTURES,
    VGG_UNET,
    SegmentationNet,
    architecture_of,
    load_network,
    network_from_spec,
)
from lightning_modules.nets.transformer_seg import ARCHITECTURE as TRANSFORMER
from lightning_modules.nets.transformer_seg import DEFAULT_DECODER_DIM, DEFAULT_ENCODER, TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet, load_vgg16_encoder
from lightning_modules.optim import adamw_one_cycle
from lightning_modules.seg_metrics import SegmentationScores, binarize, prefixed

log = logging.getLogger(__name__)


def _metric_name(status: str) -> str:
    """``"no disc found"`` -> ``"no_disc_found"``."""
    return "_".join(status.split())


#: checkpoint key of the network's width spec: a pruned network no longer matches ``base``
NETWORK_SPEC_KEY = "network_spec"


class DiscSegmenter(LightningModule):
    """A VGG16-style encoder-decoder (or a transformer) trained with BCE + Dice (plus mask KD with a teacher).

    Args:
        architecture: ``"vgg_unet"`` (``VGGUNet``: ``base``, ``batch_norm``, ``vgg16_weights``) or
            ``"transformer"`` (``TransformerSegNet``: ``encoder``, ``decoder_dim``, ``encoder_weights``); the
            other architecture's arguments are ignored.
        base: width of the first block (64, 32, 16, 8 ...); ignored when ``network_path`` is given (and by
            the transformer, whose config sets it to None).
        dropout: VGGUNet: dropout after every activation except in the last block; transformer: before its
            logits conv.
        vgg16_weights: a torchvision-layout ImageNet VGG16 state dict for encoder blocks 1-4 (base 64 only).
        encoder, decoder_dim: the transformer's timm encoder (``features_only``-capable) and decoder width.
        encoder_weights: a local timm state dict of the transformer's whole encoder model; None: from scratch.
        network_path: start from a saved network (``save_network``), e.g. the previous iteration's, instead
            of building a fresh one; it must be of ``architecture``.
        kd_alpha, kd_temperature: weight and temperature of the pixel-wise KD term; used only on batches
            that carry ``teacher_logits``.
        threshold: probability above which a pixel is disc, for every metric.
    """

    def __init__(
        self,
        base: int | None = 64,
        dropout: float = 0.3,
        batch_norm: bool = True,
        vgg16_weights: str | None = None,
        network_path: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pct_start: float = 0.2,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        kd_alpha: float = 0.5,
        kd_temperature: float = 2.0,
        threshold: float = 0.5,
        channels_last: bool = True,
        architecture: str = VGG_UNET,
        encoder: str = DEFAULT_ENCODER,
        decoder_dim: int = DEFAULT_DECODER_DIM,
        encoder_weights: str | None = None,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}: choose one of {list(ARCHITECTURES)}")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha={kd_alpha}: the KD weight must lie in [0, 1]")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature={kd_temperature} must be positive")
        self.save_hyperparameters()
        self.net = self._build_network(architecture, network_path, base=base, dropout=dropout,
                                       batch_norm=batch_norm, vgg16_weights=vgg16_weights, encoder=encoder,
                                       decoder_dim=decoder_dim, encoder_weights=encoder_weights)
        self.lr, self.weight_decay, self.pct_start = lr, weight_decay, pct_start
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self.threshold = threshold
        self.channels_last = channels_last
        self.val_scores = SegmentationScores()
        # test/* scores the mask drawn on the photograph itself (its own size, as the clinic sees it);
        # test_net/* the network's square output against the resized mask
        self.test_scores = SegmentationScores()
        self.test_net_scores = SegmentationScores()
        self.edge_scores = SegmentationScores()
        self.test_results: dict[str, float] = {}
        self.test_per_image: list[dict[str, float]] = []
        self._scored_at_source = True
        self._second_pass: tuple[DiscPreprocessing, CoarseToFine] | None = None
        self._first_pass_outcomes: dict[str, int] = {}

    @staticmethod
    def _build_network(architecture: str, network_path: str | None, *, base: int | None, dropout: float,
                       batch_norm: bool, vgg16_weights: str | None, encoder: str, decoder_dim: int,
                       encoder_weights: str | None) -> SegmentationNet:
        if network_path:
            net = load_network(network_path)
            loaded = architecture_of(net.spec())
            if loaded != architecture:
                raise ValueError(f"network_path={network_path} holds a {loaded} network but "
                                 f"architecture={architecture!r}: set architecture={loaded!r} (the segmenter "
                                 "config of the stage that saved it)")
            log.info("Network loaded from %s (%s)", network_path,
                     f"widths of base {net.base}" if isinstance(net, VGGUNet) else net.spec())
            return net
        if architecture == TRANSFORMER:
            net = TransformerSegNet(encoder=encoder, decoder_dim=decoder_dim, dropout=dropout,
                                    pretrained_path=encoder_weights)
            if encoder_weights:
                log.info("Transfer learning: %s", net.pretrained_report)
            else:
                log.info("The %s encoder of the transformer segmenter starts from scratch (no "
                         "encoder_weights given)", encoder)
            return net
        net = VGGUNet(base=base, dropout=dropout, batch_norm=batch_norm)
        if vgg16_weights:
            log.info("Transfer learning: %s", load_vgg16_encoder(net, vgg16_weights))
        else:
            log.info("Encoder of the base-%d network starts from scratch (no model.vgg16_weights given)", base)
        return net

    # ------------------------------------------------------------------ checkpoints of pruned nets
    # A pruned network has the widths of a smaller base, not of ``hparams.base``: the spec travels with
    # the weights and the network is rebuilt from it (of its architecture) before the state dict is loaded.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[NETWORK_SPEC_KEY] = self.net.spec()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        spec = checkpoint.get(NETWORK_SPEC_KEY)
        if spec is not None and spec != self.net.spec():
            self.net = network_from_spec(spec).to(self.device)
            if self.channels_last:
                self.net.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------------------------- plumbing
    # oneDNN runs 3x3 convolutions natively on NHWC: on this project's 2-core CPU a channels-last
    # base-64 training step is faster than NCHW (see lightning_modules/classifier.py for the numbers).
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        if self.channels_last and "image" in batch:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)

    def example_inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return (batch["image"][:1],)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        logits = self.net(batch["image"])
        per_sample = bce_dice_loss_per_sample(logits, batch["mask"], self.bce_weight, self.dice_weight)
        loss = per_sample.mean()
        teacher_logits = batch.get("teacher_logits")
        if teacher_logits is not None and self.kd_alpha > 0:
            kd = mask_distillation_loss_per_sample(logits, teacher_logits, self.kd_temperature)
            self.log("train/kd", kd.mean(), batch_size=len(kd))
            self.log("train/seg_loss", loss, batch_size=len(kd))
            per_sample = (1.0 - self.kd_alpha) * per_sample + self.kd_alpha * kd
            loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(per_sample))
        return {"loss": loss, "per_sample_loss": per_sample.detach(), "index": batch["index"]}

    # -------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_scores, "val")

    def on_validation_epoch_end(self) -> None:
        results = prefixed(self.val_scores.compute(), "val")
        self.val_scores.reset()
        dice = results.pop("val/dice")
        self.log_dict(results)
        self.log("val/dice", dice, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        # dataloader 0: the held-out test split; 1 (when the datamodule has one): the hard-case set
        if dataloader_idx == 0:
            logits = self._evaluate(batch, self.test_net_scores, "test_net")
            self._score_at_source(self.test_scores, logits, batch, batch.get("hard"))
        else:
            logits = self.net(batch["image"])
            self._score_at_source(self.edge_scores, logits, batch,
                                  torch.ones(len(logits), dtype=torch.bool, device=logits.device), test_split=False)

    def _evaluate(self, batch: dict[str, Tensor], scores: SegmentationScores, prefix: str) -> Tensor:
        """Loss and scores at the network's resolution; the logits, for scoring elsewhere too."""
        logits = self.net(batch["image"])
        loss = bce_dice_loss_per_sample(logits, batch["mask"], self.bce_weight, self.dice_weight).mean()
        self.log(f"{prefix}/loss", loss, batch_size=len(logits), add_dataloader_idx=False)
        scores.update(binarize(logits, self.threshold), batch["mask"] > 0.5, batch.get("hard"))
        return logits

    def _score_at_source(self, scores: SegmentationScores, logits: Tensor, batch: dict, hard: Tensor | None,
                         test_split: bool = True) -> None:
        """Score each image's mask at its photograph's own size (``DiscDataModule`` test loaders carry the
        original masks), after a coarse-to-fine second pass when the data module asks for one (its batches then
        carry the photographs too); a loader without them is scored at the network's resolution, and says so.
        The first pass's outcomes are counted on the test split only (``test_split``)."""
        sources = batch.get(SOURCE_MASK_KEY)
        if sources is None:
            self._scored_at_source = False
            scores.update(binarize(logits, self.threshold), batch["mask"] > 0.5, hard)
            return
        probabilities = torch.sigmoid(logits.detach().float())[:, 0].cpu().numpy()
        boxes = batch[SOURCE_CROP_KEY].tolist()
        photographs = batch.get(SOURCE_IMAGE_KEY)
        for position, (probability, source, box) in enumerate(zip(probabilities, sources, boxes, strict=True)):
            photograph = None if photographs is None else photographs[position].cpu().numpy()
            predicted, status = self._mask_on_source(probability, SquareCrop(*box), photograph)
            if status is not None and test_split:  # the hard-case set's images are counted in their own split
                self._first_pass_outcomes[status] = self._first_pass_outcomes.get(status, 0) + 1
            flag = None if hard is None else hard[position : position + 1].cpu()
            scores.update(torch.from_numpy(predicted)[None], source.cpu()[None] > 0, flag)

    def _mask_on_source(self, probability: np.ndarray, crop: SquareCrop,
                        photograph: np.ndarray | None) -> tuple[np.ndarray, str | None]:
        """The binary mask at the photograph's size from the first pass's (S, S) ``probability``: after a
        second pass on ``photograph`` when the test has one (with the first pass's outcome), else pasted back
        (outcome ``None``)."""
        if self._second_pass is not None and photograph is not None:
            preprocessing, settings = self._second_pass
            predicted, search = coarse_to_fine_mask(photograph, probability, crop, preprocessing, settings,
                                                    self.threshold, self._probability_map)
            return predicted, search.status
        return mask_on_source(probability, crop, self.threshold), None

    def predict_on_source(self, image: Tensor, photograph: np.ndarray, crop: SquareCrop) -> np.ndarray:
        """One test image's predicted mask at its photograph's (H0, W0) size, exactly as ``test/*`` scores it:
        ``image`` is the network's (3, S, S) input, ``crop`` the box it was cut from (for overlays)."""
        was_training = self.net.training
        self.net.eval()
        try:
            return self._mask_on_source(self._probability_map(image[None]), crop, photograph)[0]
        finally:
            self.net.train(was_training)

    @torch.no_grad()
    def _probability_map(self, image: Tensor) -> np.ndarray:
        """The network's (S, S) disc probabilities of one (1, 3, S, S) input (the second pass)."""
        image = image.to(self.device)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.net(image).float())[0, 0].cpu().numpy()

    def on_test_start(self) -> None:
        # the two-pass settings travel with the data (they are also what the deployment bundle records)
        self._second_pass = None
        trainer = getattr(self, "_trainer", None)
        spec_of = getattr(getattr(trainer, "datamodule", None), "inference_spec", None)
        spec = spec_of() if callable(spec_of) else None
        if spec and spec.get("task") == DISC_TASK:
            settings = coarse_to_fine_from_spec(spec)
            if settings.enabled:
                self._second_pass = (disc_preprocessing_from_spec(spec), settings)

    def on_test_epoch_start(self) -> None:
        self._scored_at_source = True
        self._first_pass_outcomes = {}

    def on_test_epoch_end(self) -> None:
        results = prefixed(self.test_scores.compute(), "test")
        results |= prefixed(self.test_net_scores.compute(), "test_net")
        results["test/at_source_resolution"] = float(self._scored_at_source)
        results["test/coarse_to_fine"] = float(self._second_pass is not None)
        if self._second_pass is not None:
            # the first pass's outcomes per test image: with no disc or several, the whole-photograph mask is kept
            statuses = (FOUND, NO_DISC, SEVERAL)
            counts = torch.tensor([self._first_pass_outcomes.get(status, 0) for status in statuses],
                                  dtype=torch.float64, device=self.device)
            trainer = getattr(self, "_trainer", None)
            if trainer is not None:  # each process counted its own share of the test images
                counts = trainer.strategy.reduce(counts, reduce_op="sum")
            results |= {f"test/first_pass_{_metric_name(status)}": float(count)
                        for status, count in zip(statuses, counts.tolist(), strict=True)}
        self.test_per_image = self.test_scores.per_image()
        self.test_scores.reset()
        self.test_net_scores.reset()
        if self.edge_scores.update_count > 0:
            edge = self.edge_scores.compute()
            results |= {
                "test/edge_case_detection": float(edge["edge_case_detection"]),
                "test/edge_case_recall": float(edge["edge_case_recall"]),
                "test/edge_case_dice": float(edge["dice"]),
                "test/edge_case_images": float(edge["images"]),
            }
            self.edge_scores.reset()
        self.test_results = results
        self.log_dict(results, add_dataloader_idx=False)

    # --------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        return adamw_one_cycle(self.net.parameters(), self.lr, self.weight_decay, self.pct_start,
                               self.trainer.estimated_stepping_batches)
