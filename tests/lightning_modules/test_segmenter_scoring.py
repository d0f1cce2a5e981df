"""DiscSegmenter's test scores: at the photograph's own size (test/*) and at the network's (test_net/*)."""

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from datamodules.fundus import SquareCrop
from datamodules.optic_disc import SOURCE_CROP_KEY, SOURCE_MASK_KEY
from lightning_modules.segmenter import DiscSegmenter

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

NET_SIZE = 30
SCALE = 10  # a 300 px square box: one network pixel is ten photograph pixels


class FixedLogits(nn.Module):
    """Stands in for the network: the test is about what is done with its output."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits


def photograph_disc(centre: tuple[int, int]) -> np.ndarray:
    """A 200 x 300 photograph's disc mask (uint8 0/1)."""
    mask = np.zeros((200, 300), np.uint8)
    cv2.circle(mask, centre, 45, 1, thickness=-1)
    return mask


def make_batch(shift_network_pixels: int, with_sources: bool = True) -> dict:
    truths = [photograph_disc((150, 100)), photograph_disc((90, 120))]
    crop = SquareCrop.whole(truths[0].shape)  # padded with 50 black rows above and below
    squares = [crop.apply(truth).astype(np.float32) for truth in truths]
    small = [cv2.resize(square, (NET_SIZE, NET_SIZE), interpolation=cv2.INTER_AREA) for square in squares]
    # the network answers with the right disc moved right by a whole number of its own pixels
    predicted = [np.roll(p, shift_network_pixels, axis=1) for p in small]
    # logits whose sigmoid is the network-resolution share of disc in each pixel
    logits = torch.logit(torch.from_numpy(np.stack(predicted)).clamp(1e-4, 1 - 1e-4))[:, None]
    batch = {
        "image": torch.zeros(2, 3, NET_SIZE, NET_SIZE),
        "mask": torch.from_numpy((np.stack(small) > 0.5).astype(np.float32))[:, None],
        "hard": torch.tensor([False, False]),
    }
    if with_sources:
        batch[SOURCE_MASK_KEY] = [torch.from_numpy(truth) for truth in truths]
        batch[SOURCE_CROP_KEY] = torch.tensor([crop.as_tuple()] * 2)
    return batch | {"logits": logits}


def scored(batch: dict) -> dict[str, float]:
    module = DiscSegmenter(base=8, channels_last=False)
    module.net = FixedLogits(batch.pop("logits"))
    module.on_test_epoch_start()
    module.test_step(batch, 0)
    module.on_test_epoch_end()
    return module.test_results


def test_boundary_distances_are_in_photograph_pixels():
    results = scored(make_batch(shift_network_pixels=1))
    assert results["test/at_source_resolution"] == 1.0 and results["test/images"] == 2
    # the same one-pixel miss: about 1 px at the network's resolution, about SCALE px on the photograph
    assert results["test_net/hd95"] <= 1.5
    assert 0.7 * SCALE <= results["test/hd95"] <= 1.3 * SCALE
    assert results["test/dice"] == pytest.approx(results["test_net/dice"], abs=0.05)
    # the photograph's pixels were counted: its 200 x 300 frame, not the network's 30 x 30
    assert results["test/tp"] + results["test/fp"] + results["test/fn"] + results["test/tn"] == 2 * 200 * 300
    assert results["test_net/tp"] + results["test_net/fp"] + results["test_net/fn"] + results["test_net/tn"] == (
        2 * NET_SIZE * NET_SIZE)


def test_a_right_answer_scores_near_one_on_the_photograph():
    results = scored(make_batch(shift_network_pixels=0))
    assert results["test/dice"] > 0.97 and results["test/hd95"] <= 2.0
    assert results["test/false_detections"] == 0


def test_a_loader_without_source_masks_is_scored_at_the_network_resolution_and_says_so():
    results = scored(make_batch(shift_network_pixels=1, with_sources=False))
    assert results["test/at_source_resolution"] == 0.0
    assert results["test/hd95"] == pytest.approx(results["test_net/hd95"])
    assert results["test/dice"] == pytest.approx(results["test_net/dice"])
