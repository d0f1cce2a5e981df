import math

import numpy as np
import pytest
import torch

from lightning_modules.losses import (
    consistency_loss,
    effective_number_weights,
    head_distillation_loss,
    inverse_frequency_sample_weights,
    kd_kl_loss,
    linear_alpha,
)


def test_kd_loss_matches_hand_computed_value():
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0, 1.0]])
    tau = 2.0
    p_t = np.exp(teacher.numpy()[0] / tau) / np.exp(teacher.numpy()[0] / tau).sum()
    p_s = np.exp(student.numpy()[0] / tau) / np.exp(student.numpy()[0] / tau).sum()
    expected = tau**2 * float(np.sum(p_t * np.log(p_t / p_s)))
    assert kd_kl_loss(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 5)
    assert kd_kl_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_loss(logits, logits.flip(1), 4.0).item() > 0


def test_distillation_loss_mixes_kd_and_ce_with_alpha():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    total, kd, ce = head_distillation_loss(student, teacher, targets, "classification", 5, temperature=4.0,
                                           alpha=0.3)
    assert total.item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)
    only_ce, _, ce2 = head_distillation_loss(student, teacher, targets, "classification", 5, temperature=4.0,
                                             alpha=0.0)
    assert only_ce.item() == pytest.approx(ce2.item())


def test_effective_number_weights_formula_and_normalisation():
    counts = [100, 10, 1]
    beta = 0.99
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    expected = raw * 3 / raw.sum()
    np.testing.assert_allclose(effective_number_weights(counts, beta), expected, rtol=1e-10)
    weights = effective_number_weights(counts, beta)
    assert weights[2] > weights[1] > weights[0]  # rarer class, larger weight
    assert weights.mean() == pytest.approx(1.0)


def test_effective_number_weights_edge_cases():
    np.testing.assert_allclose(effective_number_weights([5, 50, 500], beta=0.0), [1, 1, 1])
    weights = effective_number_weights([10, 0, 10], beta=0.999)
    assert weights[1] == 0 and weights[0] == pytest.approx(weights[2])
    with pytest.raises(ValueError):
        effective_number_weights([1, 2], beta=1.0)


def test_inverse_frequency_sample_weights_balance_the_classes():
    labels = np.array([0] * 8 + [1] * 2)
    weights = inverse_frequency_sample_weights(labels, num_classes=2)
    np.testing.assert_allclose(weights[:8], 10 / 8)
    np.testing.assert_allclose(weights[8:], 10 / 2)
    assert weights[labels == 0].sum() == pytest.approx(weights[labels == 1].sum())


@pytest.mark.parametrize(("epoch", "expected"), [(0, 0.2), (5, 0.5), (10, 0.8), (20, 0.8)])
def test_linear_alpha_schedule(epoch, expected):
    assert linear_alpha(epoch, max_epochs=11, start=0.2, end=0.8) == pytest.approx(expected)


def test_linear_alpha_single_epoch_uses_end_value():
    assert linear_alpha(0, max_epochs=1, start=0.2, end=0.8) == 0.8


def test_consistency_loss():
    logits = torch.randn(3, 5)
    assert consistency_loss(logits, logits).item() == pytest.approx(0.0)
    a = torch.tensor([[10.0, 0.0]])
    b = torch.tensor([[0.0, 10.0]])
    assert consistency_loss(a, b).item() == pytest.approx(1.0, abs=1e-3)  # probabilities ~(1,0) vs (0,1)
    assert math.isfinite(consistency_loss(a * 1e3, b * 1e3).item())
