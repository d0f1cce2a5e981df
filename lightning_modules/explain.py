"""What the models look at, and how far their confidence can be trusted: pure functions, no Lightning.

* GradCAM heat maps (the ``grad-cam`` package) of any of the project's networks, and the DR student's CBAM
  spatial attention map;
* top-label calibration: reliability bins and the expected calibration error (torchmetrics);
* figures (matplotlib, Agg backend), each written to a PNG whose path is returned: per-class
  precision-recall curves, the reliability diagram, a GradCAM panel per graded image (with the student's
  attention map and the image's persistence diagram and persistence image), and optic-disc overlays.

The callbacks ``ClassificationDiagnostics``, ``GradingExplanations`` and ``SegmentationOverlays`` are thin
layers over these; ``experiments/predict.py`` uses the GradCAM functions on a clinic's images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.metrics import average_precision_score, precision_recall_curve
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_calibration_error

from datamodules.dr import IMAGENET_MEAN, IMAGENET_STD
from datamodules.topology import HOMOLOGY_DIMENSIONS, PersistenceImager, image_diagrams
from lightning_modules.nets.student import TopoFusionNet
from lightning_modules.nets.vgg_unet import VGGUNet

#: RGB colours of the segmentation overlays
TRUE_CONTOUR_RGB = (0, 255, 0)
PREDICTED_CONTOUR_RGB = (0, 170, 255)
FALSE_DETECTION_RGB = (255, 0, 0)
#: overlays are drawn on at least this many pixels per side, so one-pixel contours do not hide a 64 px image
OVERLAY_MIN_SIDE = 256


# --------------------------------------------------------------------------------------------- GradCAM
class _ImageOnly(nn.Module):
    """One-tensor view of a network for pytorch_grad_cam, which feeds the model a single input tensor.

    The other inputs (the student's topological features) are held fixed. A segmentation output (B, 1, H, W)
    becomes one score per image, the sum of the logits over the pixels predicted as disc (probability above
    ``threshold``, i.e. logit above log(t / (1 - t))), as grad-cam's ``SemanticSegmentationTarget`` does, so
    GradCAM explains "why is this the disc"; an image with no predicted disc pixel uses the sum of all its logits
    instead (what pushes the map towards a disc at all).
    """

    def __init__(self, net: nn.Module, extra_inputs: Sequence[Tensor], threshold: float = 0.5):
        super().__init__()
        self.net = net
        self.extra_inputs = list(extra_inputs)
        self.logit_threshold = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)

    def forward(self, image: Tensor) -> Tensor:
        output = self.net(image, *self.extra_inputs)
        if output.ndim == 4:
            logits = output.flatten(1)
            predicted = logits > self.logit_threshold
            disc_score = (logits * predicted).sum(dim=1, keepdim=True)
            return torch.where(predicted.any(dim=1, keepdim=True), disc_score, logits.sum(dim=1, keepdim=True))
        return output


def grad_cam_target_layer(net: nn.Module) -> nn.Module:
    """The layer GradCAM explains: the last feature map before pooling.

    TopoFusionNet -> its ``cbam`` (the attention-refined map its head pools); VGGUNet -> its last encoder
    block (the bottleneck); a timm classifier -> ``bn2`` (conv head + BN + activation) or ``conv_head``,
    else ``stages[-1]``, else the last module of its ``feature_info``.
    """
    if isinstance(net, TopoFusionNet):
        return net.cbam
    if isinstance(net, VGGUNet):
        return net.encoder[-1]
    for name in ("bn2", "conv_head"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    stages = getattr(net, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) > 0:
        return stages[-1]
    feature_info = getattr(net, "feature_info", None)
    if feature_info:
        # timm lists its feature maps as dicts (a FeatureInfo object once features_only is set)
        last = feature_info[-1] if isinstance(feature_info, list) else None
        if isinstance(last, dict) and last.get("module"):
            return net.get_submodule(last["module"])
    raise ValueError(
        f"grad_cam_target_layer: no known feature layer in a {type(net).__name__} (looked for TopoFusionNet.cbam, "
        "VGGUNet.encoder, timm's bn2 / conv_head / stages / feature_info); pass the layer to grad_cam_heatmaps"
    )


def grad_cam_heatmaps(net: nn.Module, inputs: tuple[Tensor, ...], target_layer: nn.Module,
                      target_classes: Sequence[int] | None = None, threshold: float = 0.5) -> np.ndarray:
    """GradCAM maps (B, H, W) float32 in [0, 1] at the spatial size of ``inputs[0]`` (each map scaled to its max).

    ``inputs`` are the network's inputs, ``(image,)`` or ``(image, topo)``; ``target_classes`` one class per
    image, None for the predicted class (ignored for a segmentation network, see ``_ImageOnly``).
    ``threshold``: for a segmentation network (mask logits), the disc probability above which a pixel counts as
    predicted disc (the stage's / bundle's threshold); a classifier ignores it. The network
    is run in eval mode and gets back its train/eval mode and ``requires_grad`` flags; its parameters receive
    no gradients (the input carries them instead, so a frozen network can be explained too). Works inside
    ``torch.inference_mode`` (a Lightning test hook) by leaving it for the computation.
    """
    if not inputs or inputs[0].ndim != 4:
        shape = tuple(inputs[0].shape) if inputs else None
        raise ValueError(f"grad_cam_heatmaps: inputs[0] must be an image batch (B, C, H, W), got shape {shape}")
    batch = inputs[0].shape[0]
    if target_classes is not None and len(target_classes) != batch:
        raise ValueError(f"grad_cam_heatmaps: {len(target_classes)} target classes for {batch} images; "
                         "give one per image, or None for the predicted class")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"grad_cam_heatmaps: threshold={threshold} is a disc probability in (0, 1), e.g. the "
                         "stage's threshold (0.5 by default)")
    was_training = net.training
    requires_grad = [parameter.requires_grad for parameter in net.parameters()]
    device = next(net.parameters()).device
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # clone(): tensors made under inference mode (a test batch) cannot take part in autograd
            image, *extra = (tensor.detach().to(device).clone() for tensor in inputs)
            image.requires_grad_(True)
            net.requires_grad_(False)
            cam = GradCAM(model=_ImageOnly(net, extra, threshold), target_layers=[target_layer])
            try:
                targets = None if target_classes is None else [ClassifierOutputTarget(int(c)) for c in target_classes]
                heatmaps = cam(input_tensor=image, targets=targets)
            finally:
                # not `with GradCAM(...)`: its __exit__ prints and swallows IndexErrors
                cam.activations_and_grads.release()
    finally:
        for parameter, flag in zip(net.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        net.train(was_training)
    return np.clip(np.asarray(heatmaps, dtype=np.float32), 0.0, 1.0)


def cbam_spatial_attention(net: TopoFusionNet, image: Tensor) -> np.ndarray:
    """The CBAM spatial gate's sigmoid map (B, H, W) in [0, 1], bilinearly upsampled to ``image``'s size.

    Captured with a forward hook on ``net.cbam.spatial.gate`` while the backbone and CBAM run in eval mode;
    the values are the gate's own (not rescaled), so maps of different images compare.
    """
    gate = getattr(getattr(getattr(net, "cbam", None), "spatial", None), "gate", None)
    if gate is None or not hasattr(net, "attended_features"):
        raise ValueError(f"cbam_spatial_attention: a {type(net).__name__} has no CBAM spatial gate "
                         "(expected a TopoFusionNet with net.cbam.spatial.gate)")
    if image.ndim != 4:
        raise ValueError(f"cbam_spatial_attention: image must be (B, C, H, W), got shape {tuple(image.shape)}")
    captured: list[Tensor] = []
    handle = gate.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net.attended_features(image.to(next(net.parameters()).device))
    finally:
        handle.remove()
        net.train(was_training)
    attention = F.interpolate(captured[-1].float(), size=tuple(image.shape[-2:]), mode="bilinear",
                              align_corners=False)
    return attention[:, 0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


def denormalize_image(tensor: Tensor) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) tensor -> uint8 (H, W, 3) RGB."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"denormalize_image expects one (3, H, W) image, got shape {tuple(tensor.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    rgb = tensor.detach().float().cpu() * std + mean
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay_heatmap(image_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W, 3) RGB: the JET-coloured ``heatmap`` ([0, 1], (H, W)) blended over the uint8 RGB image."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"overlay_heatmap: image must be uint8 (H, W, 3) RGB, got {image_rgb.dtype} {image_rgb.shape}")
    if heatmap.shape != image_rgb.shape[:2]:
        raise ValueError(f"overlay_heatmap: heatmap shape {heatmap.shape} differs from the image's "
                         f"{image_rgb.shape[:2]}; resize one of them first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_heatmap: alpha={alpha} must lie in [0, 1]")
    return show_cam_on_image(image_rgb.astype(np.float32) / 255.0, np.clip(heatmap, 0, 1).astype(np.float32),
                             use_rgb=True, image_weight=1.0 - alpha)


# ----------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label calibration per confidence bin ``[edges[i], edges[i+1])`` (the last bin includes 1.0).

    ``confidence`` and ``accuracy`` are the bin's mean top-label probability and accuracy (0 for an empty bin),
    ``count`` its number of predictions.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def weighted_gap(self) -> float:
        """Sum over bins of |accuracy - confidence| weighted by the bin's share of predictions: the ECE."""
        total = self.count.sum()
        return float(np.sum(np.abs(self.accuracy - self.confidence) * self.count) / total) if total else 0.0


def _checked_predictions(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],) or probabilities.shape[0] == 0:
        raise ValueError(f"probabilities must be (N, K) and labels (N,) with N > 0, got {probabilities.shape} "
                         f"and {labels.shape}")
    if probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must lie in [0, 1] (softmax outputs, not logits)")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(f"labels must lie in [0, {probabilities.shape[1] - 1}], got [{labels.min()}, {labels.max()}]")
    return probabilities, labels.astype(np.int64)


def _bin_edges(n_bins: int) -> np.ndarray:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    # torch's linspace, not numpy's: the two differ in the last bit of some edges (0.3, 0.7), and a
    # confidence on an edge must fall in the same bin as in torchmetrics.
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).numpy()


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> ReliabilityBins:
    """Top-label reliability bins of (N, K) probabilities against (N,) labels, ``n_bins`` equal-width bins.

    Hand-written because torchmetrics keeps its bins private; they follow its binning (``edges[i] <= c <
    edges[i+1]``), except that a confidence of exactly 1.0 goes to the last bin, where torchmetrics 1.9 gives it
    an extra bin of its own: the two ECEs then differ slightly (only when some confidence is exactly 1).
    """
    probabilities, labels = _checked_predictions(probabilities, labels)
    edges = _bin_edges(n_bins)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    safe = np.maximum(count, 1)
    return ReliabilityBins(
        edges=edges,
        confidence=np.bincount(index, weights=confidence, minlength=n_bins) / safe,
        accuracy=np.bincount(index, weights=correct, minlength=n_bins) / safe,
        count=count,
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE (L1, ``n_bins`` equal-width bins): torchmetrics' ``MulticlassCalibrationError(norm="l1")``."""
    probabilities, labels = _checked_predictions(probabilities, labels)
    _bin_edges(n_bins)
    return float(multiclass_calibration_error(torch.from_numpy(probabilities), torch.from_numpy(labels),
                                              num_classes=probabilities.shape[1], n_bins=n_bins, norm="l1"))


# ------------------------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class PersistenceView:
    """What the student's topological branch sees of one image, per homology dimension (H0, H1).

    ``diagrams``: (n, 2) (birth, death) points; ``images``: the fitted persistence images (resolution x
    resolution, scaled as the network's input), row = persistence (increasing), column = birth (increasing),
    gudhi's layout; ``extents``: (birth_min, birth_max, persistence_min, persistence_max) of each image.
    """

    diagrams: list[np.ndarray]
    images: list[np.ndarray]
    extents: list[tuple[float, float, float, float]]


def persistence_view(image_rgb: np.ndarray, imager: PersistenceImager) -> PersistenceView:
    """Diagrams and persistence images of a preprocessed RGB fundus image, as the fitted ``imager`` makes them."""
    if not imager.fitted:
        raise ValueError("persistence_view needs a fitted PersistenceImager (the datamodule's, fitted on train)")
    diagrams = image_diagrams(image_rgb, imager.config)
    vector = imager.transform([diagrams])[0]
    side = imager.config.image_resolution
    images = [vector[i * side * side:(i + 1) * side * side].reshape(side, side)
              for i in range(len(HOMOLOGY_DIMENSIONS))]
    extents = [tuple(float(v) for v in image.im_range_fixed_) for image in imager.images]
    return PersistenceView(diagrams=[np.asarray(d) for d in diagrams], images=images, extents=extents)


# -------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _class_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"grade {k}" for k in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} class names for {count} classes")
    return list(names)


def plot_precision_recall_curves(probabilities: np.ndarray, labels: np.ndarray, path: str | Path,
                                 class_names: Sequence[str] | None = None,
                                 title: str = "Test precision-recall per grade") -> Path:
    """One-vs-rest precision-recall curve of every class, its average precision and count in the legend."""
    probabilities, labels = _checked_predictions(probabilities, labels)
    names = _class_names(class_names, probabilities.shape[1])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for k, name in enumerate(names):
        positives = labels == k
        if not positives.any():
            ax.plot([], [], label=f"{name}: absent from the test split")
            continue
        precision, recall, _ = precision_recall_curve(positives, probabilities[:, k])
        ap = average_precision_score(positives, probabilities[:, k])
        ax.step(recall, precision, where="post", label=f"{name} (AP {ap:.2f}, n={int(positives.sum())})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.05), title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, path: str | Path, n_bins: int = 10,
                             title: str = "Test reliability") -> Path:
    """Accuracy per confidence bin (bars) against the diagonal, mean confidence per bin, counts underneath;
    the ECE in the title."""
    bins = reliability_bins(probabilities, labels, n_bins)
    ece = expected_calibration_error(probabilities, labels, n_bins)
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    left, width = bins.edges[:-1], np.diff(bins.edges)
    filled = bins.count > 0
    top.bar(left[filled], bins.accuracy[filled], width=width[filled], align="edge", color="tab:blue",
            edgecolor="black", alpha=0.8, label="accuracy")
    top.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="tab:red", label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}: ECE {ece:.3f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(left, bins.count, width=width, align="edge", color="tab:grey", edgecolor="black")
    for x, w, count in zip(left, width, bins.count):
        if count:
            bottom.text(x + w / 2, count, str(int(count)), ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="top-label confidence", ylabel="predictions")
    return _save(fig, path)


def _plot_diagram(ax, diagrams: list[np.ndarray]) -> None:
    points = [d for d in diagrams if len(d)]
    high = max([float(d.max()) for d in points] + [1e-3])
    low = min([float(d.min()) for d in points] + [0.0])
    ax.plot([low, high], [low, high], "--", color="grey", linewidth=0.8)
    for dim, diagram, marker in zip(HOMOLOGY_DIMENSIONS, diagrams, ("o", "^")):
        ax.scatter(diagram[:, 0], diagram[:, 1], s=12, marker=marker, alpha=0.7, label=f"H{dim} ({len(diagram)})")
    ax.set(xlabel="birth", ylabel="death", title="persistence diagram")
    ax.legend(fontsize=8, loc="lower right")


def plot_grading_explanation(image_rgb: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str,
                             attention: np.ndarray | None = None,
                             persistence: PersistenceView | None = None) -> Path:
    """The preprocessed fundus and its GradCAM overlay; the CBAM spatial attention map beside them when given;
    a second row with the persistence diagram and the H0 / H1 persistence images when ``persistence`` is given."""
    plt = _pyplot()
    columns = 3 if attention is not None or persistence is not None else 2
    rows = 2 if persistence is not None else 1
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image_rgb)
    axes[0, 0].set_title("preprocessed fundus")
    axes[0, 1].imshow(overlay_heatmap(image_rgb, heatmap))
    axes[0, 1].set_title("GradCAM")
    if attention is not None:
        shown = axes[0, 2].imshow(attention, cmap="inferno")
        axes[0, 2].set_title("CBAM spatial attention")
        fig.colorbar(shown, ax=axes[0, 2], fraction=0.046, pad=0.04)
    if persistence is not None:
        axes[1, 0].axis("on")
        _plot_diagram(axes[1, 0], persistence.diagrams)
        for column, (dim, image, extent) in enumerate(
                zip(HOMOLOGY_DIMENSIONS, persistence.images, persistence.extents), start=1):
            ax = axes[1, column]
            ax.axis("on")
            shown = ax.imshow(image, origin="lower", extent=extent, aspect="auto", cmap="viridis")
            ax.set(xlabel="birth", ylabel="persistence", title=f"persistence image H{dim}")
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    # fixed margins: tight_layout doubled the time of this figure, drawn for every explained image
    fig.subplots_adjust(left=0.07, right=0.95, bottom=0.1 if rows == 2 else 0.02, top=0.86 if rows == 1 else 0.9,
                        wspace=0.45, hspace=0.35)
    return _save(fig, path, tight=False)


# ------------------------------------------------------------------------------------- segmentation
def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be one (H, W) mask, got shape {mask.shape}")
    return (mask > 0).astype(np.uint8)


def false_detection_mask(true_mask: np.ndarray, pred_mask: np.ndarray) -> np.ndarray:
    """Bool (H, W): the predicted 8-connected blobs that neither overlap nor touch the true disc.

    The rule of ``seg_metrics.component_counts`` (the disc dilated by one pixel, 3x3), so the blobs marked
    in an overlay are the image's counted ``false_detections``.
    """
    true, pred = _binary(true_mask, "true_mask"), _binary(pred_mask, "pred_mask")
    if true.shape != pred.shape:
        raise ValueError(f"true_mask {true.shape} and pred_mask {pred.shape} differ in shape")
    count, labels = cv2.connectedComponents(pred, connectivity=8)
    near_disc = cv2.dilate(true, np.ones((3, 3), np.uint8)) > 0
    touching = np.unique(labels[near_disc & (pred > 0)])
    false = np.setdiff1d(np.arange(1, count), touching)
    return np.isin(labels, false)


def draw_segmentation_overlay(image_rgb: np.ndarray, true_mask: np.ndarray, pred_mask: np.ndarray) -> np.ndarray:
    """uint8 RGB: the image (upscaled to at least ``OVERLAY_MIN_SIDE`` px) with the true disc contour in green,
    the predicted contour in azure and false detections (see :func:`false_detection_mask`) filled in red."""
    true, pred = _binary(true_mask, "true_mask"), _binary(pred_mask, "pred_mask")
    if image_rgb.shape[:2] != true.shape or true.shape != pred.shape:
        raise ValueError(f"image {image_rgb.shape[:2]}, true mask {true.shape} and predicted mask {pred.shape} "
                         "must have the same size")
    scale = max(1, math.ceil(OVERLAY_MIN_SIDE / max(true.shape)))
    size = (true.shape[1] * scale, true.shape[0] * scale)
    canvas = cv2.resize(np.ascontiguousarray(image_rgb, dtype=np.uint8), size, interpolation=cv2.INTER_CUBIC)
    false = cv2.resize(false_detection_mask(true, pred).astype(np.uint8), size,
                       interpolation=cv2.INTER_NEAREST) > 0
    canvas[false] = (0.4 * canvas[false] + 0.6 * np.array(FALSE_DETECTION_RGB)).astype(np.uint8)
    for mask, colour in ((true, TRUE_CONTOUR_RGB), (pred, PREDICTED_CONTOUR_RGB)):
        large = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(large, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, thickness=2)
    return canvas


def plot_segmentation_overlay(image_rgb: np.ndarray, true_mask: np.ndarray, pred_mask: np.ndarray,
                              path: str | Path, dice: float, title: str = "") -> Path:
    """:func:`draw_segmentation_overlay` with a legend and the image's Dice in the title."""
    from matplotlib.patches import Patch

    overlay = draw_segmentation_overlay(image_rgb, true_mask, pred_mask)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5.3))
    ax.imshow(overlay)
    ax.axis("off")
    ax.set_title(f"{title}  Dice {dice:.3f}".strip())
    handles = [Patch(color=np.array(rgb) / 255, label=label) for rgb, label in (
        (TRUE_CONTOUR_RGB, "true disc"), (PREDICTED_CONTOUR_RGB, "predicted"),
        (FALSE_DETECTION_RGB, "false detection"))]
    ax.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    return _save(fig, path)
