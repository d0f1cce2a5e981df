"""Tiny networks and deployment bundles shared by the bundle and predict tests: the DR student (CBAM +
topological branch) and the disc U-Net in miniature, on synthetic photographs.

The grading bundle's student is built by ``build_student_net`` on timm's tiny ``test_efficientnet``, from
arguments a StudentDistiller's hparams would hold, so that the bundle's network file can describe it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from compression.deploy import Bundle, write_bundle
from compression.packed_format import describe_network
from datamodules.disc_crops import CoarseToFine
from datamodules.dr import grading_network_inputs, grading_spec
from datamodules.fundus import FundusPreprocessing
from datamodules.optic_disc import DiscPreprocessing, disc_network_input, disc_spec
from datamodules.synthetic import render_fundus
from datamodules.topology import PersistenceImager, TopologyConfig, image_diagrams
from lightning_modules.nets.student import TopoFusionNet, build_student_net
from tests.compression.helpers import tiny_unet

GRADING_PREPROCESSING = FundusPreprocessing(image_size=64)
DISC_PREPROCESSING = DiscPreprocessing(image_size=32)
#: 2 homology dimensions x 4 x 4 persistence-image pixels = 32 features
TOPOLOGY = TopologyConfig(resolution=16, image_resolution=4)
PHOTO_SIZE = 96


class TinyBackbone(nn.Module):
    """The timm feature-extractor interface (``num_features``, ``forward_features``) with one strided conv."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.features(image)


def tiny_student() -> TopoFusionNet:
    """A student on a hand-made backbone: no architecture entry describes it, so a bundle gets no network file."""
    torch.manual_seed(0)
    return TopoFusionNet(TinyBackbone(), num_classes=5, topo_features=TOPOLOGY.feature_dim, topo_hidden=16,
                         topo_embedding=4).eval()


#: the grading bundle's student, as the hyperparameters of its StudentDistiller would name it
STUDENT_HPARAMS = {"backbone": "test_efficientnet", "num_classes": 5, "topo_features": TOPOLOGY.feature_dim,
                   "topo_hidden": 16, "topo_embedding": 4}


def built_student() -> TopoFusionNet:
    """The DR student (timm backbone, CBAM, topology MLP) in miniature, built as a StudentDistiller builds it."""
    torch.manual_seed(0)
    return build_student_net(**STUDENT_HPARAMS).eval()


def fundus_photo(seed: int, size: int = PHOTO_SIZE) -> np.ndarray:
    """A synthetic colour fundus photograph (RGB uint8)."""
    return render_fundus(seed % 5, size=size, seed=seed).image


def write_photo(path: Path, image_rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    return path


def write_stored(path: Path, image: np.ndarray) -> Path:
    """Write an array as OpenCV stores it (greyscale, BGR, BGRA, 16-bit): files of the kinds training never
    saw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def twelve_bit(image_rgb: np.ndarray) -> np.ndarray:
    """The photograph as a 12-bit camera stores it in a 16-bit file (BGR, 0-4095): 255 becomes 4095."""
    return np.round(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR) * (4095 / 255)).astype(np.uint16)


def fitted_imager() -> PersistenceImager:
    """A persistence imager fitted on three preprocessed photographs, as DRDataModule fits it on train."""
    diagrams = [image_diagrams(GRADING_PREPROCESSING(fundus_photo(seed)), TOPOLOGY) for seed in range(3)]
    return PersistenceImager(TOPOLOGY).fit(diagrams)


def grading_batches(imager: PersistenceImager, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [grading_network_inputs(fundus_photo(seed), GRADING_PREPROCESSING, imager)[:2]
            for seed in range(count)]


def write_grading_bundle(folder: Path,
                         calibrate: bool = True) -> tuple[Bundle, TopoFusionNet, PersistenceImager]:
    """A grading bundle of :func:`built_student` (int8 calibrated on 4 photographs when ``calibrate``)."""
    net, imager = built_student(), fitted_imager()
    batches = grading_batches(imager, 6)
    bundle = write_bundle(folder, net, batches[0], ["image", "topo"], "grading",
                          grading_spec(GRADING_PREPROCESSING, imager), {"stage": "student"},
                          calibration_batches=batches if calibrate else None, calibration_images=4,
                          exporter="torchscript", architecture=describe_network(net, STUDENT_HPARAMS))
    return bundle, net, imager


def write_disc_bundle(folder: Path, net: nn.Module | None = None,
                      coarse_to_fine: CoarseToFine | None = None) -> tuple[Bundle, nn.Module]:
    """A disc bundle of ``net`` (default a base-4 U-Net) at 32 px, int8 calibrated on 4 photographs."""
    net = net if net is not None else tiny_unet(base=4)
    batches = [(disc_network_input(fundus_photo(seed), DISC_PREPROCESSING)[0],) for seed in range(4)]
    bundle = write_bundle(folder, net, batches[0], ["image"], "disc",
                          disc_spec(DISC_PREPROCESSING, coarse_to_fine=coarse_to_fine),
                          {"stage": "prune-16", "threshold": 0.5}, calibration_batches=batches,
                          exporter="torchscript")
    return bundle, net


class BrightnessSegmenter(nn.Module):
    """A "network" whose disc is wherever the photograph is brighter than ``level`` (in normalised units, summed
    over channels): a predictable stand-in for a trained segmenter, so a test knows what each pass finds."""

    def __init__(self, level: float = 5.0, gain: float = 4.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(gain)
            self.conv.bias.fill_(-gain * level)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)
