import math

import numpy as np
import pytest
import torch

from lightning_modules.seg_metrics import (
    SegmentationScores,
    binarize,
    hd95,
    image_statistics,
    prefixed,
)


def box(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """Bool (H, W) mask with the half-open rectangle rows[0]:rows[1], cols[0]:cols[1] set."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


EMPTY = torch.zeros(6, 6, dtype=torch.bool)
# Known overlap on a 6x6 image: a 3x3 disc and a 3x4 prediction sharing a 2x2 corner.
DISC = box(6, 6, (1, 4), (1, 4))  # 9 px
PRED = box(6, 6, (2, 5), (2, 6))  # 12 px; overlap rows 2-3, cols 2-3 = 4 px
TP, FP, FN, TN = 4, 8, 5, 36 - 17


def test_overlap_scores_on_a_known_overlap():
    stats = image_statistics(PRED, DISC)
    assert (stats["tp"], stats["fp"], stats["fn"], stats["tn"]) == (TP, FP, FN, TN)
    assert stats["dice"] == pytest.approx(8 / 21)  # 2*4 / (12 + 9)
    assert stats["iou"] == pytest.approx(4 / 17)  # 4 / (12 + 9 - 4)
    assert stats["precision"] == pytest.approx(4 / 12)
    assert stats["recall"] == pytest.approx(4 / 9)
    assert stats["pixel_accuracy"] == pytest.approx(23 / 36)
    assert stats["detected"] == 1
    assert (stats["prediction_count"], stats["false_detections"]) == (1, 0)


def test_numpy_and_zero_one_masks_score_like_bool_tensors():
    from_numpy = image_statistics(PRED.numpy().astype(np.uint8), DISC.numpy())
    assert from_numpy == image_statistics(PRED, DISC)


def test_both_empty_scores_perfectly():
    stats = image_statistics(EMPTY, EMPTY)
    for name in ("dice", "iou", "precision", "recall", "pixel_accuracy"):
        assert stats[name] == 1.0, name
    assert stats["hd95"] == 0.0
    assert (stats["prediction_count"], stats["false_detections"], stats["detected"]) == (0, 0, 0)


@pytest.mark.parametrize(("pred", "target"), [(EMPTY, DISC), (PRED, EMPTY)], ids=["missed", "hallucinated"])
def test_exactly_one_empty_scores_zero_and_the_diagonal(pred, target):
    stats = image_statistics(pred, target)
    for name in ("dice", "iou", "precision", "recall"):
        assert stats[name] == 0.0, name
    assert stats["hd95"] == pytest.approx(math.sqrt(6**2 + 6**2))
    assert stats["detected"] == 0


def test_blob_far_from_the_disc_is_an_additional_false_detection():
    target = box(12, 12, (1, 4), (1, 4))
    pred = box(12, 12, (2, 4), (2, 4)) | box(12, 12, (9, 11), (9, 11))
    stats = image_statistics(pred, target)
    assert (stats["prediction_count"], stats["false_detections"]) == (2, 1)


def test_blob_on_an_empty_target_is_a_false_detection():
    assert image_statistics(PRED, EMPTY)["false_detections"] == 1


@pytest.mark.parametrize(
    ("blob", "false_detections"),
    [
        (box(8, 8, (2, 5), (5, 6)), 0),  # column right next to the disc's right edge: touches
        (box(8, 8, (5, 6), (5, 6)), 0),  # single pixel diagonal to the disc's corner: touches (8-connected)
        (box(8, 8, (2, 5), (6, 7)), 1),  # one background column between blob and disc: does not touch
    ],
    ids=["edge", "corner", "gap"],
)
def test_blob_touching_the_disc_is_not_a_false_detection(blob, false_detections):
    disc = box(8, 8, (2, 5), (2, 5))
    stats = image_statistics(blob, disc)
    assert stats["tp"] == 0 and stats["detected"] == 0
    assert (stats["prediction_count"], stats["false_detections"]) == (1, false_detections)


def test_diagonal_pixels_form_one_component():
    pred = torch.eye(5, dtype=torch.bool)
    assert image_statistics(pred, pred)["prediction_count"] == 1


def test_hd95_of_concentric_squares_matches_hand_computation():
    # Outer square rows/cols 2..21 (boundary 76 px), inner rows/cols 4..19 (boundary 60 px).
    # Inner -> outer: every inner boundary pixel is 2 px from the outer boundary (60 x 2).
    # Outer -> inner: the 4 outer corners are sqrt(8) from the inner corners, their 8 neighbours
    # sqrt(5), the other 64 pixels 2. Sorted, the 136 distances are 124 x 2, 8 x sqrt(5), 4 x sqrt(8);
    # the 95th percentile sits at position 0.95 * 135 = 128.25, inside the sqrt(5) run.
    outer = box(24, 24, (2, 22), (2, 22))
    inner = box(24, 24, (4, 20), (4, 20))
    assert hd95(outer, inner) == pytest.approx(math.sqrt(5))
    assert hd95(inner, outer) == pytest.approx(math.sqrt(5))  # symmetric
    # The plain Hausdorff distance (the maximum) would be sqrt(8): the percentile ignores the corners.
    assert hd95(outer, inner) < math.sqrt(8)


def test_hd95_of_identical_masks_is_zero():
    assert hd95(DISC, DISC) == 0.0


def test_hd95_with_one_empty_mask_is_the_image_diagonal():
    target = box(6, 8, (1, 3), (1, 3))
    assert hd95(torch.zeros(6, 8, dtype=torch.bool), target) == pytest.approx(10.0)  # sqrt(36 + 64)
    assert hd95(target, torch.zeros(6, 8, dtype=torch.bool)) == pytest.approx(10.0)


def test_pooled_and_per_image_means_differ_when_disc_sizes_differ():
    big = box(12, 12, (0, 10), (0, 10))  # 100 px, predicted exactly: dice 1
    tiny = box(12, 12, (11, 12), (11, 12))  # 1 px, missed: dice 0
    metric = SegmentationScores()
    metric.update(torch.stack([big, big]), torch.stack([big, tiny]))
    results = metric.compute()
    # Image 2: target = tiny only, prediction = big -> tp 0, fp 100, fn 1.
    assert results["dice"].item() == pytest.approx((1 + 0) / 2)
    assert results["dice_pooled"].item() == pytest.approx(2 * 100 / (2 * 100 + 100 + 1))
    assert results["recall"].item() == pytest.approx(0.5)
    assert results["recall_pooled"].item() == pytest.approx(100 / 101)
    assert results["precision_pooled"].item() == pytest.approx(100 / 200)
    assert results["iou_pooled"].item() == pytest.approx(100 / 201)
    assert results["pixel_accuracy_pooled"].item() == pytest.approx((144 + 144 - 101) / 288)


def test_compute_means_sums_and_macro_f1():
    metric = SegmentationScores()
    far_blob = box(6, 6, (5, 6), (0, 1))  # bottom-left pixel, 2 px from DISC's dilation
    metric.update(torch.stack([PRED | far_blob, DISC]), torch.stack([DISC, DISC]))
    results = metric.compute()
    precision_1, recall_1 = 4 / 13, 4 / 9  # image 1: PRED plus one false pixel
    mean_precision, mean_recall = (precision_1 + 1) / 2, (recall_1 + 1) / 2
    assert results["precision"].item() == pytest.approx(mean_precision)
    assert results["recall"].item() == pytest.approx(mean_recall)
    expected_f1 = 2 * mean_precision * mean_recall / (mean_precision + mean_recall)
    assert results["f1"].item() == pytest.approx(expected_f1)
    assert results["dice"].item() == pytest.approx((8 / 22 + 1) / 2)
    assert results["hd95"].item() == pytest.approx(hd95(PRED | far_blob, DISC) / 2)
    assert [results[k].item() for k in ("tp", "fp", "fn", "tn")] == [4 + 9, 9, 5, 36 - 18 + 36 - 9]
    assert results["prediction_count"].item() == 3
    assert results["false_detections"].item() == 1
    assert results["false_detections_per_image"].item() == pytest.approx(0.5)
    assert results["images"].item() == 2
    # Pooled F1 is pooled Dice by algebra: the reason the reported f1 is the macro one.
    assert results["dice_pooled"].item() == pytest.approx(2 * 13 / (2 * 13 + 9 + 5))


def test_edge_case_keys_only_with_hard_images():
    preds, targets = torch.stack([PRED, EMPTY, DISC]), torch.stack([DISC, DISC, DISC])
    plain = SegmentationScores()
    plain.update(preds, targets)
    flagged_none = SegmentationScores()
    flagged_none.update(preds, targets, hard=torch.tensor([False, False, False]))
    for results in (plain.compute(), flagged_none.compute()):
        assert not any(name.startswith("edge_case") for name in results)

    metric = SegmentationScores()
    metric.update(preds, targets, hard=torch.tensor([True, True, False]))
    results = metric.compute()
    assert results["edge_case_images"].item() == 2
    assert results["edge_case_detection"].item() == pytest.approx(1 / 2)  # image 1 hit, image 2 missed
    assert results["edge_case_recall"].item() == pytest.approx((4 + 0) / (9 + 9))


def test_two_updates_equal_one_concatenated_update():
    generator = torch.Generator().manual_seed(0)
    preds = torch.rand(5, 1, 10, 10, generator=generator) > 0.6
    targets = torch.rand(5, 1, 10, 10, generator=generator) > 0.6
    hard = torch.tensor([True, False, False, True, False])
    split = SegmentationScores()
    split.update(preds[:1], targets[:1], hard[:1])  # a batch of one, as a last validation batch can be
    split.update(preds[1:], targets[1:], hard[1:])
    whole = SegmentationScores()
    whole.update(preds, targets, hard)
    split_results, whole_results = split.compute(), whole.compute()
    assert split_results.keys() == whole_results.keys()
    for name in whole_results:
        torch.testing.assert_close(split_results[name], whole_results[name], msg=name)
    assert split.per_image() == whole.per_image()


def test_channel_dimension_is_optional():
    with_channel, without_channel = SegmentationScores(), SegmentationScores()
    with_channel.update(torch.stack([PRED, DISC]).unsqueeze(1), torch.stack([DISC, DISC]).unsqueeze(1))
    without_channel.update(torch.stack([PRED, DISC]).int(), torch.stack([DISC, DISC]).int())
    assert with_channel.per_image() == without_channel.per_image()


def test_per_image_rows_follow_update_order():
    metric = SegmentationScores()
    metric.update(torch.stack([PRED]), torch.stack([DISC]), hard=torch.tensor([True]))
    metric.update(torch.stack([EMPTY]), torch.stack([EMPTY]))
    first, second = metric.per_image()
    assert set(first) == {
        "dice",
        "iou",
        "precision",
        "recall",
        "pixel_accuracy",
        "hd95",
        "false_detections",
        "prediction_count",
        "detected",
        "hard",
    }
    assert first["dice"] == pytest.approx(8 / 21)
    assert (first["detected"], first["hard"], first["prediction_count"]) == (1.0, 1.0, 1.0)
    assert (second["dice"], second["detected"], second["hard"], second["hd95"]) == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_reset_forgets_earlier_images():
    metric = SegmentationScores()
    metric.update(torch.stack([EMPTY]), torch.stack([DISC]), hard=torch.tensor([True]))
    metric.compute()
    metric.reset()
    with pytest.raises(RuntimeError, match="update"):
        metric.compute()
    metric.update(torch.stack([DISC]), torch.stack([DISC]))
    results = metric.compute()
    assert results["images"].item() == 1
    assert results["dice"].item() == 1.0
    assert "edge_case_images" not in results


def test_update_rejects_bad_input_with_clear_errors():
    metric = SegmentationScores()
    with pytest.raises(ValueError, match="binarize"):
        metric.update(torch.randn(2, 1, 6, 6), torch.stack([DISC, DISC]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.stack([DISC]), torch.zeros(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        metric.update(torch.zeros(1, 3, 6, 6, dtype=torch.bool), torch.zeros(1, 3, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="one flag per image"):
        metric.update(torch.stack([DISC]), torch.stack([DISC]), hard=torch.tensor([True, False]))


def test_binarize_thresholds_the_sigmoid_strictly():
    logits = torch.tensor([-1.0, 0.0, 1e-3, 2.0])
    assert binarize(logits).tolist() == [False, False, True, True]  # sigmoid(0) = 0.5 is not > 0.5
    assert binarize(logits, threshold=0.9).tolist() == [False, False, False, False]  # sigmoid(2) = 0.881
    assert binarize(logits).dtype == torch.bool
    with pytest.raises(ValueError, match="threshold"):
        binarize(logits, threshold=1.5)


def test_prefixed_gives_stable_mlflow_names():
    flat = prefixed({"dice": torch.tensor(0.25), "images": torch.tensor(3)}, "val")
    assert flat == {"val/dice": 0.25, "val/images": 3.0}
    assert all(isinstance(value, float) for value in flat.values())
    with pytest.raises(ValueError, match="scalar"):
        prefixed({"per_class": torch.tensor([0.1, 0.2])}, "test")
