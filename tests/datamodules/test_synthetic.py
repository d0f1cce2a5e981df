"""The synthetic fundus generator: determinism, format, the disc mask, and grade-dependent lesions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datamodules.synthetic import SyntheticFundus, render_fundus

SEEDS = range(10)


def _retina(image: np.ndarray) -> np.ndarray:
    return image.max(axis=2) > 0


def _exudate_pixels(fundus: SyntheticFundus) -> int:
    """Bright yellow-white pixels (exudates, cotton-wool spots) away from the disc, by colour thresholds."""
    rgb = fundus.image.astype(np.int32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    near_disc = cv2.dilate(
        fundus.disc_mask, np.ones((3, 3), np.uint8), iterations=fundus.image.shape[0] // 16
    )
    yellow = (green > 0.72 * red) & (red > 100) & (blue < 0.8 * green)
    return int((yellow & (near_disc == 0) & _retina(fundus.image)).sum())


def _red_blobs(fundus: SyntheticFundus) -> int:
    """Compact dark spots (microaneurysms, haemorrhages): components much darker than the local green level.

    Vessels are just as dark but long and thin, so they fail the compactness test.
    """
    green = fundus.image[..., 1]
    size = green.shape[0]
    background = cv2.medianBlur(green, 2 * (size // 24) + 1).astype(np.float32)
    inside = cv2.erode(_retina(fundus.image).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    dark = ((green < 0.6 * background) & inside).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    area, width, height = (stats[1:, k] for k in (cv2.CC_STAT_AREA, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    compact = (
        (area >= 3)
        & (np.maximum(width, height) <= 3 * np.minimum(width, height))
        & (area > 0.45 * width * height)
    )
    return int(compact.sum())


@pytest.fixture(scope="module")
def by_grade() -> dict[int, list[SyntheticFundus]]:
    """Ten normal-disc 192 px photographs per grade 0, 3 and 4, rendered once for the grade tests."""
    return {
        grade: [render_fundus(grade, size=192, seed=s, hard_case=False) for s in SEEDS] for grade in (0, 3, 4)
    }


def test_same_arguments_give_identical_arrays_and_other_seeds_differ():
    a, b = render_fundus(3, size=96, seed=5), render_fundus(3, size=96, seed=5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.disc_mask, b.disc_mask)
    assert a.hard_case == b.hard_case and a.grade == b.grade == 3
    assert not np.array_equal(a.image, render_fundus(3, size=96, seed=6).image)
    forced = render_fundus(3, size=96, seed=5, hard_case=True)
    assert np.array_equal(forced.image, render_fundus(3, size=96, seed=5, hard_case=True).image)
    assert forced.hard_case


def test_forcing_the_drawn_hard_case_flag_changes_nothing():
    drawn = render_fundus(1, size=80, seed=11)
    forced = render_fundus(1, size=80, seed=11, hard_case=drawn.hard_case)
    assert np.array_equal(drawn.image, forced.image) and np.array_equal(drawn.disc_mask, forced.disc_mask)


@pytest.mark.parametrize("size", [64, 97, 160])
def test_shapes_dtypes_values_and_black_corners(size):
    fundus = render_fundus(4, size=size, seed=2)
    assert fundus.image.shape == (size, size, 3) and fundus.image.dtype == np.uint8
    assert fundus.disc_mask.shape == (size, size) and fundus.disc_mask.dtype == np.uint8
    assert set(np.unique(fundus.disc_mask)) == {0, 255}
    corners = fundus.image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert not corners.any()
    # A real photograph, not a blank: the retina covers most of the inscribed circle and is reddish.
    retina = _retina(fundus.image)
    assert retina.mean() > 0.6
    mean_rgb = fundus.image[retina].mean(axis=0)
    assert mean_rgb[0] > mean_rgb[1] > mean_rgb[2]


def test_disc_mask_is_non_empty_and_inside_the_retina_including_hard_cases():
    hard_seen = 0
    for seed in range(40):
        hard = True if seed % 2 else None
        fundus = render_fundus(seed % 5, size=128, seed=seed, hard_case=hard)
        hard_seen += fundus.hard_case
        disc = fundus.disc_mask > 0
        assert disc.sum() >= 20, f"seed {seed}: only {disc.sum()} disc pixels"
        assert not (disc & ~_retina(fundus.image)).any(), f"seed {seed}: disc mask outside the retina"
    assert hard_seen >= 20


def test_hard_cases_happen_at_roughly_the_documented_rate():
    rate = np.mean([render_fundus(0, size=64, seed=s).hard_case for s in range(80)])
    assert 0.05 <= rate <= 0.3


def test_a_normal_disc_is_brighter_than_the_rest_of_the_retina():
    for seed in range(15):
        fundus = render_fundus(seed % 5, size=128, seed=seed, hard_case=False)
        grey = fundus.image.astype(np.float32).mean(axis=2)
        disc = fundus.disc_mask > 0
        rest = _retina(fundus.image) & ~disc
        assert grey[disc].mean() > 1.25 * grey[rest].mean(), f"seed {seed}"


def test_disc_is_on_one_side_and_the_vessels_converge_on_it():
    # Dark (vessel) pixels are denser in a ring around the disc than in a ring as far from the disc on
    # the opposite side of the retina: the tree starts at the disc.
    for seed in range(6):
        fundus = render_fundus(0, size=192, seed=seed, hard_case=False)
        ys, xs = np.nonzero(fundus.disc_mask)
        cy, cx = ys.mean(), xs.mean()
        assert abs(cx - 96) > 0.2 * 96  # nasal: well off the centre horizontally
        green = fundus.image[..., 1].astype(np.float32)
        background = cv2.medianBlur(fundus.image[..., 1], 25).astype(np.float32)
        dark = green < 0.75 * background
        yy, xx = np.indices(green.shape)
        near = np.hypot(yy - cy, xx - cx)
        mirrored = np.hypot(yy - cy, xx - (192 - cx))
        band = (near > 15) & (near < 35)
        band_far = (mirrored > 15) & (mirrored < 35)
        assert dark[band].mean() > 1.3 * dark[band_far].mean(), f"seed {seed}"


def test_hard_case_disc_can_be_cut_by_the_retina_rim():
    # Some hard cases push the disc over the rim: the mask is then clipped by the circle (mask pixels touch
    # the black surround), and it stays non-empty.
    clipped = 0
    for seed in range(30):
        fundus = render_fundus(1, size=96, seed=seed, hard_case=True)
        ring = cv2.dilate(fundus.disc_mask, np.ones((3, 3), np.uint8)) > 0
        clipped += bool((ring & ~_retina(fundus.image)).any())
        assert fundus.disc_mask.any()
    assert clipped >= 3


def test_exudate_pixels_grow_with_the_grade(by_grade):
    exudates = {grade: np.mean([_exudate_pixels(f) for f in images]) for grade, images in by_grade.items()}
    assert exudates[0] < 2
    assert exudates[3] > 20 and exudates[4] > 20


def test_red_lesions_grow_with_the_grade(by_grade):
    blobs = {grade: np.array([_red_blobs(f) for f in images]) for grade, images in by_grade.items()}
    assert blobs[3].mean() > 2 * blobs[0].mean() + 5
    assert blobs[4].mean() > 2 * blobs[0].mean() + 5
    assert np.median(blobs[3]) > blobs[0].max() * 0.8  # not a few outliers carrying the mean


def test_grade_1_and_2_sit_between_grade_0_and_grade_3():
    def mean_blobs(grade: int) -> float:
        return float(np.mean([_red_blobs(render_fundus(grade, 192, s, hard_case=False)) for s in range(8)]))

    none, mild, moderate = mean_blobs(0), mean_blobs(1), mean_blobs(2)
    assert none < mild < moderate


def test_grade_0_and_4_differ_measurably():
    healthy, proliferative = render_fundus(0, size=160, seed=3), render_fundus(4, size=160, seed=3)
    assert np.abs(healthy.image.astype(np.int16) - proliferative.image.astype(np.int16)).mean() > 3
    assert _red_blobs(proliferative) > _red_blobs(healthy) + 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grade": -1}, "grade"),
        ({"grade": 5}, "grade"),
        ({"grade": 2.5}, "grade"),
        ({"grade": True}, "grade"),
        ({"grade": 0, "size": 63}, "size"),
        ({"grade": 0, "size": 128.0}, "size"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_fundus(**kwargs)


def test_numpy_integers_and_negative_seeds_are_accepted():
    fundus = render_fundus(np.int64(2), size=np.int32(64), seed=-7)
    assert fundus.grade == 2 and isinstance(fundus.grade, int)
    assert fundus.image.shape == (64, 64, 3)
