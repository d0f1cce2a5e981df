"""Decision thresholds for a continuous grade, fitted to maximise quadratic weighted kappa: pure numpy functions.

A regression or ordinal head predicts a continuous grade; rounding it at 0.5, 1.5, ... is rarely what
maximises QWK (a head trained with MSE on imbalanced grades pulls its outputs towards the frequent ones). The
APTOS 2019 solutions fitted the four cut points on held-out data; :func:`fit_qwk_thresholds` does that by exact
coordinate ascent. Written here because no maintained library offers it: scikit-learn's
``TunedThresholdClassifierCV`` fits one binary threshold, and Nelder-Mead (the Kaggle ``OptimizedRounder``)
wanders on a piecewise-constant objective and can return unordered cut points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def quadratic_weighted_kappa(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (equal to scikit-learn's ``cohen_kappa_score(weights="quadratic")``
    with ``labels=range(num_classes)``), from one bincount: the threshold search calls it thousands of times.
    0 when the expected disagreement is 0 (a single grade in both)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    observed = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
    total = observed.sum()
    if total == 0:
        return 0.0
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    denominator = float((weights * expected).sum())
    if denominator == 0:
        return 0.0
    return 1.0 - float((weights * observed).sum()) / denominator


def grades_from_scores(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The grade of each continuous score: how many thresholds lie strictly below it (a score equal to a
    threshold stays in the lower grade, as :class:`~lightning_modules.nets.grading_head.GradeDecoder`'s argmax)."""
    return np.searchsorted(np.asarray(thresholds, dtype=np.float64), np.asarray(scores, dtype=np.float64),
                           side="left").astype(np.int64)


def _check_inputs(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"scores and labels must be two non-empty vectors of one length, got {scores.shape} and "
                         f"{labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values: the network diverged")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{labels.min()}, {labels.max()}]")
    return scores, labels


def fit_qwk_thresholds(scores: np.ndarray, labels: np.ndarray, num_classes: int, max_sweeps: int = 20,
                       ) -> np.ndarray:
    """K-1 increasing thresholds on continuous ``scores`` that maximise QWK against ``labels``.

    Coordinate ascent from rounding (0.5, 1.5, ...): each threshold in turn is moved to the best cut point
    between its neighbours, where the candidates are the midpoints between consecutive distinct scores (QWK
    only changes there). It stops when a sweep changes nothing; the QWK never decreases, so the result is at
    least as good as rounding on the fitting data. A threshold only moves for a strict gain, and a tie goes to
    the candidate nearest its current value, so the fit is deterministic and stays near rounding on flat
    stretches. With fewer than two grades present there is nothing to fit and rounding is returned.
    """
    scores, labels = _check_inputs(scores, labels, num_classes)
    thresholds = np.arange(num_classes - 1, dtype=np.float64) + 0.5
    if np.unique(labels).size < 2:
        return thresholds
    distinct = np.unique(scores)
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    # cut points beyond every score too: a grade may end up predicted for no image
    candidates = np.concatenate([[distinct[0] - 1.0], midpoints, [distinct[-1] + 1.0]])
    best = quadratic_weighted_kappa(labels, grades_from_scores(scores, thresholds), num_classes)
    for _ in range(max_sweeps):
        changed = False
        for k in range(num_classes - 1):
            low = thresholds[k - 1] if k > 0 else -np.inf
            high = thresholds[k + 1] if k < num_classes - 2 else np.inf
            options = candidates[(candidates > low) & (candidates < high)]
            if options.size == 0:
                continue
            trial = np.repeat(thresholds[None, :], options.size, axis=0)
            trial[:, k] = options
            kappas = np.array([quadratic_weighted_kappa(labels, grades_from_scores(scores, t), num_classes)
                               for t in trial])
            top = kappas.max()
            if top > best + 1e-12:
                winners = options[kappas >= top - 1e-12]
                thresholds[k] = winners[np.argmin(np.abs(winners - thresholds[k]))]
                best = top
                changed = True
        if not changed:
            break
    return thresholds


def adjacent_category_log_probabilities(scores: np.ndarray, thresholds: Sequence[float], scale: float) -> np.ndarray:
    """(N, K) log-probabilities of the adjacent-category model ``log P(k)/P(k-1) = (s - t_k) / scale``: the
    softmax of :class:`~lightning_modules.nets.grading_head.GradeDecoder`'s logits, in numpy."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    steps = np.arange(thresholds.size + 1)
    offsets = np.concatenate([[0.0], np.cumsum(thresholds)])
    return log_softmax((scores[:, None] * steps - offsets) / scale, axis=1)


def fit_decoder_scale(scores: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
                      bounds: tuple[float, float] = (1e-3, 1e2)) -> float:
    """The ``scale`` of the adjacent-category model that minimises the negative log-likelihood of ``labels``:
    post-hoc calibration of the probabilities (one parameter, like temperature scaling); it never changes a
    decision, which the thresholds alone make. Searched on log(scale), bounded so that a perfectly separated
    fitting set cannot drive it to zero."""
    scores, labels = _check_inputs(scores, labels, len(thresholds) + 1)

    def negative_log_likelihood(log_scale: float) -> float:
        log_p = adjacent_category_log_probabilities(scores, thresholds, float(np.exp(log_scale)))
        return -float(log_p[np.arange(labels.size), labels].mean())

    result = minimize_scalar(negative_log_likelihood, bounds=tuple(np.log(bounds)), method="bounded")
    return float(np.exp(result.x))
