from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.dr import DRDataModule
from datamodules.errors import DataValidationError
from datamodules.fundus import PreprocessedImageCache
from datamodules.photograph import NotAFundusError


def make_dm(root: Path, tmp_path: Path, fmt: str = "aptos", **overrides) -> DRDataModule:
    params = dict(format=fmt, root=str(root), image_size=64, batch_size=8, cache_dir=str(tmp_path / "cache"),
                  topo_resolution=32, topo_image_resolution=8, seed=0)
    return DRDataModule(**(params | overrides))


def test_setup_splits_caches_and_serves_batches(aptos_root: Path, tmp_path: Path):
    dm = make_dm(aptos_root, tmp_path)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sum(sizes.values()) == 40 and sizes["train"] > sizes["val"] > 0
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["topo"].shape == (8, dm.topology_dim) == (8, 2 * 8 * 8)
    assert len(list((tmp_path / "cache" / "preprocessed").rglob("*.npy"))) == 40
    assert len(dm.class_weights) == 5 and np.mean(dm.class_weights) == pytest.approx(1.0)
    table = dm.split_table()
    assert set(table["split"]) == {"train", "val", "test"}
    assert len(dm.fingerprint) == 16


def test_with_image_size_serves_the_same_split_at_the_teachers_resolution(aptos_root: Path, tmp_path: Path):
    dm = make_dm(aptos_root, tmp_path)
    dm.setup()
    teachers = dm.with_image_size(96)
    assert dm.with_image_size(64) is dm
    assert dm.with_image_size(96) is teachers  # prepared once: the teacher stage and its soft targets share it
    for split in ("train", "val", "test"):
        assert teachers.datasets[split].paths == dm.datasets[split].paths
        assert (teachers.datasets[split].labels == dm.datasets[split].labels).all()
    assert teachers.datasets["test"][0]["image"].shape == (3, 96, 96)
    assert dm.datasets["test"][0]["image"].shape == (3, 64, 64)  # the student's module is left as it was
    assert teachers.topology_dim == 0 and teachers.inference_spec()["image_size"] == 96
    assert teachers.class_weights == dm.class_weights and teachers.fingerprint == dm.fingerprint


def test_with_image_size_lists_images_unusable_at_the_other_size(aptos_root: Path, tmp_path: Path, monkeypatch):
    dm = make_dm(aptos_root, tmp_path)
    dm.setup()
    broken = dm.datasets["train"].paths[0]
    original = PreprocessedImageCache.load

    def load(cache, source):
        if cache.preprocessing.image_size == 96 and str(source) == broken:
            raise NotAFundusError("too small for 96 px")
        return original(cache, source)

    monkeypatch.setattr(PreprocessedImageCache, "load", load)
    with pytest.raises(DataValidationError, match="not at 96 px") as error:
        dm.with_image_size(96)
    assert broken in str(error.value)


def test_inference_inputs_match_the_cached_evaluation_path(aptos_root: Path, tmp_path: Path):
    dm = make_dm(aptos_root, tmp_path)
    dm.setup()
    item = dm.datasets["test"][0]
    image, topo = dm.inference_inputs(dm.datasets["test"].paths[0], with_topology=True)
    torch.testing.assert_close(image[0], item["image"])
    torch.testing.assert_close(topo[0], item["topo"])


def test_weighted_sampler_balances_grades(aptos_root: Path, tmp_path: Path):
    csv = aptos_root / "train.csv"
    lines = csv.read_text().splitlines()
    # make grade 0 dominant by relabelling most grade-1 and grade-2 images... keeping each grade >= 5
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    relabelled = 0
    for row in rows:
        if row[1] in {"1", "2"} and relabelled < 6:
            row[1], relabelled = "0", relabelled + 1
    csv.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    dm = make_dm(aptos_root, tmp_path, batch_size=64)
    dm.setup()
    train_labels = dm.datasets["train"].labels
    assert np.bincount(train_labels).max() >= 2 * np.bincount(train_labels).min()
    drawn = torch.cat([next(iter(dm.train_dataloader()))["label"] for _ in range(20)]).numpy()
    counts = np.bincount(drawn, minlength=5) / len(drawn)
    np.testing.assert_allclose(counts, 0.2, atol=0.07)


def test_eyepacs_patients_never_straddle_splits(eyepacs_root: Path, tmp_path: Path):
    dm = make_dm(eyepacs_root, tmp_path, fmt="eyepacs")
    dm.setup()
    table = dm.split_table()
    assert (table.groupby("patient")["split"].nunique() == 1).all()


def test_corrupt_image_fails_setup_before_training(aptos_root: Path, tmp_path: Path):
    (aptos_root / "train_images" / "img005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dm = make_dm(aptos_root, tmp_path)
    with pytest.raises(DataValidationError, match=r"img005\.png: not a readable image"):
        dm.setup()


def test_real_format_without_root_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataValidationError, match="needs data.root"):
        DRDataModule(format="eyepacs", root=None)
    with pytest.raises(ValueError, match="choose one of"):
        DRDataModule(format="kaggle")


def test_synthetic_default_writes_an_aptos_layout_once(tmp_path: Path, caplog):
    dm = DRDataModule(format="synthetic", image_size=64, cache_dir=str(tmp_path / "cache"), synthetic_num_images=40,
                      synthetic_raw_size=128, topo_resolution=32, topo_image_resolution=8)
    with caplog.at_level("WARNING"):
        dm.prepare_data()
    assert "USING SYNTHETIC FUNDUS IMAGES" in caplog.text
    dm.setup()
    assert len(dm.index) == 40 and set(dm.index["label"]) == {0, 1, 2, 3, 4}
    assert (dm.dataset_root / "train.csv").is_file()


def test_class_weights_follow_the_counts_the_loss_sees(aptos_root: Path, tmp_path: Path):
    csv = aptos_root / "train.csv"
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    for row in rows[:12]:
        row[1] = "0" if row[1] in {"1", "2"} else row[1]  # grade 0 now the majority
    csv.write_text("id_code,diagnosis\n" + "\n".join(",".join(r) for r in rows) + "\n")
    sampled = make_dm(aptos_root, tmp_path, weighted_sampling=True)
    sampled.setup()
    np.testing.assert_allclose(sampled.class_weights, 1.0)  # the sampler already balances the grades
    natural = make_dm(aptos_root, tmp_path, weighted_sampling=False)
    natural.setup()
    weights = np.asarray(natural.class_weights)
    counts = np.bincount(natural.datasets["train"].labels, minlength=5)
    assert weights[np.argmax(counts)] == weights.min() and weights[np.argmin(counts)] == weights.max()


def test_multi_splits_each_set_on_its_own_and_keeps_its_name(aptos_root: Path, eyepacs_root: Path, tmp_path: Path):
    sources = {"aptos": {"format": "aptos", "root": str(aptos_root)},
               "eyepacs": {"format": "eyepacs", "root": str(eyepacs_root)}}
    dm = make_dm(None, tmp_path, fmt="multi", sources=sources)
    dm.setup()
    table = dm.split_table()
    assert len(table) == 40 + 80 and set(table["dataset"]) == {"aptos", "eyepacs"}
    assert table["sample_id"].str.startswith(("aptos/", "eyepacs/")).all() and table["sample_id"].is_unique
    for _, rows in table.groupby("dataset"):
        # each set has every split, and its share of the test split is its own 15%
        counts = rows["split"].value_counts()
        assert set(counts.index) == {"train", "val", "test"}
        assert counts["test"] == pytest.approx(0.15 * len(rows), abs=3)
    # both eyes of an EyePACS patient stay together
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    test = dm.datasets["test"]
    assert set(test.sources) == {"aptos", "eyepacs"} and len(test.sources) == len(test)
    assert list(dm.datasets["train"].evaluation_view([0, 1]).sources) == list(dm.datasets["train"].sources[:2])
    with pytest.raises(ValueError, match="one image folder per source"):
        _ = dm.image_folders


@pytest.mark.parametrize("sources, message", [
    (None, "at least two"),
    ({"a": {"format": "aptos", "root": "/x"}}, "at least two"),
    ({"a": {"format": "aptos", "root": "/x"}, "b": {"format": "kaggle", "root": "/y"}}, "b.format"),
    ({"a": {"format": "aptos", "root": "/x"}, "b": {"format": "eyepacs", "root": "???"}}, "b.root is not set"),
])
def test_multi_refuses_unusable_sources(sources, message, tmp_path: Path):
    with pytest.raises(DataValidationError, match=message):
        DRDataModule(format="multi", sources=sources, cache_dir=str(tmp_path))
