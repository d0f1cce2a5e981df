"""``make evaluate`` for optic-disc models: every image/mask pair of a disc folder through the deployment bundle.

Each photograph goes through ``compression.deploy.Predictor`` (the bundle's preprocessing, photograph check and
threshold, as ``make predict``), and its mask is scored against the reference mask **at the photograph's own
size** (``lightning_modules.seg_metrics``: Dice, IoU, precision, recall, HD95 in photograph pixels, false
detections). The reference masks are thresholded as in training (``data.mask_threshold``, ``data.resize_masks``).
Nothing a folder holds is fatal once the folder is a disc folder: unpaired files, unreadable or non-fundus
photographs, masks of another size or with no disc are listed with their reason and counted.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm import tqdm

from compression.deploy import Predictor
from datamodules.disc_crops import FOUND, NO_DISC, SEVERAL
from datamodules.disc_index import InvalidMaskError, read_disc_mask
from datamodules.photograph import NotAFundusError, UnreadableImageError
from lightning_modules.seg_metrics import SegmentationScores, batch_statistics, prefixed

log = logging.getLogger(__name__)

NOT_SCORED_COLUMNS = ["sample_id", "path", "status", "reason"]
#: the per-image table's score columns, in order
PER_IMAGE_SCORES = ("dice", "iou", "precision", "recall", "pixel_accuracy", "hd95", "false_detections",
                    "prediction_count", "detected")
#: the reference mask's outline on the overlays (the prediction is tinted and outlined in green)
REFERENCE_COLOUR = (255, 0, 255)


@dataclass
class MasksScored:
    """Per-image scores of the scored pairs, the files not scored (with reasons), the time the scoring took and
    the overlays of the worst images (lowest Dice first)."""

    per_image: pd.DataFrame
    not_scored: pd.DataFrame
    seconds: float
    scores: SegmentationScores
    worst: list[tuple[float, str, np.ndarray]] = field(default_factory=list)


def comparison_overlay(prediction_overlay: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The prediction's overlay (tinted disc, green outline) with the reference mask's outline in magenta."""
    overlay = prediction_overlay.copy()
    contours, _ = cv2.findContours((reference > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, REFERENCE_COLOUR, thickness=max(1, round(min(reference.shape) / 300)))
    return overlay


def score_pairs(predictor: Predictor, pairs: pd.DataFrame, mask_threshold: float = 0.5,
                resize_masks: bool = False, worst_count: int = 8) -> MasksScored:
    """Every pair of ``pairs`` (``sample_id, image_path, mask_path``) through ``predictor``, scored at the
    photograph's size. A pair that cannot be scored is listed (``skipped``: unusable photograph or mask;
    ``failed``: anything else), never raised."""
    scores = SegmentationScores()
    rows, not_scored = [], []
    worst: list[tuple[float, int, str, np.ndarray]] = []  # a heap of the lowest Dice: (-dice, order, name, overlay)
    order = itertools.count()
    started = time.perf_counter()
    for row in tqdm(pairs.itertuples(), total=len(pairs), desc=f"evaluating ({predictor.precision})",
                    unit="image", file=sys.stderr, dynamic_ncols=True):
        try:
            prediction = predictor.predict_file(row.image_path)
            reference = read_disc_mask(row.mask_path, prediction.mask.shape, mask_threshold, resize_masks,
                                       Path(row.image_path).name)
        except (UnreadableImageError, NotAFundusError, InvalidMaskError) as error:
            reason = str(error)
            for path in (row.image_path, row.mask_path):
                reason = reason.removeprefix(f"{path}: ")
            not_scored.append((row.sample_id, row.image_path, "skipped", reason))
            continue
        except Exception as error:  # one bad file must not cost the rest of the set its scores
            log.debug("Evaluating %s failed", row.image_path, exc_info=True)
            not_scored.append((row.sample_id, row.image_path, "failed", f"{type(error).__name__}: {error}"))
            continue
        predicted, truth = prediction.mask > 0, reference > 0
        # scored once: the per-image row and the aggregate share the statistics
        predicted_batch, truth_batch = torch.from_numpy(predicted)[None], torch.from_numpy(truth)[None]
        batch = batch_statistics(predicted_batch, truth_batch)
        scores.update(predicted_batch, truth_batch, statistics=batch)
        statistics = {name: float(batch[name][0]) for name in PER_IMAGE_SCORES}
        height, width = truth.shape
        rows.append({"image": Path(row.image_path).name, "sample_id": row.sample_id,
                     **{name: statistics[name] for name in PER_IMAGE_SCORES},
                     "height": height, "width": width, "latency_ms": prediction.latency_ms,
                     "first_pass": prediction.first_pass})
        if worst_count > 0:
            entry = (-statistics["dice"], next(order), Path(row.image_path).name,
                     comparison_overlay(prediction.overlay, reference))
            (heapq.heappush if len(worst) < worst_count else heapq.heappushpop)(worst, entry)
    seconds = time.perf_counter() - started
    per_image = pd.DataFrame(rows, columns=["image", "sample_id", *PER_IMAGE_SCORES, "height", "width",
                                            "latency_ms", "first_pass"])
    ranked = sorted(((-negative, name, overlay) for negative, _, name, overlay in worst), key=lambda e: e[0])
    return MasksScored(per_image, pd.DataFrame(not_scored, columns=NOT_SCORED_COLUMNS), seconds, scores, ranked)


def mask_metrics(scored: MasksScored, n_resamples: int = 1000, confidence_level: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """``test/*`` of :class:`lightning_modules.seg_metrics.SegmentationScores` (the names every disc stage logs),
    and a bootstrap interval (over images) of the mean Dice: ``test/dice_ci_low`` / ``_high``."""
    metrics = prefixed(scored.scores.compute(), "test")
    dice = scored.per_image["dice"].to_numpy(dtype=np.float64)
    if len(dice) >= 2 and np.ptp(dice) > 0:
        interval = stats.bootstrap((dice,), np.mean, n_resamples=n_resamples, confidence_level=confidence_level,
                                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        metrics["test/dice_ci_low"], metrics["test/dice_ci_high"] = float(interval.low), float(interval.high)
    elif len(dice):
        metrics["test/dice_ci_low"] = metrics["test/dice_ci_high"] = float(dice[0])
    outcomes = scored.per_image["first_pass"].fillna("")
    if (outcomes != "").any():  # a two-pass bundle: how often the first pass found one disc
        metrics |= {f"test/first_pass_{'_'.join(status.split())}": float((outcomes == status).sum())
                    for status in (FOUND, NO_DISC, SEVERAL)}
    return metrics
