import numpy as np
import pytest

from datamodules.errors import DataValidationError
from datamodules.splits import check_splits, kfold_with_test_split, stratified_group_split


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


def test_kfold_partitions_with_a_test_set_fixed_across_folds():
    n, k = 53, 5
    runs = [kfold_with_test_split(n, num_folds=k, fold=fold, test_fraction=0.15, seed=7) for fold in range(k)]
    test = runs[0]["test"]
    assert len(test) == 8  # ceil(0.15 x 53 = 7.95)
    for split in runs:
        np.testing.assert_array_equal(split["test"], test)  # never depends on the fold
        together = np.concatenate([split["train"], split["val"], split["test"]])
        assert sorted(together.tolist()) == list(range(n))  # disjoint and covering
        assert len(split["val"]) == 9  # 45 images left for 5 folds
    validation = np.concatenate([split["val"] for split in runs])
    assert sorted(validation.tolist()) == sorted(set(range(n)) - set(test.tolist()))  # each fold validates once
    again = kfold_with_test_split(n, num_folds=k, fold=2, seed=7)
    assert all(np.array_equal(again[name], runs[2][name]) for name in again)
    assert not np.array_equal(kfold_with_test_split(n, num_folds=k, fold=2, seed=8)["test"], test)


def test_kfold_stratification_puts_hard_cases_in_test_and_every_validation_fold():
    hard = np.zeros(100, bool)
    hard[np.random.default_rng(0).choice(100, 20, replace=False)] = True
    for fold in range(5):
        split = kfold_with_test_split(100, num_folds=5, fold=fold, test_fraction=0.15, seed=0, strata=hard)
        assert hard[split["test"]].sum() == 3  # 20% of the 15 test images
        assert hard[split["val"]].sum() in (3, 4)  # the other 17 spread over 5 folds
    unstratified_counts = {
        int(hard[kfold_with_test_split(100, 5, 0, 0.15, seed, None)["test"]].sum()) for seed in range(20)
    }
    assert len(unstratified_counts) > 1  # without strata the count drifts: stratification is doing the work


def test_kfold_argument_and_size_errors_are_clear():
    with pytest.raises(DataValidationError, match="at least 2 folds"):
        kfold_with_test_split(30, num_folds=1)
    with pytest.raises(DataValidationError, match=r"data.fold=5 is not one of the 5 folds 0..4"):
        kfold_with_test_split(30, num_folds=5, fold=5)
    with pytest.raises(DataValidationError, match="data.fold=-1"):
        kfold_with_test_split(30, num_folds=5, fold=-1)
    with pytest.raises(DataValidationError, match=r"5 images: the 15% test split takes 1, leaving 4 for 5 folds"):
        kfold_with_test_split(5, num_folds=5)
    hard = np.zeros(30, bool)
    hard[3] = True
    with pytest.raises(DataValidationError, match=r"stratum True: 1 image\(s\)"):
        kfold_with_test_split(30, strata=hard)


def test_kfold_warns_when_a_stratum_cannot_fill_every_fold(caplog: pytest.LogCaptureFixture):
    hard = np.zeros(40, bool)
    hard[:4] = True  # 1 goes to the test split (ceil(0.15 x 40) = 6 test images), 3 remain for 5 folds
    with caplog.at_level("WARNING", logger="datamodules.splits"):
        split = kfold_with_test_split(40, num_folds=5, strata=hard)
    assert hard[split["test"]].sum() == 1
    assert "Stratum True has 3 images outside the test split, fewer than the 5 folds" in caplog.text
