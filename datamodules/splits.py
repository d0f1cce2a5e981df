"""Seeded, stratified train/val/test splits: patient-grouped (DR grading) or k-fold with a fixed test set (disc)."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, ShuffleSplit, StratifiedKFold, StratifiedShuffleSplit

from datamodules.errors import DataValidationError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def with_split_column(table: pd.DataFrame, split_indices: dict[str, np.ndarray]) -> pd.DataFrame:
    """A copy of ``table`` with a ``split`` column naming each row's split (the file saved with every run)."""
    table = table.copy()
    table["split"] = ""
    for name, indices in split_indices.items():
        table.loc[indices, "split"] = name
    return table


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


def check_fold_arguments(num_folds: int, fold: int) -> None:
    """A clear error for a fold setting that cannot work (checked when a DataModule is built, before any data)."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int | np.integer) or num_folds < 2:
        raise DataValidationError(f"data.num_folds={num_folds!r}: k-fold cross-validation needs at least 2 folds",
                                  fix="set data.num_folds to an integer >= 2 (5 is usual).")
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 0 <= fold < num_folds:
        raise DataValidationError(f"data.fold={fold!r} is not one of the {num_folds} folds 0..{num_folds - 1}",
                                  fix=f"pass data.fold=0..{num_folds - 1}, or raise data.num_folds.")


def _check_kfold_sizes(n: int, num_folds: int, test_fraction: float, strata: np.ndarray | None) -> None:
    n_test = int(np.ceil(test_fraction * n))  # how scikit-learn's ShuffleSplit rounds a float test_size
    n_rest = n - n_test
    problems = []
    if n_test < 1 or n_rest < num_folds:
        problems.append(
            f"{n} images: the {test_fraction:.0%} test split takes {n_test}, leaving {n_rest} for {num_folds} folds "
            f"(each fold needs at least one validation image and training images besides)"
        )
    if strata is not None:
        labels, counts = np.unique(strata, return_counts=True)
        rare = [f"stratum {label!r}: {count} image(s)" for label, count in zip(labels.tolist(), counts) if count < 2]
        if rare:
            problems.append("every stratum (e.g. hard / not hard) needs at least 2 images, one for test and "
                            "one for the folds: " + "; ".join(rare))
        elif min(n_test, n_rest) < len(labels):
            problems.append(f"the test split ({n_test}) and the rest ({n_rest}) must each hold all {len(labels)} "
                            f"strata")
    if problems:
        raise DataValidationError(
            f"Cannot split {n} images into a test set and {num_folds} folds",
            problems,
            fix="add images, lower data.num_folds, or change data.test_fraction (or mark more / no hard cases).",
        )


def kfold_with_test_split(
    n: int,
    num_folds: int = 5,
    fold: int = 0,
    test_fraction: float = 0.15,
    seed: int = 0,
    strata: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Indices of train/val/test: a fixed held-out test set, then fold ``fold`` of k-fold on the rest.

    With ``groups`` (e.g. the patient of each eye) whole groups are split and each image follows its
    group, so both eyes of one patient never straddle train and test; a group's stratum is the
    largest of its images' (a patient with one hard eye counts as hard).

    The test set depends only on (n, test_fraction, seed, strata), never on ``fold``, so every fold of a
    cross-validation is scored on the same untouched images. With ``strata`` (e.g. hard-case flags) the
    test split and the folds are stratified (StratifiedShuffleSplit, StratifiedKFold), so the rare
    stratum shows up in the test set and in every validation fold it can fill.
    """
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups has shape {groups.shape}, expected one group per image: ({n},)")
        unique_groups, inverse = np.unique(groups, return_inverse=True)
        group_strata = None
        if strata is not None:
            group_strata = np.zeros(len(unique_groups), dtype=np.asarray(strata).dtype)
            np.maximum.at(group_strata, inverse, np.asarray(strata))
        by_group = kfold_with_test_split(len(unique_groups), num_folds, fold, test_fraction, seed, group_strata)
        return {name: np.flatnonzero(np.isin(inverse, chosen)) for name, chosen in by_group.items()}
    check_fold_arguments(num_folds, fold)
    if not 0 < test_fraction < 1:
        raise DataValidationError(f"data.test_fraction={test_fraction} must lie strictly between 0 and 1",
                                  fix="use e.g. data.test_fraction=0.15.")
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != (n,):
            raise ValueError(f"strata has shape {strata.shape}, expected one label per image: ({n},)")
    _check_kfold_sizes(n, num_folds, test_fraction, strata)
    placeholder = np.zeros(n)  # scikit-learn splitters only read len(X)
    if strata is None:
        rest, test = next(ShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed).split(placeholder))
        folds = KFold(num_folds, shuffle=True, random_state=seed).split(rest)
    else:
        test_splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        rest, test = next(test_splitter.split(placeholder, strata))
        labels, counts = np.unique(strata[rest], return_counts=True)
        for label, count in zip(labels.tolist(), counts):
            if count < num_folds:
                log.warning("Stratum %r has %d images outside the test split, fewer than the %d folds: some "
                            "validation folds will hold none of it", label, count, num_folds)
        with warnings.catch_warnings():
            # scikit-learn's warning says the same as the line above, in terms of its own arguments.
            warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
            folds = list(StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(rest, strata[rest]))
    train_pos, val_pos = list(folds)[fold]
    return {"train": np.sort(rest[train_pos]), "val": np.sort(rest[val_pos]), "test": np.sort(test)}
