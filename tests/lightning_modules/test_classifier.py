import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.classifier import StudentDistiller, TeacherClassifier


def test_fresh_head_on_pretrained_teacher_starts_near_uniform():
    torch.manual_seed(0)
    teacher = TeacherClassifier(backbone="tf_efficientnet_lite0", pretrained="lite").eval()
    head = teacher.net.get_classifier()
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.2) and head.bias.abs().max() == 0
    with torch.no_grad():
        logits = teacher(torch.randn(8, 3, 96, 96))
    loss = F.cross_entropy(logits, torch.arange(8) % 5)
    assert abs(loss.item() - math.log(5)) < 0.2


def test_student_checkpoint_keeps_the_teacher_out(tmp_path):
    teacher = TeacherClassifier(backbone="tf_efficientnet_lite0", pretrained="none")
    teacher_path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": "2.6.0"}, teacher_path)
    student = StudentDistiller(backbone="tf_efficientnet_lite0", pretrained="none", topo_features=8,
                               teacher_checkpoint=str(teacher_path))
    assert student.teacher is not None and not student.teacher.training
    assert all(not p.requires_grad for p in student.teacher.parameters())
    checkpoint = {"state_dict": student.state_dict()}
    student.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    student.on_load_checkpoint(checkpoint)
    student.load_state_dict(checkpoint["state_dict"], strict=True)  # teacher keys restored from its own file
    student.train()
    assert not student.teacher.training  # stays frozen in eval mode while the student trains


def test_alpha_is_zero_without_a_teacher():
    student = StudentDistiller(backbone="tf_efficientnet_lite0", pretrained="none", topo_features=8,
                               teacher_checkpoint=None)
    assert student.teacher is None and student.alpha == 0.0
