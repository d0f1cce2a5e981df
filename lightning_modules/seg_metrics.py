"""Optic-disc segmentation metrics: per-image mask statistics and a DDP-safe torchmetrics aggregate.

The disc covers 2-5% of a fundus photograph, so pixel accuracy alone flatters an all-background
prediction (~97%); Dice and IoU lead the tables, with HD95 for boundary quality and connected-component
counts for spurious blobs. Everything here is a pure function or a plain ``torchmetrics.Metric``, testable
without a Trainer.

Empty-mask conventions (``T`` = true disc pixels, ``P`` = predicted pixels):

- both empty: dice = iou = precision = recall = 1 (nothing to find, nothing found), hd95 = 0;
- exactly one empty (a missed disc, or a disc hallucinated on an image without one): dice = iou =
  precision = recall = 0 and hd95 = the image diagonal sqrt(H^2 + W^2). The 0/0 that precision (P empty) or
  recall (T empty) would give is scored 0, not 1, so a failed image scores worst on every metric instead
  of lifting the mean precision of a model that predicts nothing;
- pixel accuracy is always defined.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_stat_scores
from torchmetrics.utilities import dim_zero_cat

OVERLAP_NAMES = ("dice", "iou", "precision", "recall", "pixel_accuracy")
# Columns of the per-image integer row the metric keeps (never the masks themselves).
_COUNT_COLUMNS = ("tp", "fp", "fn", "tn", "prediction_count", "false_detections", "hard")

# 8-connectivity: diagonal neighbours belong to the same blob, and "touching the disc" includes a corner.
_EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)
# MedPy / MONAI take a mask's boundary as the pixels removed by one erosion with the 4-connected cross.
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def binarize(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Bool mask ``sigmoid(logits) > threshold`` (strictly greater, as torchmetrics thresholds).

    With the default 0.5 a logit of exactly 0 is background. The sigmoid is applied rather than comparing
    logits with ``logit(threshold)`` so that ``threshold`` reads as a probability in configs.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a probability and must lie in (0, 1), got {threshold}")
    return torch.sigmoid(logits) > threshold


def _check_binary(mask: Tensor, name: str) -> None:
    if mask.dtype == torch.bool:
        return
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            f"{name} must hold only 0/1 or bool values, got values in [{mask.min().item()}, {mask.max().item()}]; "
            "convert logits with binarize(logits) first"
        )


def _as_mask_batch(masks: Tensor | np.ndarray, name: str) -> Tensor:
    """(B, 1, H, W) or (B, H, W) 0/1 masks -> bool (B, H, W)."""
    masks = torch.as_tensor(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(
            f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(masks.shape)}; "
            "one-channel masks only (a multi-class output must be split per class first)"
        )
    _check_binary(masks, name)
    return masks.bool()


def _as_mask(mask: Tensor | np.ndarray, name: str) -> Tensor:
    """(H, W) 0/1 mask -> bool (1, H, W), a batch of one."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a single (H, W) mask, got shape {tuple(mask.shape)}")
    _check_binary(mask, name)
    return mask.bool().unsqueeze(0)


def _check_same_shape(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target masks must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}; "
            "resize the prediction to the mask's resolution before scoring"
        )


def _safe_ratio(numerator: Tensor, denominator: Tensor, if_zero: Tensor) -> Tensor:
    numerator, denominator = numerator.float(), denominator.float()
    defined = denominator > 0
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), if_zero.float())


def overlap_scores(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, Tensor]:
    """Dice, IoU, precision, recall and pixel accuracy from confusion counts, elementwise.

    Works on per-image counts (a value per image) and on pooled sums alike. The empty-mask
    conventions are those of the module docstring; torchmetrics' ``zero_division`` is a single constant
    and cannot express "1 when both are empty, 0 when one is", hence the explicit ``where``.
    """
    tp, fp, fn, tn = (torch.as_tensor(count) for count in (tp, fp, fn, tn))
    both_empty = (tp + fp + fn) == 0
    return {
        "dice": _safe_ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _safe_ratio(tp, tp + fp + fn, both_empty),
        # tp + fp == 0 means nothing was predicted: right only if there was nothing to find (fn == 0).
        "precision": _safe_ratio(tp, tp + fp, fn == 0),
        # tp + fn == 0 means there was nothing to find: right only if nothing was predicted (fp == 0).
        "recall": _safe_ratio(tp, tp + fn, fp == 0),
        "pixel_accuracy": _safe_ratio(tp + tn, tp + fp + fn + tn, torch.ones_like(both_empty)),
    }


def component_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(prediction count, additional false detections) of one (H, W) bool mask pair.

    Prediction count is the number of 8-connected predicted blobs. A blob is a false detection when
    none of its pixels lies in the true disc dilated by one pixel (3x3), i.e. it neither overlaps nor
    touches the disc, even at a corner. With an empty target every blob is a false detection.
    """
    labels, prediction_count = ndimage.label(pred, structure=_EIGHT_CONNECTED)
    near_disc = ndimage.binary_dilation(target, structure=_EIGHT_CONNECTED)
    touching = np.unique(labels[near_disc & pred])
    return int(prediction_count), int(prediction_count - touching.size)


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Pixels on the image edge count as boundary (erosion pads with background), as in MedPy.
    return mask & ~ndimage.binary_erosion(mask, structure=_FOUR_CONNECTED, border_value=0)


def hd95(pred: np.ndarray | Tensor, target: np.ndarray | Tensor) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels between two (H, W) masks (MedPy / MONAI HD95).

    The 95th percentile (numpy's linear interpolation) of the union of the distances from every boundary
    pixel of ``pred`` to the nearest boundary pixel of ``target`` and from every boundary pixel of
    ``target`` to the nearest one of ``pred``. Both empty -> 0; exactly one empty -> the image diagonal
    sqrt(H^2 + W^2), finite and larger than any distance inside the image.

    Hand-written on ``scipy.ndimage.distance_transform_edt`` because torchmetrics' ``hausdorff_distance``
    (1.9) returns only the maximum (directed or symmetric) distance, with no percentile option, and
    MedPy / MONAI are not dependencies of this project.
    """
    pred_mask, target_mask = _as_mask(pred, "pred"), _as_mask(target, "target")
    _check_same_shape(pred_mask, target_mask)
    return _hd95(pred_mask[0].cpu().numpy(), target_mask[0].cpu().numpy())


def _hd95(pred: np.ndarray, target: np.ndarray) -> float:
    pred_empty, target_empty = not pred.any(), not target.any()
    if pred_empty and target_empty:
        return 0.0
    if pred_empty or target_empty:
        return math.hypot(*pred.shape)
    pred_boundary, target_boundary = _boundary(pred), _boundary(target)
    # The EDT of the boundary's complement gives, at every pixel, the distance to the nearest boundary pixel.
    to_target = ndimage.distance_transform_edt(~target_boundary)[pred_boundary]
    to_pred = ndimage.distance_transform_edt(~pred_boundary)[target_boundary]
    return float(np.percentile(np.concatenate([to_target, to_pred]), 95))


def _stat_scores(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image (tp, fp, fn, tn) of bool (B, H, W) masks, each of shape (B,)."""
    if pred.shape[0] == 1:
        # torchmetrics 1.9 squeezes the batch axis of a one-image "samplewise" batch and then fails to stack
        # it (IndexError), which a last validation batch of one image would hit: score it globally instead.
        stats = binary_stat_scores(pred.long(), target.long(), validate_args=False).unsqueeze(0)
    else:
        # validate_args=False: shapes and 0/1 values were checked with clearer messages by the caller.
        stats = binary_stat_scores(
            pred.long(), target.long(), multidim_average="samplewise", validate_args=False
        )
    # Columns are [tp, fp, tn, fn, support].
    return stats[:, 0], stats[:, 1], stats[:, 3], stats[:, 2]


def batch_statistics(pred_masks: Tensor | np.ndarray, target_masks: Tensor | np.ndarray) -> dict[str, Tensor]:
    """Per-image statistics of a batch of (B, 1, H, W) or (B, H, W) bool / 0-1 masks, each a tensor of shape (B,).

    Keys: ``tp``, ``fp``, ``fn``, ``tn``, ``prediction_count``, ``false_detections`` (int64), ``hd95``
    (float), ``detected`` (bool: tp > 0) and the overlap scores of :func:`overlap_scores`.
    Counts come from torchmetrics on the masks' device; components and HD95 need the masks on the CPU.
    """
    pred = _as_mask_batch(pred_masks, "pred_masks")
    target = _as_mask_batch(target_masks, "target_masks")
    _check_same_shape(pred, target)
    tp, fp, fn, tn = _stat_scores(pred, target)
    pred_np, target_np = pred.cpu().numpy(), target.cpu().numpy()
    components = [component_counts(p, t) for p, t in zip(pred_np, target_np)]
    prediction_count = torch.tensor([c[0] for c in components], dtype=torch.long, device=pred.device)
    false_detections = torch.tensor([c[1] for c in components], dtype=torch.long, device=pred.device)
    distances = torch.tensor([_hd95(p, t) for p, t in zip(pred_np, target_np)], device=pred.device)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "prediction_count": prediction_count,
        "false_detections": false_detections,
        "hd95": distances.reshape(-1).float(),
        "detected": tp > 0,
        **overlap_scores(tp, fp, fn, tn),
    }


def image_statistics(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> dict[str, float]:
    """:func:`batch_statistics` of a single (H, W) mask pair, as plain Python numbers."""
    stats = batch_statistics(_as_mask(pred, "pred"), _as_mask(target, "target"))
    return {name: float(value[0]) for name, value in stats.items()}


class SegmentationScores(Metric):
    """Dice, IoU, precision, recall, accuracy, HD95 and blob counts of binary optic-disc masks.

    ``update`` scores each image at once and keeps one small row of numbers per image (in ``cat`` list
    states, so rows gather across DDP processes); the masks themselves are never stored. ``compute``
    returns, with stable names (log them with :func:`prefixed`):

    - means over images: ``dice``, ``iou``, ``precision``, ``recall``, ``pixel_accuracy``, ``hd95``;
    - ``f1`` = 2PR / (P + R) of the per-image mean precision P and recall R, as the pruning/distillation
      tables report it. It is macro on purpose: F1 of pooled counts is 2TP / (2TP + FP + FN), which is
      exactly ``dice_pooled``;
    - pooled over all pixels of all images: ``dice_pooled``, ``iou_pooled``, ``precision_pooled``,
      ``recall_pooled``, ``pixel_accuracy_pooled``;
    - sums: ``tp``, ``fp``, ``fn``, ``tn``, ``prediction_count``, ``false_detections``; and
      ``false_detections_per_image``, ``images``;
    - only when an image was flagged hard: ``edge_case_detection`` (fraction of hard images with tp > 0),
      ``edge_case_recall`` (pooled pixel recall over hard images), ``edge_case_images``.

    Empty-mask conventions are those of this module's docstring.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Integer row per image (columns _COUNT_COLUMNS) and a separate float state for HD95: pixel counts
        # stay exact in int64, and no float64 state is needed (unsupported on some accelerators).
        self.add_state("counts", default=[], dist_reduce_fx="cat")
        self.add_state("distances", default=[], dist_reduce_fx="cat")

    def update(self, pred_masks: Tensor, target_masks: Tensor, hard: Tensor | None = None,
               statistics: dict[str, Tensor] | None = None) -> None:
        """Score a batch of (B, 1, H, W) or (B, H, W) bool / 0-1 masks; ``hard`` flags edge-case images (B,).
        ``statistics``: :func:`batch_statistics` of these masks when the caller already computed them (it also
        wanted them image by image), so HD95 and the blob counts are not computed twice."""
        stats = dict(statistics) if statistics is not None else batch_statistics(pred_masks, target_masks)
        batch_size = stats["tp"].shape[0]
        if hard is None:
            hard = torch.zeros(batch_size, dtype=torch.bool)
        hard = torch.as_tensor(hard)
        if hard.shape != (batch_size,):
            raise ValueError(
                f"hard must be one flag per image, shape ({batch_size},), got {tuple(hard.shape)}"
            )
        _check_binary(hard, "hard")
        stats["hard"] = hard.to(device=self.device, dtype=torch.long)
        row = torch.stack(
            [stats[name].to(device=self.device, dtype=torch.long) for name in _COUNT_COLUMNS], dim=1
        )
        self.counts.append(row)
        self.distances.append(stats["hd95"].to(self.device))

    def _rows(self) -> tuple[dict[str, Tensor], Tensor]:
        # After a DDP sync the list states arrive already concatenated into one tensor.
        if isinstance(self.counts, list) and not self.counts:
            raise RuntimeError(
                f"{type(self).__name__} has no images: call update() with at least one batch before "
                "compute() / per_image() (an empty validation loader gives no scores)"
            )
        counts = dim_zero_cat(self.counts)
        return {name: counts[:, i] for i, name in enumerate(_COUNT_COLUMNS)}, dim_zero_cat(self.distances)

    def compute(self) -> dict[str, Tensor]:
        columns, distances = self._rows()
        tp, fp, fn, tn = (columns[name] for name in ("tp", "fp", "fn", "tn"))
        per_image = overlap_scores(tp, fp, fn, tn)
        results = {name: per_image[name].mean() for name in OVERLAP_NAMES}
        results["hd95"] = distances.float().mean()
        precision, recall = results["precision"], results["recall"]
        results["f1"] = _safe_ratio(2 * precision * recall, precision + recall, torch.zeros_like(precision))
        pooled = overlap_scores(tp.sum(), fp.sum(), fn.sum(), tn.sum())
        results |= {f"{name}_pooled": value for name, value in pooled.items()}
        images = torch.tensor(tp.shape[0], device=tp.device)
        for name in ("tp", "fp", "fn", "tn", "prediction_count", "false_detections"):
            results[name] = columns[name].sum()
        results["false_detections_per_image"] = results["false_detections"].float() / images
        results["images"] = images
        hard = columns["hard"].bool()
        if hard.any():
            results["edge_case_detection"] = (tp[hard] > 0).float().mean()
            hard_scores = overlap_scores(tp[hard].sum(), fp[hard].sum(), fn[hard].sum(), tn[hard].sum())
            results["edge_case_recall"] = hard_scores["recall"]
            results["edge_case_images"] = hard.sum()
        return results

    def per_image(self) -> list[dict[str, float]]:
        """One dict per image in update order (this process's images only), to pick best/worst overlays.

        Keys: dice, iou, precision, recall, pixel_accuracy, hd95, false_detections, prediction_count,
        detected (0/1), hard (0/1).
        """
        columns, distances = self._rows()
        scores = overlap_scores(columns["tp"], columns["fp"], columns["fn"], columns["tn"])
        table = {name: scores[name] for name in ("dice", "iou", "precision", "recall", "pixel_accuracy")}
        table |= {
            "hd95": distances.float(),
            "false_detections": columns["false_detections"],
            "prediction_count": columns["prediction_count"],
            "detected": columns["tp"] > 0,
            "hard": columns["hard"],
        }
        listed = {name: values.detach().cpu().double().tolist() for name, values in table.items()}
        return [dict(zip(listed, values)) for values in zip(*listed.values())]


def prefixed(results: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """``{"dice": tensor(0.9)}`` -> ``{"val/dice": 0.9}``: the stable MLflow names of scalar results."""
    flat: dict[str, float] = {}
    for name, value in results.items():
        value = torch.as_tensor(value).detach()
        if value.numel() != 1:
            raise ValueError(
                f"{name!r} is not a scalar (shape {tuple(value.shape)}); only scalars can be logged"
            )
        flat[f"{prefix}/{name}"] = float(value.cpu())
    return flat
