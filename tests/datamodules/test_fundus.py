from pathlib import Path

import cv2
import numpy as np
import pytest

from datamodules.fundus import (
    FundusPreprocessing,
    PreprocessedImageCache,
    SquareCrop,
    UnreadableImageError,
    ben_graham,
    clahe_lab,
    crop_to_retina,
    mask_on_source,
    read_grey,
    read_rgb,
    retina_square_crop,
)
from datamodules.synthetic import render_fundus
from lightning_modules.seg_metrics import hd95


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
    problems = cache.warm([good, truncated])
    assert len(problems) == 1 and problems[0][0] == 1 and "truncated.jpeg" in problems[0][1]


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


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.int32)


def test_clahe_lab_keeps_shape_dtype_and_hue_and_raises_local_contrast():
    rng = np.random.default_rng(0)
    texture = rng.integers(-6, 7, size=(64, 96, 1))  # faint detail, like vessels on a dim retina
    image = np.clip(np.array([150, 90, 70]) + texture, 0, 255).astype(np.uint8)
    enhanced = clahe_lab(image, clip_limit=2.0, tile_grid=8)
    assert enhanced.shape == image.shape and enhanced.dtype == np.uint8
    before, after = _lab(image), _lab(enhanced)
    assert after[..., 0].std() > 1.5 * before[..., 0].std()  # lightness detail stretched
    assert np.abs(after[..., 1:] - before[..., 1:]).mean() < 3  # a, b (hue) left alone
    np.testing.assert_array_equal(clahe_lab(image, clip_limit=2.0, tile_grid=8), enhanced)  # deterministic


def test_global_equalisation_stretches_lightness_to_the_full_range():
    ramp = np.repeat(np.linspace(100, 130, 64).astype(np.uint8)[None, :, None], 3, axis=2)
    ramp = np.repeat(ramp, 16, axis=0)  # grey: a = b = 128, so no colour can clip
    equalised = clahe_lab(ramp, clip_limit=None, equalize_hist=True)
    lightness = _lab(equalised)[..., 0]
    # equalizeHist maps the darkest level to 0 and the brightest to 255
    assert lightness.min() <= 3 and lightness.max() >= 252
    assert (np.diff(lightness[0]) >= 0).all()  # order of grey levels kept
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        clahe_lab(ramp.astype(np.float32))
    with pytest.raises(ValueError, match="clip_limit=0"):
        clahe_lab(ramp, clip_limit=0)


def test_square_crop_aligns_image_and_mask_and_maps_back():
    canvas = np.zeros((40, 60, 3), np.uint8)
    canvas[5:35, 10:50] = 90  # a 30 x 40 "retina"
    canvas[12:18, 20:26] = 250  # a bright "disc"
    mask = np.zeros((40, 60), np.uint8)
    mask[12:18, 20:26] = 1
    crop = retina_square_crop(canvas)
    assert (crop.top, crop.bottom, crop.left, crop.right, crop.side) == (5, 35, 10, 50, 40)
    assert crop.padding == (5, 5, 0, 0)  # 10 rows of black split over top and bottom
    square_image, square_mask = crop.apply(canvas), crop.apply(mask)
    assert square_image.shape == (40, 40, 3) and square_mask.shape == (40, 40)
    np.testing.assert_array_equal(square_image, crop_to_retina(canvas))  # the crop the DR pipeline uses
    assert (square_image[square_mask == 1] == 250).all() and square_mask.sum() == 36  # still aligned
    assert square_mask[12 - 5 + 5, 20 - 10] == 1  # row 12 -> 12 - top + pad_top, column 20 -> 20 - left
    np.testing.assert_array_equal(crop.to_source(square_mask), mask)
    small = cv2.resize(square_mask, (20, 20), interpolation=cv2.INTER_NEAREST)  # a prediction at 20 px
    back = crop.to_source(small)
    assert back.shape == (40, 60) and np.logical_and(back, mask).sum() / np.logical_or(back, mask).sum() > 0.6
    whole = SquareCrop.whole(canvas.shape)
    assert whole.apply(canvas).shape == (60, 60, 3) and whole.padding == (10, 10, 0, 0)
    with pytest.raises(ValueError, match="applied to one of shape"):
        crop.apply(np.zeros((10, 10), np.uint8))


def test_read_grey_converts_colour_and_names_a_bad_file(tmp_path: Path):
    colour = tmp_path / "mask.png"
    cv2.imwrite(str(colour), np.full((8, 8, 3), 255, np.uint8))
    grey = read_grey(colour)
    assert grey.shape == (8, 8) and grey.dtype == np.uint8 and (grey == 255).all()
    broken = tmp_path / "broken.bmp"
    broken.write_bytes(b"BM not really")
    with pytest.raises(UnreadableImageError, match=r"broken\.bmp: not a readable image"):
        read_grey(broken)


@pytest.mark.parametrize("frame, box", [
    ((300, 500), (40, 280, 90, 470)),   # landscape frame, a wide retina box: padded top and bottom
    ((500, 300), (60, 470, 20, 290)),   # portrait frame, a tall box: padded left and right
    ((257, 391), (0, 257, 0, 391)),     # the whole odd-sized photograph
])
def test_a_probability_map_pasted_back_lands_where_it_was_cut(frame, box):
    height, width = frame
    crop = SquareCrop(*box, height, width)
    assert SquareCrop(*crop.as_tuple()) == crop
    truth = np.zeros(frame, np.uint8)
    centre = ((box[2] + box[3]) // 2 + 17, (box[0] + box[1]) // 2 - 11)  # (x, y), off the box's centre
    cv2.ellipse(truth, centre, (41, 33), 20, 0, 360, 1, thickness=-1)
    # What the network would output for a perfect answer at 64 px: the cut mask, area-resized to probabilities.
    probability = cv2.resize(crop.apply(truth).astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    back = mask_on_source(probability, crop, threshold=0.5)
    assert back.shape == frame and back.dtype == bool
    overlap = np.logical_and(back, truth).sum() / np.logical_or(back, truth).sum()
    (rows, cols), (true_rows, true_cols) = np.nonzero(back), np.nonzero(truth)
    assert overlap > 0.93
    assert abs(rows.mean() - true_rows.mean()) < 1.0 and abs(cols.mean() - true_cols.mean()) < 1.0
    outside = np.ones(frame, bool)
    outside[box[0]:box[1], box[2]:box[3]] = False
    assert not back[outside].any()  # nothing lands outside the box the network saw


def test_smooth_paste_back_follows_the_boundary_nearest_neighbour_draws_stairs():
    # A disc predicted at 32 px and drawn on a 1024 px photograph: nearest neighbour gives 32-px steps.
    side = 1024
    truth = np.zeros((side, side), np.uint8)
    cv2.circle(truth, (530, 470), 160, 1, thickness=-1)
    crop = SquareCrop.whole(truth.shape)
    probability = cv2.resize(truth.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    smooth = mask_on_source(probability, crop, threshold=0.5)
    stairs = crop.to_source((probability > 0.5).astype(np.uint8)) > 0
    assert hd95(smooth, truth) < 0.5 * hd95(stairs, truth)
    assert hd95(smooth, truth) < 6  # a few photograph pixels, not a network pixel (32 px)
