import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.disc_crops import CoarseToFine
from datamodules.dr import IMAGENET_MEAN, IMAGENET_STD
from datamodules.errors import DataValidationError
from datamodules.fundus import SquareCrop
from datamodules.optic_disc import SOURCE_CROP_KEY, SOURCE_IMAGE_KEY, SOURCE_MASK_KEY, DiscDataModule
from datamodules.synthetic import render_fundus, synthetic_data_banner

NUM_PAIRS = 18


@pytest.fixture(scope="module")
def rendered() -> list:
    return [render_fundus(i % 5, size=64, seed=i) for i in range(NUM_PAIRS)]


def write_folder(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for index, (image, mask) in enumerate(pairs):
        cv2.imwrite(str(root / "images" / f"pair_{index:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "masks" / f"pair_{index:03d}.png"), mask)
    return root


@pytest.fixture
def disc_root(tmp_path: Path, rendered) -> Path:
    return write_folder(tmp_path / "disc", [(f.image, f.disc_mask) for f in rendered])


def make_dm(root: Path | None, tmp_path: Path, **overrides) -> DiscDataModule:
    params = dict(format="disc_folder", root=str(root), image_size=32, batch_size=4, num_folds=3,
                  cache_dir=str(tmp_path / "cache"), seed=0)
    return DiscDataModule(**(params | overrides))


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) normalised tensor -> HxW grey in 0..1."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image * std + mean).permute(1, 2, 0).numpy()
    return rgb @ np.array([0.299, 0.587, 0.114])


def test_batches_splits_and_table_have_the_documented_shapes(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path)
    dm.setup()
    sizes = {name: len(dataset) for name, dataset in dm.datasets.items()}
    # ceil(0.15 x 18) = 3 test images; 15 left for 3 folds of 5
    assert sizes == {"train": 10, "val": 5, "test": 3} and dm.fold_size == 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["index"].dtype == torch.int64 and batch["hard"].dtype == torch.bool
    train = dm.datasets["train"]
    assert isinstance(train.paths[0], str) and Path(train.mask_paths[0]).parent.name == "masks"
    assert train.hard.dtype == bool and not train.hard.any()  # no hard cases known: none flagged
    assert dm.hard_case_indices("val").size == 0
    table = dm.split_table()
    assert list(table.columns) == ["sample_id", "image_path", "mask_path", "split", "hard"]
    assert table["split"].value_counts().to_dict() == {"train": 10, "val": 5, "test": 3}
    assert len(dm.fingerprint) == 16
    assert len(list((tmp_path / "cache" / "preprocessed_disc").rglob("*.npy"))) == NUM_PAIRS


def bright_disc_pair() -> tuple[np.ndarray, np.ndarray]:
    """A dark retina with an off-centre white disc, and the disc's mask (0/255).

    Any geometric transform applied to the image but not the mask (or vice versa) moves the disc away
    from its mask; the disc is large enough for nearest-neighbour resizing to keep its shape.
    """
    image = np.zeros((96, 96, 3), np.uint8)
    cv2.circle(image, (48, 48), 44, (60, 20, 20), -1)
    cv2.ellipse(image, (66, 44), (13, 15), 0, 0, 360, (255, 255, 255), -1)
    mask = np.zeros((96, 96), np.uint8)
    cv2.ellipse(mask, (66, 44), (13, 15), 0, 0, 360, 255, -1)
    return image, mask


def test_augmented_masks_stay_binary_and_on_the_bright_disc(tmp_path: Path):
    root = write_folder(tmp_path / "disc", [bright_disc_pair()] * 12)
    dm = make_dm(root, tmp_path, image_size=48, clahe=False)
    dm.setup()
    plain = dm.datasets["val"][0]["mask"]
    moved = 0
    for _ in range(12):
        item = dm.datasets["train"][0]  # indexing the training set gives an augmented sample
        augmented_mask = item["mask"][0].numpy()
        assert set(np.unique(augmented_mask).tolist()) <= {0.0, 1.0}
        grey = denormalise(item["image"])
        bright = grey >= 0.75 * grey.max()  # the disc; the retina stays below 0.6 x the disc even after jitter
        iou = np.logical_and(bright, augmented_mask == 1).sum() / np.logical_or(bright, augmented_mask == 1).sum()
        assert iou > 0.8
        moved += not torch.equal(item["mask"], plain)
    assert moved >= 6  # the affine/flip really moved the disc in most draws


def test_hard_cases_from_the_generator_file(tmp_path: Path):
    dm = DiscDataModule(image_size=32, synthetic_num_images=16, synthetic_raw_size=64, num_folds=3,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup()  # writes the synthetic set itself when prepare_data has not run
    listed = set((dm.dataset_root / "hard_cases.txt").read_text().split())
    assert dm.is_synthetic and listed
    table = dm.split_table()
    assert set(table.loc[table["hard"], "sample_id"]) == listed
    for split, dataset in dm.datasets.items():
        stems = {Path(dataset.paths[i]).stem for i in dm.hard_case_indices(split)}
        assert stems == listed & set(table.loc[table["split"] == split, "sample_id"])


def test_hard_cases_from_a_list_or_a_file_stratify_test_and_every_fold(disc_root: Path, tmp_path: Path):
    hard = ["pair_001", "pair_004", "pair_007", "pair_010", "pair_013", "pair_016"]
    listing = tmp_path / "hard.txt"
    listing.write_text("\n".join(f"{stem}.png" for stem in hard) + "\n")
    for fold in range(3):
        for hard_cases in (hard, str(listing)):
            dm = make_dm(disc_root, tmp_path, fold=fold, hard_cases=hard_cases)
            dm.setup()
            test_stems = {Path(dm.datasets["test"].paths[i]).stem for i in dm.hard_case_indices("test")}
            assert len(test_stems) == 1 and test_stems <= set(hard)  # 6/18 of the 3 test images
            assert len(dm.hard_case_indices("val")) >= 1  # the other 5 over 3 folds
            assert dm.datasets["train"][int(dm.hard_case_indices("train")[0])]["hard"]


def test_unknown_hard_case_stems_are_a_clear_error(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path, hard_cases=["pair_001", "no_such_eye"])
    with pytest.raises(DataValidationError, match="'no_such_eye'") as raised:
        dm.setup()
    assert "data.hard_cases" in str(raised.value)


def test_hard_cases_can_be_set_after_setup_without_changing_the_splits(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path)
    dm.setup()
    assert not dm.has_hard_cases and dm.hard_case_ids == []
    splits_before = {name: dataset.paths for name, dataset in dm.datasets.items()}
    train = dm.datasets["train"]
    chosen = [dm.sample_id(train.paths[i]) for i in (1, 4)]
    assert chosen == [Path(train.paths[i]).stem for i in (1, 4)]
    dm.set_hard_cases(chosen, source="the replay buffer")
    assert dm.has_hard_cases and dm.hard_case_ids == sorted(chosen)
    assert dm.hard_case_indices("train").tolist() == [1, 4] and dm.hard_case_indices("test").size == 0
    assert dm.datasets["train"][4]["hard"] and not dm.datasets["train"][0]["hard"]
    assert {name: dataset.paths for name, dataset in dm.datasets.items()} == splits_before
    with pytest.raises(DataValidationError, match=r"in the replay buffer name no image[\s\S]*'ghost'"):
        dm.set_hard_cases(["ghost"], source="the replay buffer")
    with pytest.raises(KeyError, match="is not an image of this dataset"):
        dm.sample_id(tmp_path / "elsewhere.png")


def test_bad_pairs_fail_setup_in_one_error_naming_each_file(disc_root: Path, tmp_path: Path):
    (disc_root / "images" / "pair_002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cv2.imwrite(str(disc_root / "masks" / "pair_005.png"), np.full((32, 32), 255, np.uint8))  # half size
    cv2.imwrite(str(disc_root / "masks" / "pair_009.png"), np.zeros((64, 64), np.uint8))  # no disc
    with pytest.raises(DataValidationError) as raised:
        make_dm(disc_root, tmp_path).setup()
    message = str(raised.value)
    assert f"3 of {NUM_PAIRS} image/mask pairs cannot be used" in message
    assert "pair_002.png: not a readable image" in message
    assert "pair_005.png: mask is 32x32 px but its image pair_005.png is 64x64" in message
    assert "pair_009.png: no disc pixel" in message
    with pytest.raises(DataValidationError, match=f"2 of {NUM_PAIRS} image/mask pairs"):
        make_dm(disc_root, tmp_path, resize_masks=True).setup()  # the half-size mask is now resized


def test_layout_problems_fail_setup(disc_root: Path, tmp_path: Path):
    (disc_root / "masks" / "pair_003.png").unlink()
    with pytest.raises(DataValidationError, match=r"pair_003\.png: no mask 'pair_003\.\*'"):
        make_dm(disc_root, tmp_path).setup()


def test_corrupt_cache_entries_are_rebuilt(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path, augment=False)
    dm.setup()
    before = [dm.datasets["train"][i] for i in range(3)]
    entries = sorted((tmp_path / "cache" / "preprocessed_disc").rglob("*.npy"))
    entries[0].write_bytes(b"corrupt")
    bad_mask = np.load(entries[1])
    bad_mask[..., 3] = 7  # the right shape and dtype, but not a 0/1 mask
    np.save(entries[1], bad_mask)
    again = make_dm(disc_root, tmp_path, augment=False)
    again.setup()  # the warm-up rebuilds the entries
    for entry in entries[:2]:
        rebuilt = np.load(entry)
        assert rebuilt.shape == (32, 32, 4) and rebuilt[..., 3].max() == 1
    for i, item in enumerate(before):
        torch.testing.assert_close(again.datasets["train"][i]["image"], item["image"])
        torch.testing.assert_close(again.datasets["train"][i]["mask"], item["mask"])


def test_inference_inputs_equal_the_evaluation_batch(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    inputs = dm.inference_inputs(dm.datasets["test"].paths[0])
    assert isinstance(inputs, tuple) and len(inputs) == 1 and inputs[0].shape == (1, 3, 32, 32)
    torch.testing.assert_close(inputs[0][0], batch["image"][0])


def wide_frame_pair() -> tuple[np.ndarray, np.ndarray]:
    """:func:`bright_disc_pair` in a wide 160 x 120 camera frame (crop and padding both matter), and its mask."""
    image, mask = bright_disc_pair()
    canvas = np.zeros((120, 160, 3), np.uint8)
    canvas[10:106, 40:136] = image
    true_disc = np.zeros((120, 160), np.uint8)
    true_disc[10:106, 40:136] = mask
    return canvas, true_disc


def test_a_prediction_maps_back_onto_the_photograph(tmp_path: Path):
    canvas, true_disc = wide_frame_pair()
    root = write_folder(tmp_path / "disc", [(canvas, true_disc)] * 12)
    dm = make_dm(root, tmp_path, image_size=48)
    dm.setup()
    preprocessed, crop = dm.preprocess_image(canvas)
    assert preprocessed.shape == (48, 48, 3) and preprocessed.dtype == np.uint8
    # A perfect prediction at 48 px (the served mask) mapped back onto the 160 x 120 photograph.
    predicted = dm.datasets["test"][0]["mask"][0].numpy().astype(np.uint8)
    back = crop.to_source(predicted) > 0
    truth = true_disc > 0
    assert back.shape == truth.shape
    assert np.logical_and(back, truth).sum() / np.logical_or(back, truth).sum() > 0.85
    (rows, cols), (true_rows, true_cols) = np.nonzero(back), np.nonzero(truth)
    assert abs(rows.mean() - true_rows.mean()) < 1.5 and abs(cols.mean() - true_cols.mean()) < 1.5


def test_loaders_shuffle_reproducibly_and_honour_num_workers(disc_root: Path, tmp_path: Path):
    dm = make_dm(disc_root, tmp_path, augment=False, batch_size=10)
    dm.setup()
    first = next(iter(dm.train_dataloader()))["index"].tolist()
    assert first == next(iter(dm.train_dataloader()))["index"].tolist()  # seeded generator
    assert sorted(first) == list(range(10)) and first != list(range(10))  # shuffled
    assert next(iter(dm.val_dataloader()))["index"].tolist() == list(range(5))
    workers = make_dm(disc_root, tmp_path, num_workers=2)
    workers.setup()
    assert workers.train_dataloader().num_workers == 2 and workers.test_dataloader().num_workers == 2


def test_workers_do_not_repeat_each_others_augmentations(tmp_path: Path, rendered):
    # Identical pairs: any difference between two samples comes from augmentation alone.
    root = write_folder(tmp_path / "same", [(rendered[0].image, rendered[0].disc_mask)] * 12)
    dm = make_dm(root, tmp_path, num_workers=2, batch_size=1, num_folds=2)
    dm.setup()
    images = [batch["image"] for _, batch in zip(range(2), dm.train_dataloader())]  # one from each worker
    assert not torch.equal(images[0], images[1])


def test_constructor_errors_are_clear(tmp_path: Path):
    with pytest.raises(ValueError, match="choose one of"):
        DiscDataModule(format="refuge")
    with pytest.raises(DataValidationError, match="needs data.root"):
        DiscDataModule(format="disc_folder")
    with pytest.raises(DataValidationError, match="at least 2 folds"):
        DiscDataModule(num_folds=1)
    with pytest.raises(DataValidationError, match="data.fold=3"):
        DiscDataModule(num_folds=3, fold=3)
    with pytest.raises(ValueError, match="data.mask_threshold=0"):
        DiscDataModule(mask_threshold=0)


def test_both_datamodules_log_the_same_loud_banner(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    dr_banner_before_sharing = (
        "\n" + "!" * 78 + "\n"
        "!!  USING SYNTHETIC FUNDUS IMAGES (no dataset given). Metrics say nothing about real   !!\n"
        "!!  patients. Real data: data=aptos|eyepacs data.root=<folder>                         !!\n"
        + "!" * 78
    )
    assert synthetic_data_banner("data=aptos|eyepacs data.root=<folder>") == dr_banner_before_sharing
    dm = DiscDataModule(image_size=32, synthetic_num_images=3, synthetic_raw_size=64,
                        cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="datamodules.optic_disc"):
        dm.prepare_data()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("USING SYNTHETIC FUNDUS IMAGES" in w and "data=disc_folder" in w for w in warnings)
    assert len(list((dm.dataset_root / "images").glob("*.png"))) == 3


def test_test_batches_carry_each_photographs_own_mask_and_crop(tmp_path: Path):
    canvas, true_disc = wide_frame_pair()
    root = write_folder(tmp_path / "disc", [(canvas, true_disc)] * 12)
    dm = make_dm(root, tmp_path, image_size=48)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    sources, boxes = batch[SOURCE_MASK_KEY], batch[SOURCE_CROP_KEY]
    assert isinstance(sources, list) and len(sources) == len(batch["image"]) == len(boxes)
    np.testing.assert_array_equal(sources[0].numpy(), true_disc > 0)  # the original mask, at its own size
    assert SquareCrop(*boxes[0].tolist()) == dm.preprocess_image(canvas)[1]
    assert SOURCE_MASK_KEY not in next(iter(dm.train_dataloader()))  # training never decodes photographs again


def test_coarse_to_fine_training_mixes_disc_crops_and_validation_sees_both_passes(disc_root: Path, tmp_path: Path):
    crops = make_dm(disc_root, tmp_path, augment=False, coarse_to_fine={"enabled": True, "crop_fraction": 1.0})
    whole = make_dm(disc_root, tmp_path, augment=False)
    crops.setup()
    whole.setup()

    def disc_share(dataset, items) -> float:
        return float(np.mean([dataset[i]["mask"].mean().item() for i in items]))

    train = crops.datasets["train"]
    assert len(train) == len(whole.datasets["train"])
    torch.manual_seed(0)
    # every training item is a crop around the disc: the disc fills several times more of the input
    assert disc_share(train, range(len(train))) > 3 * disc_share(whole.datasets["train"], range(len(train)))
    torch.manual_seed(0)
    first = [train[i]["image"] for i in range(3)]
    torch.manual_seed(0)
    torch.testing.assert_close(torch.stack(first), torch.stack([train[i]["image"] for i in range(3)]))  # seeded
    assert not torch.equal(train[0]["image"], train[0]["image"])  # and jittered from draw to draw

    val, n = crops.datasets["val"], len(whole.datasets["val"])
    assert len(val) == 2 * n  # the whole photographs, then their centred disc crops
    torch.testing.assert_close(val[0]["image"], whole.datasets["val"][0]["image"])
    centred = val[n]["mask"][0].numpy()
    rows, cols = np.nonzero(centred)
    assert abs(rows.mean() - 15.5) < 2 and abs(cols.mean() - 15.5) < 2 and val[n]["index"] == 0
    assert len(crops.calibration_dataloader().dataset) == 2 * len(train)  # int8 ranges cover both passes

    batch = next(iter(crops.test_dataloader()))
    photographs, masks = batch[SOURCE_IMAGE_KEY], batch[SOURCE_MASK_KEY]
    assert [p.shape[:2] for p in photographs] == [m.shape for m in masks] and photographs[0].shape[2] == 3
    assert SOURCE_IMAGE_KEY not in next(iter(whole.test_dataloader()))  # one pass: no photographs in batches
    assert crops.inference_spec()["coarse_to_fine"] | {"crop_fraction": 0.5} == CoarseToFine(enabled=True).spec()
    assert whole.inference_spec()["coarse_to_fine"]["enabled"] is False
