"""Loss functions and class-balance weights: pure functions, testable without a Trainer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.nets.grading_head import CLASSIFICATION, REGRESSION, check_head


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def effective_number_weights(counts: Sequence[int] | np.ndarray, beta: float = 0.999) -> np.ndarray:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c) of Cui et al. (CVPR 2019), normalised to mean 1.

    beta -> 0 gives uniform weights, beta -> 1 inverse frequency. A class with no samples gets
    weight 0 (it cannot contribute to the loss anyway) instead of a division by zero.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = np.asarray(counts, dtype=np.float64)
    effective = 1.0 - np.power(beta, counts)
    weights = np.where(counts > 0, (1.0 - beta) / np.where(effective > 0, effective, 1.0), 0.0)
    present = counts > 0
    weights[present] *= present.sum() / weights[present].sum()
    return weights


def inverse_frequency_sample_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights w_i = N / n_{y_i} for a WeightedRandomSampler: every class drawn equally often."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = class_counts(labels, num_classes)
    return len(labels) / counts[labels].astype(np.float64)


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """tau^2 * KL(softmax(T/tau) || softmax(S/tau)), averaged over the batch (Hinton et al., 2015).

    The tau^2 factor keeps the gradient scale of the soft term independent of tau.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def linear_alpha(epoch: int, max_epochs: int, start: float, end: float) -> float:
    """Distillation weight rising linearly from ``start`` (first epoch) to ``end`` (last epoch)."""
    if max_epochs <= 1:
        return float(end)
    progress = min(max(epoch / (max_epochs - 1), 0.0), 1.0)
    return float(start + (end - start) * progress)


def consistency_loss(logits: Tensor, logits_transformed: Tensor) -> Tensor:
    """Mean squared difference of class probabilities on x and on a transformed x (Laine & Aila's Pi-model).

    A squared error on probabilities, not a KL, stays bounded when one view is confidently
    wrong early in training, so it cannot swamp the supervised term.
    """
    return F.mse_loss(F.softmax(logits, dim=1), F.softmax(logits_transformed, dim=1))


# ----------------------------------------------------------------------------- grading heads
# The regression and ordinal heads (lightning_modules.nets.grading_head) need their own supervised, distillation
# and consistency terms; each function below dispatches on the head and is the classification term for a classifier.


def _sample_weights(targets: Tensor, class_weights: Tensor | None) -> Tensor:
    """Per-sample weights w_{y_i} normalised to sum 1 (uniform without class weights)."""
    if class_weights is None:
        return torch.full(targets.shape, 1.0 / targets.numel(), device=targets.device)
    weights = class_weights.to(targets.device)[targets]
    return weights / weights.sum().clamp_min(1e-12)


def ordinal_targets(targets: Tensor, num_classes: int) -> Tensor:
    """(B, K-1) binary targets "grade > k" of CORAL's K-1 tasks."""
    thresholds = torch.arange(num_classes - 1, device=targets.device)
    return (targets[:, None] > thresholds).float()


def head_supervised_loss(raw: Tensor, targets: Tensor, head: str, num_classes: int,
                         class_weights: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """The hard-label loss of a head's raw outputs: class-weighted cross-entropy (classification), MSE on the
    grade (regression: Huang et al. 2023 found it beats cross-entropy on QWK), or CORAL's summed binary
    cross-entropies (ordinal). Class weights weight each sample by its grade's weight for all three."""
    check_head(head)
    if head == CLASSIFICATION:
        return F.cross_entropy(raw, targets, weight=class_weights, label_smoothing=label_smoothing)
    weights = _sample_weights(targets, class_weights)
    if head == REGRESSION:
        per_sample = (raw[:, 0] - targets.float()) ** 2
    else:
        per_sample = F.binary_cross_entropy_with_logits(raw, ordinal_targets(targets, num_classes),
                                                        reduction="none").sum(dim=1)
    return (weights * per_sample).sum()


def head_kd_loss(raw: Tensor, teacher_logits: Tensor, head: str, temperature: float) -> Tensor:
    """Distillation from a classifier teacher's (B, K) logits into any head, zero when the student matches.

    Classification: Hinton's tau^2 KL at ``temperature``. Regression: squared error to the teacher's expected
    grade sum_k k p_k. Ordinal: the KL of the K-1 Bernoulli "grade > k" distributions, the teacher's being
    P(grade > k) = sum_{j>k} p_j. The last two use the teacher's probabilities at temperature 1: softening them
    would pull its expected grade towards the middle grade, a bias rather than "dark knowledge".
    """
    check_head(head)
    if head == CLASSIFICATION:
        return kd_kl_loss(raw, teacher_logits, temperature)
    teacher = teacher_logits.float().softmax(dim=1)
    if head == REGRESSION:
        grades = torch.arange(teacher.shape[1], dtype=teacher.dtype, device=teacher.device)
        return F.mse_loss(raw[:, 0].float(), teacher @ grades)
    # P(grade > k) = 1 - cumulative P(grade <= k), for k = 0..K-2
    above = (1.0 - teacher.cumsum(dim=1)[:, :-1]).clamp(0.0, 1.0)
    cross = F.binary_cross_entropy_with_logits(raw.float(), above, reduction="none")
    entropy = F.binary_cross_entropy(above, above, reduction="none")
    return (cross - entropy).sum(dim=1).mean()


def head_distillation_loss(raw: Tensor, teacher_logits: Tensor, targets: Tensor, head: str, num_classes: int, *,
                           temperature: float, alpha: float, class_weights: Tensor | None = None,
                           label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """L = alpha * KD + (1 - alpha) * supervised loss, for any head; returns (L, KD, supervised)."""
    kd = head_kd_loss(raw, teacher_logits, head, temperature)
    hard = head_supervised_loss(raw, targets, head, num_classes, class_weights, label_smoothing)
    return alpha * kd + (1.0 - alpha) * hard, kd, hard


def head_consistency_loss(raw: Tensor, raw_transformed: Tensor, head: str) -> Tensor:
    """:func:`consistency_loss` for any head: class probabilities (classification), the grade (regression) or the
    K-1 cumulative probabilities (ordinal) on x and on a transformed x."""
    check_head(head)
    if head == CLASSIFICATION:
        return consistency_loss(raw, raw_transformed)
    if head == REGRESSION:
        return F.mse_loss(raw[:, 0], raw_transformed[:, 0])
    return F.mse_loss(raw.sigmoid(), raw_transformed.sigmoid())


# ----------------------------------------------------------------------------- segmentation (optic disc)


def soft_dice_loss_per_sample(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice of sigmoid(logits) against a {0,1} mask, one value per image (shape (B,)).

    ``smooth`` keeps an image without disc (possible after a crop) from dividing by zero and
    makes an empty prediction on an empty mask a perfect score.
    """
    probabilities = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probabilities * target).sum(dim=1)
    total = probabilities.sum(dim=1) + target.sum(dim=1)
    return 1.0 - (2.0 * overlap + smooth) / (total + smooth)


def bce_dice_loss_per_sample(logits: Tensor, target: Tensor, bce_weight: float = 1.0,
                             dice_weight: float = 1.0) -> Tensor:
    """BCE + Dice per image (shape (B,)): BCE keeps every pixel's gradient alive, Dice ignores the 95%
    of background pixels that would otherwise let an all-background mask look good."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(dim=1)
    return bce_weight * bce + dice_weight * soft_dice_loss_per_sample(logits, target)


def mask_distillation_loss_per_sample(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Pixel-wise KD for one-channel masks: tau^2 * mean KL(Bern(sigmoid(t/tau)) || Bern(sigmoid(s/tau))), per image.

    The binary case of Hinton's KD: each pixel is a two-class distribution. The KL is written as
    BCE(student; soft target) - H(soft target), so it is exactly zero when the student matches the teacher.
    """
    soft_target = (teacher_logits / temperature).sigmoid()
    cross = F.binary_cross_entropy_with_logits(student_logits / temperature, soft_target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits / temperature, soft_target, reduction="none")
    return (cross - entropy).flatten(1).mean(dim=1) * temperature**2
