"""GradCAM, CBAM attention, calibration and the explanation figures, on tiny random networks and made-up data."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from torch import nn

from datamodules.dr import evaluation_transform
from datamodules.synthetic import render_fundus
from datamodules.topology import PersistenceImager, TopologyConfig, image_diagrams
from lightning_modules.explain import (
    FALSE_DETECTION_RGB,
    PREDICTED_CONTOUR_RGB,
    TRUE_CONTOUR_RGB,
    cbam_spatial_attention,
    denormalize_image,
    draw_segmentation_overlay,
    expected_calibration_error,
    false_detection_mask,
    grad_cam_heatmaps,
    grad_cam_target_layer,
    overlay_heatmap,
    persistence_view,
    plot_grading_explanation,
    plot_precision_recall_curves,
    plot_reliability_diagram,
    plot_segmentation_overlay,
    reliability_bins,
)
from lightning_modules.nets.student import build_student_net
from lightning_modules.nets.vgg_unet import VGGUNet
from lightning_modules.seg_metrics import component_counts

SIZE = 128  # test_efficientnet reduces 32x: a 4x4 feature map, enough for a map with structure
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def structured_images(count: int = 2) -> torch.Tensor:
    """Normalised-looking images: a bright square and a dark one at different places per image."""
    images = torch.zeros(count, 3, SIZE, SIZE)
    for i in range(count):
        images[i, :, 16 + 24 * i:56 + 24 * i, 20:64] = 2.0
        images[i, :, 80:120, 60 + 10 * i:100 + 10 * i] = -2.0
    return images


def tiny_student(topo_features: int = 8):
    torch.manual_seed(0)
    return build_student_net("test_efficientnet", topo_features=topo_features)


class BlobEvidence(nn.Module):
    """Class 0 = mean of relu(red), class 1 = mean of relu(-red): GradCAM of class 0 is exactly the red blob."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, kernel_size=1, bias=False), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2, bias=False))
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[1, 0] = -1.0
            self.head[2].weight.copy_(torch.eye(2))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


# ------------------------------------------------------------------------------------------- GradCAM
def test_grad_cam_of_a_hand_built_net_is_its_evidence():
    net = BlobEvidence()
    image = torch.zeros(1, 3, 16, 16)
    image[0, 0, 4:12, 2:6] = 1.0
    heatmap = grad_cam_heatmaps(net, (image,), net.features)[0]  # predicted class 0
    # weights = mean gradient of class 0 over channel 0 (1/256), cam = relu(w * red blob): 1 on the blob, 0 off it
    np.testing.assert_allclose(heatmap[4:12, 2:6], 1.0, atol=1e-5)
    assert heatmap.sum() == pytest.approx(32.0, abs=1e-3)
    # class 1's evidence, relu(-red), is nowhere: an all-zero map
    assert np.abs(grad_cam_heatmaps(net, (image,), net.features, target_classes=[1])).max() == 0


def test_grad_cam_on_a_timm_classifier_has_the_image_shape_and_structure():
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet", num_classes=5)
    with torch.inference_mode():  # as in a Lightning test hook
        images = structured_images()
    heatmaps = grad_cam_heatmaps(teacher, (images,), grad_cam_target_layer(teacher))
    assert heatmaps.shape == (2, SIZE, SIZE) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    for heatmap in heatmaps:
        assert heatmap.std() > 0.05 and heatmap.max() == pytest.approx(1.0, abs=1e-3)


def test_grad_cam_of_the_student_restores_mode_and_flags_and_leaves_no_gradients():
    student = tiny_student()
    student.train()
    student.head.requires_grad_(False)
    flags = [p.requires_grad for p in student.parameters()]
    heatmaps = grad_cam_heatmaps(student, (structured_images(), torch.randn(2, 8)), student.cbam, [1, 3])
    assert heatmaps.shape == (2, SIZE, SIZE) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert all(h.std() > 0.05 for h in heatmaps)
    assert student.training and [p.requires_grad for p in student.parameters()] == flags
    assert all(p.grad is None for p in student.parameters())
    with pytest.raises(ValueError, match="one per image"):
        grad_cam_heatmaps(student, (structured_images(), torch.randn(2, 8)), student.cbam, [1])


def test_grad_cam_of_the_segmenter_explains_its_mask():
    torch.manual_seed(0)
    unet = VGGUNet(base=4).eval()
    heatmaps = grad_cam_heatmaps(unet, (structured_images()[:, :, :64, :64],), grad_cam_target_layer(unet))
    assert heatmaps.shape == (2, 64, 64) and heatmaps.min() >= 0 and heatmaps.max() <= 1 and heatmaps.std() > 0.01


class TwoBlobMask(nn.Module):
    """Mask logits relu(red) + relu(green) - 4 from the feature map (relu(red), relu(green)).

    The head's ReLU passes a gradient only where a channel is positive, so GradCAM's weight of a channel is the
    share of pixels counted as disc that lie on that channel's blob: which blobs the map shows depends on the
    probability threshold that decides which pixels are disc.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, kernel_size=1, bias=False), nn.ReLU())
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 1, kernel_size=1))
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[1, 1] = 1.0
            self.head[1].weight.fill_(1.0)
            self.head[1].bias.fill_(-4.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def test_grad_cam_of_a_mask_explains_the_pixels_above_the_probability_threshold():
    net = TwoBlobMask()
    image = torch.zeros(1, 3, 16, 16)
    image[0, 0, 2:6, 2:6] = 7.0  # red blob: logit 3, probability 0.95
    image[0, 1, 10:14, 10:14] = 4.0  # green blob: logit 0, probability 0.5; background: logit -4 (0.018)
    red, green = (slice(2, 6), slice(2, 6)), (slice(10, 14), slice(10, 14))
    strict = grad_cam_heatmaps(net, (image,), net.features, threshold=0.9)[0]
    lenient = grad_cam_heatmaps(net, (image,), net.features, threshold=0.1)[0]
    # t = 0.9 (logit > 2.20): the red blob alone is disc, so only the red channel gets a weight
    np.testing.assert_allclose(strict[red], 1.0, atol=1e-5)
    assert strict.sum() == pytest.approx(16.0, abs=1e-3)
    # t = 0.1 (logit > -2.20): both blobs are disc, equal areas give equal weights, the map is 7 : 4
    np.testing.assert_allclose(lenient[red], 1.0, atol=1e-5)
    np.testing.assert_allclose(lenient[green], 4 / 7, atol=1e-5)
    assert lenient.sum() == pytest.approx(16.0 + 16.0 * 4 / 7, abs=1e-3)
    # the default 0.5 (logit > 0): the green blob's logit 0 is not above it
    np.testing.assert_allclose(grad_cam_heatmaps(net, (image,), net.features)[0], strict, atol=1e-6)
    with pytest.raises(ValueError, match="threshold=1.0"):
        grad_cam_heatmaps(net, (image,), net.features, threshold=1.0)


def test_target_layers_of_the_project_networks():
    student = tiny_student()
    assert grad_cam_target_layer(student) is student.cbam
    unet = VGGUNet(base=4)
    assert grad_cam_target_layer(unet) is unet.encoder[-1]
    efficientnet = timm.create_model("test_efficientnet", num_classes=5)
    assert grad_cam_target_layer(efficientnet) is efficientnet.bn2
    resnet = timm.create_model("test_resnet", num_classes=5)
    assert grad_cam_target_layer(resnet) is resnet.layer4  # from timm's feature_info
    with pytest.raises(ValueError, match="no known feature layer in a Sequential"):
        grad_cam_target_layer(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------ CBAM attention
def test_cbam_attention_has_the_image_shape_and_varies():
    student = tiny_student()
    attention = cbam_spatial_attention(student, structured_images())
    assert attention.shape == (2, SIZE, SIZE) and attention.dtype == np.float32
    assert attention.min() >= 0 and attention.max() <= 1
    assert all(np.ptp(a) > 1e-4 for a in attention)  # PyTorch's init of the 7x7 gate conv is nearly flat
    with torch.no_grad():  # gate = sigmoid(50 x channel max) of the random backbone's features
        weight = student.cbam.spatial.conv.conv.weight
        weight.zero_()
        weight[0, 1, 3, 3] = 50.0
    attention = cbam_spatial_attention(student, structured_images())
    assert attention.min() >= 0 and attention.max() <= 1 and all(np.ptp(a) > 0.2 for a in attention)


def test_cbam_attention_is_the_gates_sigmoid():
    student = tiny_student()
    with torch.no_grad():
        student.cbam.spatial.conv.conv.weight.zero_()
        student.cbam.spatial.conv.bn.bias.fill_(0.7)  # eval BN: running mean 0, var 1 -> pre-gate 0.7 everywhere
    attention = cbam_spatial_attention(student, structured_images())
    expected = 1 / (1 + math.exp(-0.7 / math.sqrt(1 + 1e-5)))
    np.testing.assert_allclose(attention, expected, atol=1e-6)
    with pytest.raises(ValueError, match="no CBAM spatial gate"):
        cbam_spatial_attention(VGGUNet(base=4), structured_images())


# -------------------------------------------------------------------------------------- image helpers
def test_denormalize_inverts_the_evaluation_transform():
    image = render_fundus(2, size=64, seed=1).image
    tensor = evaluation_transform()(image=image)["image"]
    restored = denormalize_image(tensor)
    assert restored.dtype == np.uint8 and restored.shape == image.shape
    assert np.abs(restored.astype(int) - image.astype(int)).max() <= 1


def test_overlay_blends_the_jet_colours_onto_the_image():
    image = np.full((8, 8, 3), 100, np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:, 4:] = 1.0
    blended = overlay_heatmap(image, heatmap, alpha=0.5)
    assert blended.shape == (8, 8, 3) and blended.dtype == np.uint8
    # JET: 0 is dark blue, 1 dark red
    assert blended[0, 0, 2] > blended[0, 0, 0] and blended[0, 7, 0] > blended[0, 7, 2]
    with pytest.raises(ValueError, match="differs from the image"):
        overlay_heatmap(image, np.zeros((4, 4)))


# ----------------------------------------------------------------------------------------- calibration
HAND_PROBABILITIES = np.array([
    [0.75, 0.15, 0.10],  # confidence 0.75, correct (label 0) -> bin 7
    [0.72, 0.18, 0.10],  # confidence 0.72, wrong (label 1)   -> bin 7
    [0.25, 0.35, 0.40],  # confidence 0.40, correct (label 2) -> bin 4
    [0.05, 0.95, 0.00],  # confidence 0.95, correct (label 1) -> bin 9
])
HAND_LABELS = np.array([0, 1, 2, 1])


def test_ece_and_bins_of_hand_made_probabilities():
    # bin 7: |0.5 - 0.735| * 2/4 = 0.1175; bin 4: |1 - 0.4| * 1/4 = 0.15; bin 9: |1 - 0.95| * 1/4 = 0.0125
    # torchmetrics computes in float32
    assert expected_calibration_error(HAND_PROBABILITIES, HAND_LABELS) == pytest.approx(0.28, abs=1e-6)
    bins = reliability_bins(HAND_PROBABILITIES, HAND_LABELS)
    assert bins.count.tolist() == [0, 0, 0, 0, 1, 0, 0, 2, 0, 1]
    assert bins.accuracy[7] == pytest.approx(0.5) and bins.confidence[7] == pytest.approx(0.735)
    assert bins.accuracy[4] == 1.0 and bins.confidence[4] == pytest.approx(0.40)
    assert bins.weighted_gap == pytest.approx(0.28)
    # five bins: 0.75, 0.72 -> [0.6, 0.8); 0.40 -> [0.4, 0.6); 0.95 -> [0.8, 1.0]
    assert reliability_bins(HAND_PROBABILITIES, HAND_LABELS, n_bins=5).count.tolist() == [0, 0, 1, 2, 1]


def test_reliability_bins_reproduce_torchmetrics_ece():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.full(5, 0.6), size=300)
    labels = rng.integers(0, 5, size=300)
    for n_bins in (5, 10, 15):
        bins = reliability_bins(probabilities, labels, n_bins)
        assert bins.count.sum() == 300
        assert bins.weighted_gap == pytest.approx(expected_calibration_error(probabilities, labels, n_bins), abs=1e-6)


def test_a_certain_prediction_lands_in_the_last_bin_and_bad_input_is_refused():
    bins = reliability_bins(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), n_bins=4)
    assert bins.count.tolist() == [0, 0, 0, 2] and bins.accuracy[3] == 0.5
    with pytest.raises(ValueError, match="softmax outputs, not logits"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels must lie in"):
        reliability_bins(HAND_PROBABILITIES, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(HAND_PROBABILITIES, HAND_LABELS, n_bins=0)


# --------------------------------------------------------------------------------------------- figures
def png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = cv2.imread(str(path))
    assert image is not None and image.std() > 5  # not a blank canvas
    return image.shape


def test_pr_curves_and_reliability_diagram_are_pngs(tmp_path: Path):
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 4] * 10)  # grade 3 absent: listed, no curve, no warning turned error
    probabilities = rng.dirichlet(np.ones(5), size=40)
    probabilities[np.arange(40), labels] += 1.0
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    pr = plot_precision_recall_curves(probabilities, labels, tmp_path / "plots" / "pr_curves.png")
    reliability = plot_reliability_diagram(probabilities, labels, tmp_path / "reliability.png")
    assert pr == tmp_path / "plots" / "pr_curves.png" and png_shape(pr)[0] > 300
    assert png_shape(reliability)[0] > 300


def small_imager() -> tuple[PersistenceImager, list[np.ndarray]]:
    """An imager fitted on images of one dark spot (0.2 or 0.5 on white) and of both spots."""
    config = TopologyConfig(resolution=16, min_persistence=0.02, image_resolution=12)

    def spots(*values: float) -> np.ndarray:
        image = np.full((64, 64, 3), 255, np.uint8)
        for index, value in enumerate(values):
            image[8 + 32 * index:24 + 32 * index, 20:40] = round(value * 255)
        return image

    images = [spots(0.2), spots(0.5), spots(0.2, 0.5)]
    imager = PersistenceImager(config).fit([image_diagrams(image, config) for image in images])
    return imager, images


def test_persistence_view_lays_persistence_up_and_birth_across():
    imager, images = small_imager()
    view = persistence_view(images[0], imager)
    assert [image.shape for image in view.images] == [(12, 12), (12, 12)]
    np.testing.assert_allclose(np.concatenate([i.ravel() for i in view.images]),
                               imager.transform([image_diagrams(images[0], imager.config)])[0])
    # one dark spot: a single H0 class, born at 0.2, persisting 0.8 up to the white background
    assert len(view.diagrams[0]) == 1 and view.diagrams[0][0] == pytest.approx([0.2, 1.0], abs=0.01)
    row, column = np.unravel_index(np.argmax(view.images[0]), view.images[0].shape)
    birth_min, birth_max, persistence_min, persistence_max = view.extents[0]
    birth = birth_min + column * (birth_max - birth_min) / 11
    persistence = persistence_min + row * (persistence_max - persistence_min) / 11
    assert birth == pytest.approx(0.2, abs=(birth_max - birth_min) / 11)
    assert persistence == pytest.approx(0.8, abs=(persistence_max - persistence_min) / 11)


def test_grading_explanation_figure_grows_with_its_panels(tmp_path: Path):
    imager, _ = small_imager()
    image = render_fundus(3, size=64, seed=2).image
    heatmap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    teacher = plot_grading_explanation(image, heatmap, tmp_path / "teacher.png", "teacher")
    student = plot_grading_explanation(image, heatmap, tmp_path / "student.png", "student", attention=heatmap,
                                       persistence=persistence_view(image, imager))
    teacher_shape, student_shape = png_shape(teacher), png_shape(student)
    assert student_shape[0] > 1.5 * teacher_shape[0] and student_shape[1] > 1.3 * teacher_shape[1]


# ---------------------------------------------------------------------------------------- segmentation
def disc_masks() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((32, 32), np.uint8)
    true[10:20, 10:20] = 1
    pred = np.zeros((32, 32), np.uint8)
    pred[12:22, 12:22] = 1  # overlaps the disc
    pred[2:5, 26:30] = 1  # far away: a false detection
    pred[9, 20] = 1  # touches the disc's corner (10, 19) diagonally: not false (8-connectivity)
    return true, pred


def test_false_detections_are_the_blobs_the_metrics_count():
    true, pred = disc_masks()
    false = false_detection_mask(true, pred)
    assert false[2:5, 26:30].all() and false.sum() == 12
    rng = np.random.default_rng(3)
    for _ in range(20):
        true = np.zeros((24, 24), bool)
        true[8:16, 8:16] = True
        pred = rng.random((24, 24)) > 0.85
        _, counted = component_counts(pred, true)
        labels_count, labels = cv2.connectedComponents(false_detection_mask(true, pred).astype(np.uint8),
                                                       connectivity=8)
        assert labels_count - 1 == counted


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.array(rgb, np.uint8), axis=2)


def test_overlay_draws_true_and_predicted_contours_and_marks_false_detections(tmp_path: Path):
    true, pred = disc_masks()
    image = np.full((32, 32, 3), 90, np.uint8)
    overlay = draw_segmentation_overlay(image, true, pred)
    scale = 8  # 32 px drawn at 256
    assert overlay.shape == (256, 256, 3)
    green = colour_pixels(overlay, TRUE_CONTOUR_RGB)
    azure = colour_pixels(overlay, PREDICTED_CONTOUR_RGB)
    assert green[10 * scale:11 * scale, 14 * scale].any() and not green[60:70, 60:70].any()
    assert azure[21 * scale:22 * scale + 2, 16 * scale].any()
    # the false blob is tinted towards red (0.4 * grey 90 + 0.6 * FALSE_DETECTION_RGB); the disc and the blob
    # touching its corner keep their grey inside their contours
    expected_tint = (0.4 * 90 + 0.6 * np.array(FALSE_DETECTION_RGB)).astype(np.uint8)
    np.testing.assert_array_equal(overlay[3 * scale + 3, 28 * scale], expected_tint)
    np.testing.assert_array_equal(overlay[15 * scale, 15 * scale], [90, 90, 90])
    np.testing.assert_array_equal(overlay[9 * scale + 4, 20 * scale + 4], [90, 90, 90])
    path = plot_segmentation_overlay(image, true, pred, tmp_path / "overlay.png", dice=0.64, title="worst 1")
    assert png_shape(path)[0] > 300
    with pytest.raises(ValueError, match="same size"):
        draw_segmentation_overlay(image[:16], true, pred)
