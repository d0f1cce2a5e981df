from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.disc_index import (
    InvalidMaskError,
    binarize_mask,
    load_disc_pair,
    read_disc_folder_index,
    read_stems,
    write_synthetic_disc_dataset,
)
from datamodules.errors import DataValidationError
from datamodules.fundus import UnreadableImageError
from datamodules.synthetic import render_fundus


def write_pair(root: Path, stem: str, seed: int = 0, image_suffix: str = ".png", mask_suffix: str = ".png",
               size: int = 64) -> tuple[Path, Path]:
    fundus = render_fundus(seed % 5, size=size, seed=seed)
    image_path, mask_path = root / "images" / f"{stem}{image_suffix}", root / "masks" / f"{stem}{mask_suffix}"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image_path), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(mask_path), fundus.disc_mask)
    return image_path, mask_path


def test_pairs_by_stem_with_other_suffixes_and_odir_names(tmp_path: Path):
    write_pair(tmp_path, "1234_left", image_suffix=".jpg", mask_suffix=".png")
    write_pair(tmp_path, "1234_right", seed=1, image_suffix=".JPEG", mask_suffix=".bmp")
    write_pair(tmp_path, "0007_left", seed=2, image_suffix=".tif", mask_suffix=".tiff")
    (tmp_path / "images" / "notes.txt").write_text("not an image: ignored")
    index = read_disc_folder_index(tmp_path)
    assert list(index.columns) == ["sample_id", "image_path", "mask_path"]
    assert index["sample_id"].tolist() == ["0007_left", "1234_left", "1234_right"]
    assert Path(index.loc[1, "image_path"]).name == "1234_left.jpg"
    assert Path(index.loc[2, "mask_path"]).name == "1234_right.bmp"


def test_missing_root_and_missing_subfolders_are_named(tmp_path: Path):
    with pytest.raises(DataValidationError, match="is not a folder"):
        read_disc_folder_index(tmp_path / "nowhere")
    with pytest.raises(DataValidationError) as raised:
        read_disc_folder_index(tmp_path)
    message = str(raised.value)
    assert f"{tmp_path / 'images'} does not exist" in message and f"{tmp_path / 'masks'} does not exist" in message
    assert "Fix:" in message


def test_every_layout_problem_is_listed_in_one_error(tmp_path: Path):
    write_pair(tmp_path, "good")
    write_pair(tmp_path, "lonely_image")
    (tmp_path / "masks" / "lonely_image.png").unlink()
    write_pair(tmp_path, "lonely_mask")
    (tmp_path / "images" / "lonely_mask.png").unlink()
    write_pair(tmp_path, "twice", image_suffix=".png")
    write_pair(tmp_path, "twice", image_suffix=".jpg")  # two images with one stem
    write_pair(tmp_path, "masks_twice", mask_suffix=".png")
    write_pair(tmp_path, "masks_twice", mask_suffix=".bmp")
    with pytest.raises(DataValidationError) as raised:
        read_disc_folder_index(tmp_path)
    error = raised.value
    assert len(error.problems) == 4
    message = str(error)
    assert "lonely_image.png: no mask 'lonely_image.*'" in message
    assert "lonely_mask.png: no image 'lonely_mask.*'" in message
    assert "2 images share the stem 'twice' (twice.jpg, twice.png)" in message
    assert "2 masks share the stem 'masks_twice' (masks_twice.bmp, masks_twice.png)" in message


def test_an_empty_images_folder_is_an_error(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataValidationError, match="holds no image"):
        read_disc_folder_index(tmp_path)


def test_soft_masks_are_thresholded_as_documented():
    drishti_levels = np.array([[0, 64, 128, 191, 255]], np.uint8)  # 0..4 of four experts
    # 0.5 x 255 = 127.5: pixels marked by at least two of the four experts
    np.testing.assert_array_equal(binarize_mask(drishti_levels, 0.5), [[0, 0, 1, 1, 1]])
    # 0.75 x 255 = 191.25: only the unanimous pixels
    np.testing.assert_array_equal(binarize_mask(drishti_levels, 0.75), [[0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(binarize_mask(drishti_levels, 0.25), [[0, 1, 1, 1, 1]])  # >= 63.75
    with pytest.raises(ValueError, match="must lie in"):
        binarize_mask(drishti_levels, 0.0)


def test_load_pair_reads_a_soft_mask_and_a_16_bit_mask(tmp_path: Path):
    image_path, mask_path = write_pair(tmp_path, "soft")
    soft = np.zeros((64, 64), np.uint8)
    soft[10:20, 10:20], soft[30:40, 30:40] = 64, 191  # one block of 1 vote, one of 3 votes
    cv2.imwrite(str(mask_path), soft)
    image, mask = load_disc_pair(image_path, mask_path, mask_threshold=0.5)
    assert image.shape == (64, 64, 3) and mask.dtype == np.uint8
    assert mask.sum() == 100 and mask[30:40, 30:40].all()
    deep = tmp_path / "masks" / "deep.png"
    cv2.imwrite(str(deep), (soft.astype(np.uint16) * 257))  # the same levels saved as 16 bit
    np.testing.assert_array_equal(load_disc_pair(image_path, deep)[1], mask)


def test_unreadable_files_name_the_file(tmp_path: Path):
    image_path, mask_path = write_pair(tmp_path, "a")
    mask_path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UnreadableImageError, match=r"a\.png: not a readable image"):
        load_disc_pair(image_path, mask_path)
    image_path.write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"a\.png: file is empty"):
        load_disc_pair(image_path, mask_path)


def test_mask_of_another_size_is_an_error_unless_resized(tmp_path: Path):
    image_path, mask_path = write_pair(tmp_path, "half")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    cv2.imwrite(str(mask_path), mask)
    with pytest.raises(InvalidMaskError, match=r"half\.png: mask is 32x32 px but its image half\.png is 64x64"):
        load_disc_pair(image_path, mask_path)
    _, resized = load_disc_pair(image_path, mask_path, resize_masks=True)
    assert resized.shape == (64, 64) and set(np.unique(resized)) == {0, 1}
    assert resized.sum() == 16 * 16 and resized[16:32, 16:32].all()  # nearest: each pixel doubled


def test_mask_without_foreground_is_an_error_with_a_hint_for_0_1_masks(tmp_path: Path):
    image_path, mask_path = write_pair(tmp_path, "empty")
    cv2.imwrite(str(mask_path), np.full((64, 64), 100, np.uint8))
    with pytest.raises(InvalidMaskError, match=r"empty\.png: no disc pixel >= 0\.5 x 255 \(max value 100\)"):
        load_disc_pair(image_path, mask_path)
    labels = np.zeros((64, 64), np.uint8)
    labels[20:30, 20:30] = 1
    cv2.imwrite(str(mask_path), labels)
    with pytest.raises(InvalidMaskError, match="its values are 0-1: save it as 0/255"):
        load_disc_pair(image_path, mask_path)


def test_read_stems_skips_comments_and_suffixes(tmp_path: Path):
    listing = tmp_path / "hard.txt"
    listing.write_text("# hard cases\n1234_left.jpg\n\n  0007_right  # faint disc\ncase.v2\n")
    assert read_stems(listing) == ["1234_left", "0007_right", "case.v2"]
    with pytest.raises(DataValidationError, match="does not exist"):
        read_stems(tmp_path / "missing.txt")


def test_synthetic_writer_is_deterministic_reused_and_consistent(tmp_path: Path):
    first = write_synthetic_disc_dataset(tmp_path / "a", num_images=6, raw_size=64, seed=3)
    second = write_synthetic_disc_dataset(tmp_path / "b", num_images=6, raw_size=64, seed=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 6 * 2 + 2  # images, masks, hard_cases.txt, params.json
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    index = read_disc_folder_index(first)  # the layout the folder reader expects
    assert len(index) == 6
    for row in index.itertuples():
        mask = cv2.imread(row.mask_path, cv2.IMREAD_GRAYSCALE)
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    write_synthetic_disc_dataset(first, num_images=6, raw_size=64, seed=3)
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == mtimes  # reused, not rewritten
    write_synthetic_disc_dataset(first, num_images=4, raw_size=64, seed=3)
    assert len(read_disc_folder_index(first)) == 4  # stale pairs of the bigger set are gone


def test_synthetic_hard_cases_file_lists_the_generator_hard_cases(tmp_path: Path):
    root = write_synthetic_disc_dataset(tmp_path, num_images=8, raw_size=64, seed=1)
    listed = set(read_stems(root / "hard_cases.txt"))
    assert listed  # seed 1 draws hard cases among the first 8, so both branches below are checked
    for row in read_disc_folder_index(root).itertuples():
        index = int(row.sample_id.rsplit("_", 1)[1])
        saved = cv2.cvtColor(cv2.imread(row.image_path), cv2.COLOR_BGR2RGB)
        # Find the grade the writer drew by re-rendering: exactly one grade reproduces the saved photograph.
        renders = [render_fundus(grade, size=64, seed=1 * 100_003 + index) for grade in range(5)]
        matching = [r for r in renders if np.array_equal(r.image, saved)]
        assert len(matching) == 1
        assert (row.sample_id in listed) == matching[0].hard_case
