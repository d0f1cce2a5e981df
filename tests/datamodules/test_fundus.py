from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.errors import DataValidationError
from datamodules.fundus import (
    FundusPreprocessing,
    PreprocessedImageCache,
    UnreadableImageError,
    ben_graham,
    crop_to_retina,
    read_rgb,
)
from datamodules.synthetic import render_fundus


def test_crop_to_retina_removes_black_border_and_pads_to_square():
    retina = render_fundus(2, size=100, seed=1).image
    canvas = np.zeros((160, 300, 3), np.uint8)  # a wide camera frame with black borders
    canvas[30:130, 100:200] = retina
    cropped = crop_to_retina(canvas)
    assert cropped.shape[0] == cropped.shape[1] <= 100
    assert cropped.mean() > canvas.mean() * 2


def test_crop_keeps_a_circle_cut_at_top_and_bottom_round():
    circle = np.zeros((200, 200, 3), np.uint8)
    cv2.circle(circle, (100, 100), 90, (200, 80, 40), -1)
    cut = circle[40:160]  # EyePACS-style: circle clipped by the sensor
    cropped = crop_to_retina(cut)
    # padded to the circle's full width (181 px), not stretched to the cut height
    assert cropped.shape[0] == cropped.shape[1] == 181
    assert cropped[0].max() == 0 and cropped[90].max() > 0


def test_preprocessing_size_and_ben_graham_keeps_black_surround():
    image = render_fundus(3, size=300, seed=2).image
    out = FundusPreprocessing(image_size=96, ben_graham=True)(image)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert out[0, 0].sum() == 0 and out[48, 48].sum() > 0
    flat = ben_graham(np.full((64, 64, 3), 120, np.uint8))
    assert abs(int(flat[32, 32, 0]) - 128) <= 1  # local average removed: flat grey -> mid grey


def test_read_rgb_errors_name_the_file(tmp_path: Path):
    with pytest.raises(UnreadableImageError, match="does not exist"):
        read_rgb(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"empty\.png: file is empty"):
        read_rgb(empty)
    garbage = tmp_path / "garbage.jpeg"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(UnreadableImageError, match="garbage.jpeg: not a readable image"):
        read_rgb(garbage)


def test_truncated_jpeg_is_reported_by_warm(tmp_path: Path):
    good = tmp_path / "good.jpeg"
    cv2.imwrite(str(good), render_fundus(1, size=128, seed=0).image)
    truncated = tmp_path / "truncated.jpeg"
    truncated.write_bytes(good.read_bytes()[:200])
    cache = PreprocessedImageCache(tmp_path / "cache", FundusPreprocessing(image_size=64))
    with pytest.raises(DataValidationError) as raised:
        cache.warm([good, truncated])
    assert "1 of 2 images cannot be read" in str(raised.value) and "truncated.jpeg" in str(raised.value)


def test_cache_hit_and_corrupt_entry_is_rebuilt(tmp_path: Path):
    source = tmp_path / "a.png"
    cv2.imwrite(str(source), render_fundus(0, size=128, seed=3).image)
    cache = PreprocessedImageCache(tmp_path / "cache", FundusPreprocessing(image_size=64))
    first = cache.load(source)
    entries = list(cache.root.rglob("*.npy"))
    assert len(entries) == 1
    entries[0].write_bytes(b"corrupt")
    again = cache.load(source)
    np.testing.assert_array_equal(first, again)
    assert np.load(entries[0]).shape == (64, 64, 3)  # rewritten
    other = PreprocessedImageCache(tmp_path / "cache", FundusPreprocessing(image_size=32))
    assert other.load(source).shape == (32, 32, 3)  # parameters are part of the key
