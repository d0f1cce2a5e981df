import numpy as np
import pytest

from datamodules.errors import DataValidationError
from datamodules.splits import check_splits, stratified_group_split


def test_split_fractions_stratification_and_seed():
    labels = np.repeat(np.arange(5), [200, 60, 100, 20, 20])
    splits = stratified_group_split(labels, None, 0.15, 0.15, seed=3)
    sizes = {name: len(idx) for name, idx in splits.items()}
    assert sizes["train"] == pytest.approx(280, abs=2)
    assert sizes["val"] == pytest.approx(60, abs=2) and sizes["test"] == pytest.approx(60, abs=2)
    all_indices = np.concatenate(list(splits.values()))
    assert sorted(all_indices.tolist()) == list(range(len(labels)))  # a partition
    for idx in splits.values():  # every split mirrors the grade distribution
        fractions = np.bincount(labels[idx], minlength=5) / len(idx)
        np.testing.assert_allclose(fractions, np.bincount(labels) / len(labels), atol=0.03)
    again = stratified_group_split(labels, None, 0.15, 0.15, seed=3)
    other = stratified_group_split(labels, None, 0.15, 0.15, seed=4)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["test"], other["test"])


def test_both_eyes_of_a_patient_stay_in_one_split():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(150), 2)
    labels = rng.integers(0, 5, size=300)
    splits = stratified_group_split(labels, patients, 0.15, 0.15, seed=0)
    where = {}
    for name, idx in splits.items():
        for patient in patients[idx]:
            assert where.setdefault(patient, name) == name
    assert len(where) == 150


def test_missing_grade_in_a_split_is_a_clear_error():
    labels = np.array([0] * 30 + [1] * 30 + [2] * 2)
    splits = {"train": np.arange(0, 60), "val": np.arange(60, 61), "test": np.arange(61, 62)}
    with pytest.raises(DataValidationError, match="no image of grade"):
        check_splits(labels, splits, num_classes=3)
    with pytest.raises(DataValidationError, match="'val' is empty"):
        check_splits(labels, {"train": np.arange(62), "val": np.array([], int), "test": np.arange(1)}, 3)


def test_grade_with_a_single_patient_cannot_be_stratified():
    labels = np.array([0] * 20 + [1] * 20 + [4])
    with pytest.raises(DataValidationError, match="grade 4: 1"):
        stratified_group_split(labels, None, 0.15, 0.15, seed=0)


def test_too_few_patients_for_every_grade_in_a_split_is_a_clear_error():
    labels = np.repeat(np.arange(5), 3)  # 15 images: a 15% split holds 3, fewer than 5 grades
    with pytest.raises(DataValidationError, match="Too few patients/images to split"):
        stratified_group_split(labels, None, 0.15, 0.15, seed=0)
