"""Offline distillation: the teacher's soft targets computed once per image and cached on disk.

Online KD runs the frozen teacher on every student batch, every epoch: on a 2-core CPU that is a third of a
student step (a Lite2 forward beside a Lite0 forward and backward). The teacher's answer for an image does not
change between epochs, so :func:`soft_targets` computes it once per training image, optionally averaged over the
image's eight flips and 90-degree rotations (test-time-augmented targets, ``views=8``), and
:class:`SoftTargetCache` keeps it on disk keyed by the teacher file's hash, the image and its preprocessing: the
runs of a sweep or an ablation that share a teacher never run it again.

What it gives up: online KD shows the teacher the student's own augmented view ("consistent" teaching, Beyer et al.
2022); offline targets describe the un-augmented image, whose grade the flips, small rotations and colour changes
of training do not change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from datamodules.fundus import atomic_save_npy, load_npy_checked, source_key

#: the dihedral group of the square: what ``views`` may be (1: the image alone)
VIEW_CHOICES = (1, 2, 4, 8)


def dihedral_views(images: Tensor, views: int) -> list[Tensor]:
    """``views`` of a (B, C, H, W) batch: the image (1), plus its horizontal flip (2), plus its 90/180/270-degree
    rotations (4: rotations only; 8: rotations of the image and of its flip)."""
    if views not in VIEW_CHOICES:
        raise ValueError(f"views={views}: choose one of {list(VIEW_CHOICES)}")
    if views == 1:
        return [images]
    if views == 2:
        return [images, images.flip(-1)]
    rotations = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    if views == 4:
        return rotations
    return rotations + [torch.rot90(images.flip(-1), k, dims=(-2, -1)) for k in range(4)]


@torch.no_grad()
def tta_logits(net: nn.Module, images: Tensor, views: int = 1) -> Tensor:
    """The log of the mean class probabilities over ``views`` of each image: (B, K) logits whose softmax is the
    teacher's averaged answer (``views=1``: its log-softmax on the image itself)."""
    probabilities = torch.stack([net(view).float().softmax(dim=1) for view in dihedral_views(images, views)])
    return probabilities.mean(dim=0).clamp_min(1e-12).log()


def teacher_key(checkpoint: str | Path, views: int) -> str:
    """Identity of the targets: the SHA-256 of the teacher's checkpoint file and the number of views."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{digest.hexdigest()[:16]}-v{views}"


class SoftTargetCache:
    """One ``.npy`` of K float32 logits per (teacher, image, preprocessing) under ``<cache_dir>/soft_targets``."""

    def __init__(self, cache_dir: str | Path, teacher: str, preprocessing_key: str, num_classes: int):
        self.root = Path(cache_dir) / "soft_targets" / teacher
        self.preprocessing_key = preprocessing_key
        self.num_classes = num_classes

    def _entry(self, path: str | Path) -> Path:
        key = source_key(path, self.preprocessing_key)
        return self.root / key[:2] / f"{key}.npy"

    def load(self, path: str | Path) -> np.ndarray | None:
        return load_npy_checked(self._entry(path), (self.num_classes,), np.dtype(np.float32))

    def save(self, path: str | Path, logits: np.ndarray) -> None:
        atomic_save_npy(self._entry(path), np.asarray(logits, dtype=np.float32))


def soft_targets(paths: Sequence[str], cache: SoftTargetCache,
                 compute: Callable[[list[int]], np.ndarray]) -> tuple[np.ndarray, int]:
    """(N, K) cached logits of ``paths``, in their order, and how many had to be computed: ``compute(indices)``
    returns the (len(indices), K) logits of the images not yet cached, which are then saved."""
    targets = np.zeros((len(paths), cache.num_classes), np.float32)
    missing = []
    for index, path in enumerate(paths):
        cached = cache.load(path)
        if cached is None:
            missing.append(index)
        else:
            targets[index] = cached
    if missing:
        computed = np.asarray(compute(missing), dtype=np.float32)
        if computed.shape != (len(missing), cache.num_classes):
            raise ValueError(f"compute returned shape {computed.shape}, expected {(len(missing), cache.num_classes)}")
        for index, logits in zip(missing, computed, strict=True):
            targets[index] = logits
            cache.save(paths[index], logits)
    return targets, len(missing)
