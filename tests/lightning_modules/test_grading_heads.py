"""Grading heads, their losses and distillation, and the QWK threshold fit: no Trainer needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from lightning_modules.losses import (
    head_consistency_loss,
    head_distillation_loss,
    head_kd_loss,
    head_supervised_loss,
    ordinal_targets,
)
from lightning_modules.nets.grading_head import (
    HEADS,
    GradeDecoder,
    continuous_grade,
    decode,
    output_layer,
)
from lightning_modules.ordinal import (
    adjacent_category_log_probabilities,
    fit_decoder_scale,
    fit_qwk_thresholds,
    grades_from_scores,
    quadratic_weighted_kappa,
)

K = 5


# ------------------------------------------------------------------------------------------ decoder
def test_decoder_argmax_is_the_thresholded_grade_for_uneven_thresholds():
    decoder = GradeDecoder(K)
    thresholds = [0.3, 0.9, 2.7, 3.1]
    decoder.set_fit(thresholds, scale=0.7)
    scores = torch.linspace(-1.0, 5.0, 601)
    expected = grades_from_scores(scores.numpy(), thresholds)
    assert np.array_equal(decoder(scores).argmax(dim=1).numpy(), expected)
    assert set(expected) == set(range(K))


def test_decoder_softmax_matches_the_numpy_adjacent_category_model():
    decoder = GradeDecoder(K)
    decoder.set_fit([0.4, 1.6, 2.2, 3.7], scale=0.5)
    scores = torch.tensor([-0.5, 0.5, 1.9, 3.0, 4.4])
    log_p = adjacent_category_log_probabilities(scores.numpy(), [0.4, 1.6, 2.2, 3.7], 0.5)
    assert np.allclose(decoder(scores).log_softmax(dim=1).numpy(), log_p, atol=1e-5)


def test_decoder_refuses_unordered_thresholds_and_a_bad_scale():
    decoder = GradeDecoder(K)
    with pytest.raises(ValueError, match="increasing"):
        decoder.set_fit([0.5, 2.5, 1.5, 3.5], 1.0)
    with pytest.raises(ValueError, match="scale"):
        decoder.set_fit([0.5, 1.5, 2.5, 3.5], 0.0)


def test_decoder_fit_travels_in_the_state_dict():
    decoder = GradeDecoder(K)
    decoder.set_fit([0.2, 1.1, 2.9, 3.3], 0.4)
    restored = GradeDecoder(K)
    restored.load_state_dict(decoder.state_dict())
    assert torch.equal(restored.thresholds, decoder.thresholds) and float(restored.scale) == pytest.approx(0.4)


@pytest.mark.parametrize("head, width", [("classification", K), ("regression", 1), ("ordinal", K - 1)])
def test_each_head_decodes_to_class_logits(head, width):
    layer = output_layer(16, K, head)
    raw = layer(torch.randn(3, 16))
    assert raw.shape == (3, width)
    logits = decode(raw, head, GradeDecoder(K) if head != "classification" else None)
    assert logits.shape == (3, K)


def test_ordinal_expected_grade_counts_the_passed_thresholds():
    confident = torch.tensor([[9.0, 9.0, -9.0, -9.0]])  # surely > 0 and > 1, surely not > 2
    assert float(continuous_grade(confident, "ordinal")) == pytest.approx(2.0, abs=1e-3)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        output_layer(4, K, "softmax")


# ------------------------------------------------------------------------------------- thresholds
def test_fast_qwk_equals_scikit_learn():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, K, 300), rng.integers(0, K, 300)
    predicted[:150] = labels[:150]
    assert quadratic_weighted_kappa(labels, predicted, K) == pytest.approx(
        cohen_kappa_score(labels, predicted, labels=list(range(K)), weights="quadratic"))


def test_threshold_fit_recovers_shifted_cut_points_and_never_loses_to_rounding():
    # a regressor that compresses its outputs towards the middle: rounding misses grades 0 and 4
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, 2000)
    scores = 1.0 + 0.5 * labels + rng.normal(0, 0.12, labels.size)
    thresholds = fit_qwk_thresholds(scores, labels, K)
    rounded = quadratic_weighted_kappa(labels, grades_from_scores(scores, np.arange(K - 1) + 0.5), K)
    fitted = quadratic_weighted_kappa(labels, grades_from_scores(scores, thresholds), K)
    assert np.all(np.diff(thresholds) > 0)
    assert fitted > rounded + 0.05
    assert np.allclose(thresholds, 1.25 + 0.5 * np.arange(K - 1), atol=0.1)


def test_threshold_fit_on_one_grade_returns_rounding():
    assert np.array_equal(fit_qwk_thresholds(np.array([0.1, 0.3, 0.2]), np.array([2, 2, 2]), K),
                          np.arange(K - 1) + 0.5)


def test_threshold_fit_refuses_nan_scores_and_bad_labels():
    with pytest.raises(ValueError, match="diverged"):
        fit_qwk_thresholds(np.array([0.1, np.nan]), np.array([0, 1]), K)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_qwk_thresholds(np.array([0.1, 0.2]), np.array([0, 7]), K)


def test_decoder_scale_fit_sharpens_for_separated_grades():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, K, 1000)
    thresholds = np.arange(K - 1) + 0.5
    sharp = fit_decoder_scale(labels + rng.normal(0, 0.05, labels.size), labels, thresholds)
    blurred = fit_decoder_scale(labels + rng.normal(0, 0.8, labels.size), labels, thresholds)
    assert sharp < blurred


# ------------------------------------------------------------------------------------------ losses
def test_supervised_losses_are_zero_or_small_at_the_truth():
    targets = torch.tensor([0, 2, 4])
    assert float(head_supervised_loss(targets.float()[:, None], targets, "regression", K)) == 0.0
    perfect_ordinal = (ordinal_targets(targets, K) * 2 - 1) * 20.0
    assert float(head_supervised_loss(perfect_ordinal, targets, "ordinal", K)) < 1e-6
    wrong_ordinal = -perfect_ordinal
    assert float(head_supervised_loss(wrong_ordinal, targets, "ordinal", K)) > 10


def test_class_weights_weight_regression_samples_by_their_grade():
    raw = torch.tensor([[1.0], [1.0]])  # error 1 on grade 0, error 1 on grade 2 -> equal unless weighted
    targets = torch.tensor([0, 2])
    weights = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0])
    assert float(head_supervised_loss(raw, targets, "regression", K, weights)) == pytest.approx(1.0)
    raw = torch.tensor([[2.0], [2.0]])  # error 2 on grade 0 (weight 3), error 0 on grade 2
    assert float(head_supervised_loss(raw, targets, "regression", K, weights)) == pytest.approx(3 * 4 / 4)


@pytest.mark.parametrize("head", HEADS)
def test_kd_is_zero_when_the_student_matches_its_teacher_and_positive_otherwise(head):
    teacher_logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0], [-2.0, 0.0, 2.0, 0.5, -1.0]])
    probabilities = teacher_logits.softmax(dim=1)
    if head == "classification":
        matching = teacher_logits.clone()
    elif head == "regression":
        matching = (probabilities @ torch.arange(K, dtype=torch.float32))[:, None]
    else:
        above = 1 - probabilities.cumsum(dim=1)[:, :-1]
        matching = torch.logit(above)
    assert float(head_kd_loss(matching, teacher_logits, head, temperature=4.0)) == pytest.approx(0.0, abs=1e-5)
    # a shift that changes every head's prediction (a constant added to all class logits would not)
    shift = 1.5 * torch.arange(1, matching.shape[1] + 1) / matching.shape[1]
    assert float(head_kd_loss(matching + shift, teacher_logits, head, temperature=4.0)) > 1e-3


@pytest.mark.parametrize("head", HEADS)
def test_distillation_loss_mixes_kd_and_supervised_terms_and_has_gradients(head):
    width = {"classification": K, "regression": 1, "ordinal": K - 1}[head]
    raw = torch.randn(4, width, requires_grad=True)
    teacher_logits, targets = torch.randn(4, K), torch.tensor([0, 1, 3, 4])
    loss, kd, supervised = head_distillation_loss(raw, teacher_logits, targets, head, K, temperature=2.0, alpha=0.25)
    assert float(loss) == pytest.approx(0.25 * float(kd) + 0.75 * float(supervised), rel=1e-5)
    loss.backward()
    assert raw.grad is not None and float(raw.grad.abs().sum()) > 0


@pytest.mark.parametrize("head", HEADS)
def test_consistency_is_zero_for_equal_views(head):
    width = {"classification": K, "regression": 1, "ordinal": K - 1}[head]
    raw = torch.randn(3, width)
    assert float(head_consistency_loss(raw, raw.clone(), head)) == 0.0
    shift = torch.arange(1, width + 1, dtype=torch.float32)  # not a constant: softmax ignores those
    assert float(head_consistency_loss(raw, raw + shift, head)) > 0.0
