"""Offline distillation's soft targets: views, test-time averaging and the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_modules.soft_targets import (
    SoftTargetCache,
    dihedral_views,
    soft_targets,
    teacher_key,
    tta_logits,
)


class _PooledNet(nn.Module):
    """1x1 convolution + global average pooling: its output ignores flips and rotations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, image):
        return self.conv(image).mean(dim=(2, 3))


class _CornerNet(nn.Module):
    """Reads the top-left pixel: a flip or rotation changes its answer."""

    def forward(self, image):
        return image[:, :, 0, 0].repeat(1, 2)[:, :5] * 3.0


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_views_are_distinct_flips_and_rotations(views):
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    produced = dihedral_views(image, views)
    assert len(produced) == views and all(v.shape == image.shape for v in produced)
    assert len({tuple(v.flatten().tolist()) for v in produced}) == views


def test_unknown_view_count_is_refused():
    with pytest.raises(ValueError, match="views=3"):
        dihedral_views(torch.zeros(1, 3, 4, 4), 3)


def test_tta_logits_equal_the_single_view_for_an_invariant_net_and_average_otherwise():
    torch.manual_seed(0)
    image = torch.rand(3, 3, 8, 8)
    invariant = _PooledNet()
    single = invariant(image).log_softmax(dim=1)
    torch.testing.assert_close(tta_logits(invariant, image, 8), single, atol=1e-5, rtol=0)
    corner = _CornerNet()
    averaged = tta_logits(corner, image, 8).exp()
    expected = torch.stack([corner(v).softmax(dim=1) for v in dihedral_views(image, 8)]).mean(dim=0)
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(tta_logits(corner, image, 1).exp(), averaged)


def test_cache_computes_each_image_once_and_again_after_the_file_changes(tmp_path: Path):
    paths = []
    for i in range(4):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * 10)
        paths.append(str(path))
    cache = SoftTargetCache(tmp_path / "cache", "teacher-v1", "prep", num_classes=5)
    calls: list[list[int]] = []

    def compute(indices):
        calls.append(list(indices))
        return np.array([[float(i)] * 5 for i in indices])

    first, computed = soft_targets(paths, cache, compute)
    assert computed == 4 and calls == [[0, 1, 2, 3]] and np.array_equal(first[:, 0], [0, 1, 2, 3])
    again, computed = soft_targets(paths, cache, compute)
    assert computed == 0 and np.array_equal(again, first) and len(calls) == 1
    os.utime(paths[2], ns=(1, 1))  # an edited image is a new image
    _, computed = soft_targets(paths, cache, compute)
    assert computed == 1 and calls[-1] == [2]
    other_teacher = SoftTargetCache(tmp_path / "cache", "teacher-v8", "prep", num_classes=5)
    assert soft_targets(paths, other_teacher, compute)[1] == 4


def test_a_compute_of_the_wrong_shape_is_refused(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(b"x")
    cache = SoftTargetCache(tmp_path, "t", "p", num_classes=5)
    with pytest.raises(ValueError, match="expected"):
        soft_targets([str(path)], cache, lambda indices: np.zeros((1, 3)))


def test_teacher_key_follows_the_file_and_the_views(tmp_path: Path):
    checkpoint = tmp_path / "teacher.ckpt"
    checkpoint.write_bytes(b"weights")
    assert teacher_key(checkpoint, 1) != teacher_key(checkpoint, 8)
    before = teacher_key(checkpoint, 1)
    checkpoint.write_bytes(b"other weights")
    assert teacher_key(checkpoint, 1) != before
