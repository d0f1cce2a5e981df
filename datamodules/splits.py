"""Seeded, stratified train/val/test splits that keep a patient's images together."""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

from datamodules.errors import DataValidationError

SPLITS = ("train", "val", "test")


def _group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One label per group: the worst grade among its images (a patient is graded by the worse eye)."""
    unique_groups, inverse = np.unique(groups, return_inverse=True)
    group_label = np.full(len(unique_groups), -1, dtype=np.int64)
    np.maximum.at(group_label, inverse, labels)
    return group_label, inverse


def _stratified_pick(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    counts = Counter(labels.tolist())
    rare = {label: count for label, count in counts.items() if count < 2}
    if rare:
        raise DataValidationError(
            "Cannot stratify the split: some grades have fewer than 2 patients/images",
            [f"grade {label}: {count} patient(s)" for label, count in sorted(rare.items())],
            fix="add images of these grades (each grade needs several patients in train, val and test).",
        )
    n_pick = int(np.ceil(fraction * len(labels)))
    if min(n_pick, len(labels) - n_pick) < len(counts):
        raise DataValidationError(
            f"Too few patients/images to split: {len(labels)} in all, {n_pick} for a {fraction:.0%} split, "
            f"but {len(counts)} grades must each appear in it",
            [f"grade {label}: {count} patient(s)" for label, count in sorted(counts.items())],
            fix="add data, or raise data.val_fraction / data.test_fraction.",
        )
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    keep, pick = next(splitter.split(np.zeros(len(labels)), labels))
    return keep, pick


def stratified_group_split(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Indices of train/val/test, stratified by label and never splitting a group (patient).

    Groups are split, not images: a patient's label is its worst grade, StratifiedShuffleSplit
    splits patients, and each patient's images follow it. Without groups every image is a group.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: both in (0, 1), sum < 1")
    group_label, inverse = _group_labels(labels, groups)
    rest, test_groups = _stratified_pick(group_label, test_fraction, seed)
    relative_val = val_fraction / (1.0 - test_fraction)
    train_pos, val_pos = _stratified_pick(group_label[rest], relative_val, seed + 1)
    group_split = np.empty(len(group_label), dtype=np.int64)
    group_split[rest[train_pos]] = 0
    group_split[rest[val_pos]] = 1
    group_split[test_groups] = 2
    image_split = group_split[inverse]
    return {name: np.flatnonzero(image_split == code) for code, name in enumerate(SPLITS)}


def check_splits(labels: np.ndarray, splits: dict[str, np.ndarray], num_classes: int) -> None:
    """Every split non-empty and holding every grade, or one error listing what is missing."""
    labels = np.asarray(labels)
    problems = []
    for name, indices in splits.items():
        if len(indices) == 0:
            problems.append(f"split '{name}' is empty")
            continue
        missing = sorted(set(range(num_classes)) - set(labels[indices].tolist()))
        if missing:
            problems.append(f"split '{name}' ({len(indices)} images) has no image of grade(s) {missing}")
    if problems:
        totals = Counter(labels.tolist())
        raise DataValidationError(
            "The train/val/test split is unusable",
            problems + [f"whole dataset: {dict(sorted(totals.items()))} images per grade"],
            fix="add images of the missing grades, or change data.val_fraction / data.test_fraction.",
        )
