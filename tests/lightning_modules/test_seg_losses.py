import math

import pytest
import torch

from lightning_modules.losses import (
    bce_dice_loss_per_sample,
    mask_distillation_loss_per_sample,
    soft_dice_loss_per_sample,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_mask_kd_matches_the_hand_computed_bernoulli_kl():
    student = torch.tensor([[[[0.0, 2.0]]]])
    teacher = torch.tensor([[[[1.0, -1.0]]]])
    tau = 2.0
    expected = 0.0
    for s, t in ((0.0, 1.0), (2.0, -1.0)):
        p, q = 1 / (1 + math.exp(-t / tau)), 1 / (1 + math.exp(-s / tau))
        expected += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    expected = tau**2 * expected / 2
    assert mask_distillation_loss_per_sample(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)


def test_mask_kd_is_zero_when_the_student_matches_and_per_sample_otherwise():
    teacher = torch.randn(3, 1, 4, 4)
    assert torch.allclose(mask_distillation_loss_per_sample(teacher, teacher, 3.0), torch.zeros(3), atol=1e-6)
    student = teacher.clone()
    student[1] += 2.0
    losses = mask_distillation_loss_per_sample(student, teacher, 3.0)
    assert losses.shape == (3,) and losses[1] > 1e-3 and losses[0].abs() < 1e-6


def test_soft_dice_loss_of_a_known_overlap():
    # probabilities 0.8 on two pixels, one of them on the single-pixel disc, 0.2 elsewhere (2 pixels)
    probs = torch.tensor([[0.8, 0.8], [0.2, 0.2]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logits = torch.log(probs / (1 - probs)).view(1, 1, 2, 2)
    overlap, total = 0.8, 0.8 + 0.8 + 0.2 + 0.2 + 1.0
    expected = 1 - (2 * overlap + 1.0) / (total + 1.0)
    assert soft_dice_loss_per_sample(logits, target.view(1, 1, 2, 2)).item() == pytest.approx(expected, rel=1e-5)


def test_bce_dice_is_the_weighted_sum_of_its_terms():
    logits = torch.tensor([[[[_logit(0.9), _logit(0.3)]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    bce = -(math.log(0.9) + math.log(0.7)) / 2
    dice = soft_dice_loss_per_sample(logits, target).item()
    assert bce_dice_loss_per_sample(logits, target, 2.0, 0.5).item() == pytest.approx(2 * bce + 0.5 * dice, rel=1e-5)


def test_a_perfect_confident_mask_has_near_zero_loss():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    logits = (target * 2 - 1) * 20
    assert bce_dice_loss_per_sample(logits, target).max().item() < 1e-3
