"""Coarse-to-fine geometry: finding the disc on the first pass, the second pass's crop, jittered training crops."""

import cv2
import numpy as np
import pytest

from datamodules.disc_crops import (
    FOUND,
    NO_DISC,
    SEVERAL,
    CoarseToFine,
    DiscSearch,
    disc_box,
    disc_region,
    find_disc,
    jittered_crop,
    mask_disc,
    second_pass_box,
)
from datamodules.fundus import SquareCrop, mask_on_source
from datamodules.optic_disc import DiscPreprocessing, coarse_to_fine_mask


def test_the_first_pass_blob_is_located_in_photograph_pixels():
    crop = SquareCrop.whole((200, 300))  # a 300 px square: 50 black rows above and below the photograph
    probability = np.zeros((30, 30), np.float32)  # one network pixel = 10 photograph pixels
    probability[10:15, 5:10] = 0.9
    probability[25, 25] = 0.9  # a speck under min_blob_fraction of the disc: ignored
    search = find_disc(probability, crop)
    assert search.status == FOUND
    assert (search.centre_x, search.centre_y, search.diameter) == pytest.approx((75.0, 75.0, 50.0))


def test_no_blob_or_two_comparable_blobs_are_reported_not_guessed():
    crop = SquareCrop.whole((64, 64))
    assert find_disc(np.zeros((16, 16)), crop).status == NO_DISC
    two = np.zeros((16, 16))
    two[2:5, 2:5] = two[10:13, 10:14] = 1.0
    assert find_disc(two, crop).status == SEVERAL
    with pytest.raises(ValueError, match="no second pass without a disc"):
        second_pass_box(DiscSearch(NO_DISC), CoarseToFine(enabled=True), (64, 64))


@pytest.mark.parametrize("centre", [(150, 100), (8, 190), (292, 5)])  # inside, near a corner, at the edge
def test_the_second_pass_box_is_centred_on_the_disc_and_clipped_to_the_photograph(centre):
    shape = (200, 300)
    box = disc_box(*centre, side=90, source_shape=shape)
    assert 0 <= box.top < box.bottom <= shape[0] and 0 <= box.left < box.right <= shape[1]
    image = np.zeros(shape, np.uint8)
    cv2.circle(image, centre, 10, 1, thickness=-1)
    cut = box.apply(image)
    assert cut.shape[0] == cut.shape[1] == box.side
    np.testing.assert_array_equal(box.to_source(cut), image * _inside(box, shape))  # the cut goes back exactly
    if box.side == 90:  # not clipped: the disc sits in the middle of the crop
        disc = mask_disc(cut)
        assert abs(disc.centre_x - 45) <= 1 and abs(disc.centre_y - 45) <= 1


def _inside(box: SquareCrop, shape) -> np.ndarray:
    inside = np.zeros(shape, np.uint8)
    inside[box.top:box.bottom, box.left:box.right] = 1
    return inside


def make_photo(shape=(400, 600), centre=(420, 170), radius=45):
    image = np.full((*shape, 3), 40, np.uint8)
    mask = np.zeros(shape, np.uint8)
    cv2.circle(image, centre, radius, (230, 210, 120), thickness=-1)
    cv2.circle(mask, centre, radius, 1, thickness=-1)
    return image, mask


def test_an_unjittered_crop_puts_the_disc_in_the_middle_at_its_share_of_the_side():
    image, mask = make_photo()
    settings = CoarseToFine(enabled=True, crop_scale=3.0)
    crop_image, crop_mask = jittered_crop(image, mask, mask_disc(mask), settings, 96, np.random.default_rng(0),
                                          jitter=False)
    assert crop_image.shape == (96, 96, 3) and crop_mask.shape == (96, 96) and set(np.unique(crop_mask)) == {0, 1}
    disc = mask_disc(crop_mask)
    assert abs(disc.centre_x - 48) <= 1 and abs(disc.centre_y - 48) <= 1
    assert disc.diameter == pytest.approx(96 / 3, abs=1.5)
    assert crop_image[48, 48].tolist() == [230, 210, 120]


def test_jittered_crops_vary_within_the_configured_scale_and_shift():
    image, mask = make_photo()
    settings = CoarseToFine(enabled=True, crop_scale=3.0, scale_jitter=0.25, shift_jitter=0.25)
    rng = np.random.default_rng(1)
    diameters, offsets = [], []
    for _ in range(40):
        _, crop_mask = jittered_crop(image, mask, mask_disc(mask), settings, 96, rng)
        disc = mask_disc(crop_mask)
        diameters.append(disc.diameter)
        offsets.append(max(abs(disc.centre_x - 48), abs(disc.centre_y - 48)))
    # the side is 3 x 1.25^(+-1) diameters, so the disc spans 96/3.75 .. 96/2.4 px
    assert min(diameters) >= 96 / 3.75 - 1.5 and max(diameters) <= 96 / 2.4 + 1.5
    assert np.ptp(diameters) > 5  # it does vary
    # shifted by up to 0.25 diameters of the disc: at most 0.25 x 40 px in the crop
    assert max(offsets) <= 0.25 * 96 / 2.4 + 1.5 and np.ptp(offsets) > 2


@pytest.mark.parametrize("centre", [(300, 200), (560, 40)])  # mid-photograph; near a corner (clipped, padded)
def test_the_cached_region_holds_the_disc_at_a_known_scale(centre):
    image, mask = make_photo(centre=centre)
    settings = CoarseToFine(enabled=True)
    context = 1.1 * settings.largest_crop_scale
    region, region_mask = disc_region(image, mask, context, 192)
    assert region.shape == (192, 192, 3) and region_mask.shape == (192, 192) and region_mask.max() == 1
    disc, in_region = mask_disc(mask), mask_disc(region_mask)
    box = disc_box(disc.centre_x, disc.centre_y, context * disc.diameter, mask.shape)
    # the region is the context box resized to 192 px; clipped at the photograph's border, it is smaller
    assert in_region.diameter == pytest.approx(disc.diameter * 192 / box.side, abs=1.5)
    if box.side == round(context * disc.diameter):  # not clipped: the widest training crop fits, with margin
        assert in_region.diameter == pytest.approx(192 / context, abs=1.5)


def test_settings_are_checked_and_unknown_keys_named():
    with pytest.raises(ValueError, match="crop_scale=1.0 must be >= 1.2"):
        CoarseToFine(crop_scale=1.0)
    with pytest.raises(ValueError, match="crop_fraction=1.5 must lie in"):
        CoarseToFine(crop_fraction=1.5)
    with pytest.raises(ValueError, match="has no key crop_scal: its keys are enabled, crop_scale"):
        CoarseToFine.from_config({"crop_scal": 2.0})
    assert CoarseToFine.from_spec(None) == CoarseToFine() and not CoarseToFine().enabled
    settings = CoarseToFine(enabled=True, crop_scale=2.5)
    assert CoarseToFine.from_spec(settings.spec()) == settings


def test_the_second_pass_recovers_the_outline_a_coarse_first_pass_only_approximates():
    image, truth = make_photo(shape=(800, 1200), centre=(850, 330), radius=70)
    truth = truth.astype(bool)
    preprocessing = DiscPreprocessing(image_size=32, crop_to_retina=False, clahe=False)
    first_crop = SquareCrop.whole(truth.shape)
    # a 32 px first pass: the disc is ~4 network pixels wide
    first = cv2.resize(first_crop.apply(truth.astype(np.float32)), (32, 32), interpolation=cv2.INTER_AREA)
    settings = CoarseToFine(enabled=True)
    box = second_pass_box(find_disc(first, first_crop), settings, truth.shape)
    # what a network that outlines the disc exactly would return on the crop
    crop_answer = cv2.resize(box.apply(truth.astype(np.float32)), (32, 32), interpolation=cv2.INTER_AREA)
    calls = []

    def perfect_network(tensor):
        calls.append(tuple(tensor.shape))
        return crop_answer

    refined, search = coarse_to_fine_mask(image, first, first_crop, preprocessing, settings, 0.5, perfect_network)
    assert search.status == FOUND and calls == [(1, 3, 32, 32)]
    # inside the crop the two passes' probabilities are averaged; outside it nothing is disc
    first_on_photo = first_crop.to_source(first, smooth=True)
    second_on_photo = box.to_source(crop_answer, smooth=True)
    expected = np.zeros(truth.shape, bool)
    inside = (slice(box.top, box.bottom), slice(box.left, box.right))
    expected[inside] = (first_on_photo[inside] + second_on_photo[inside]) / 2 > 0.5
    np.testing.assert_array_equal(refined, expected)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    coarse = mask_on_source(first, first_crop, 0.5)
    assert dice(refined, truth) > 0.95 and dice(refined, truth) > dice(coarse, truth)
    # no disc on the first pass: its own mask, and no second pass
    empty, search = coarse_to_fine_mask(image, np.zeros((32, 32), np.float32), first_crop, preprocessing, settings,
                                        0.5, perfect_network)
    assert search.status == NO_DISC and not empty.any() and len(calls) == 1
