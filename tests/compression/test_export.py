"""ONNX export round trip and the parity check, on tiny generated networks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compression.export import (
    ExportParityError,
    OnnxModelError,
    export_onnx,
    onnx_parity,
    ort_session,
    run_session,
)
from lightning_modules.nets.vgg_unet import VGGUNet
from tests.compression.helpers import tiny_unet

SIZE = 32






class TwoInputNet(nn.Module):
    """The DR student's interface in miniature: an image branch and a vector branch fused by a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.vector = nn.Linear(10, 4)
        self.head = nn.Linear(10, 5)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image), self.vector(vector)], dim=1))


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory) -> tuple[VGGUNet, Path]:
    net = tiny_unet()
    path = export_onnx(net, (torch.rand(1, 3, SIZE, SIZE),), tmp_path_factory.mktemp("onnx") / "unet.onnx",
                       input_names=["image"], exporter="torchscript")
    return net, path


def test_round_trip_matches_pytorch_at_another_batch_size(unet_file):
    net, path = unet_file
    images = torch.rand(3, 3, SIZE, SIZE)  # exported with batch 1: the batch axis is dynamic
    largest = onnx_parity(net, path, (images,), atol=1e-4, rtol=1e-3)
    assert 0.0 <= largest < 1e-4
    (logits,) = run_session(ort_session(path), [images])
    assert logits.shape == (3, 1, SIZE, SIZE)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(images).numpy(), atol=1e-4, rtol=1e-3)


def test_two_input_network_exports_with_its_input_names(tmp_path: Path):
    torch.manual_seed(0)
    net = TwoInputNet().train()
    inputs = (torch.rand(1, 3, 8, 8), torch.rand(1, 10))
    path = export_onnx(net, inputs, tmp_path / "two.onnx", input_names=["image", "topo"], exporter="torchscript")
    assert net.training  # exported from a copy: the caller's model keeps its mode
    assert [node.name for node in ort_session(path).get_inputs()] == ["image", "topo"]
    assert onnx_parity(net, path, (torch.rand(4, 3, 8, 8), torch.rand(4, 10))) < 1e-4
    with pytest.raises(ValueError, match="input_names"):
        export_onnx(net, inputs, tmp_path / "bad.onnx", input_names=["image"], exporter="torchscript")


def test_dynamic_spatial_export_runs_at_other_image_sizes(tmp_path: Path):
    net = tiny_unet()
    path = export_onnx(net, (torch.rand(1, 3, SIZE, SIZE),), tmp_path / "spatial.onnx", ["image"],
                       exporter="torchscript", dynamic_spatial=True)
    session = ort_session(path)
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert session.get_outputs()[0].shape == ["batch", 1, "height", "width"]
    for height, width in [(64, 64), (48, 80)]:  # larger, and not square: each side has its own symbol
        images = torch.rand(2, 3, height, width)
        (logits,) = run_session(session, [images])
        assert logits.shape == (2, 1, height, width)
        assert onnx_parity(net, path, (images,)) < 1e-4


def test_without_dynamic_spatial_the_size_is_fixed(unet_file):
    _, path = unet_file  # exported at SIZE x SIZE with only the batch axis symbolic
    assert ort_session(path).get_inputs()[0].shape == ["batch", 3, SIZE, SIZE]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_session(ort_session(path), [torch.rand(1, 3, 2 * SIZE, 2 * SIZE)])


def test_dynamic_spatial_leaves_vector_inputs_static_and_needs_an_image(tmp_path: Path):
    torch.manual_seed(0)
    net = TwoInputNet().eval()
    path = export_onnx(net, (torch.rand(1, 3, 8, 8), torch.rand(1, 10)), tmp_path / "two.onnx", ["image", "topo"],
                       exporter="torchscript", dynamic_spatial=True)
    image, topo = ort_session(path).get_inputs()
    assert image.shape == ["batch", 3, "height", "width"] and topo.shape == ["batch", 10]
    assert onnx_parity(net, path, (torch.rand(3, 3, 16, 24), torch.rand(3, 10))) < 1e-4
    with pytest.raises(ValueError, match="dynamic_spatial=True needs a .B, C, H, W. image input"):
        export_onnx(nn.Linear(10, 2), (torch.rand(1, 10),), tmp_path / "vector.onnx", ["topo"],
                    exporter="torchscript", dynamic_spatial=True)


def test_parity_raises_when_the_onnx_weights_differ(tmp_path: Path, unet_file):
    net, path = unet_file
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ExportParityError, match="broken.onnx"):
        onnx_parity(net, broken, (torch.rand(2, 3, SIZE, SIZE),))


def test_parity_with_zero_tolerance_raises_on_float_rounding(unet_file):
    net, path = unet_file
    # the exported convs carry the folded BatchNorm, so fp32 rounding differs from PyTorch's conv -> BN
    with pytest.raises(ExportParityError, match="atol=0"):
        onnx_parity(net, path, (torch.rand(2, 3, SIZE, SIZE),), atol=0.0, rtol=0.0)


def test_unreadable_or_missing_files_are_named(tmp_path: Path, unet_file):
    net, path = unet_file
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OnnxModelError, match="truncated.onnx"):
        onnx_parity(net, truncated, (torch.rand(1, 3, SIZE, SIZE),))
    with pytest.raises(OnnxModelError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx")


@pytest.mark.slow  # the dynamo exporter takes 5-10 s even for a tiny network on this 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="dynamo exporter needs onnxscript")
def test_dynamo_exporter_round_trip(tmp_path: Path):
    net = tiny_unet()
    path = export_onnx(net, (torch.rand(1, 3, SIZE, SIZE),), tmp_path / "dynamo.onnx", ["image"], exporter="dynamo")
    assert onnx_parity(net, path, (torch.rand(2, 3, SIZE, SIZE),)) < 1e-4
    assert {node.op_type for node in onnx.load(str(path)).graph.node} <= {
        "Conv", "ConvTranspose", "MaxPool", "Relu", "Concat"}


@pytest.mark.slow  # the dynamo exporter: see above
@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="dynamo exporter needs onnxscript")
def test_dynamo_exporter_dynamic_spatial(tmp_path: Path):
    net = tiny_unet()
    path = export_onnx(net, (torch.rand(1, 3, SIZE, SIZE),), tmp_path / "dynamo_spatial.onnx", ["image"],
                       exporter="dynamo", dynamic_spatial=True)
    assert onnx_parity(net, path, (torch.rand(2, 3, 64, 48),)) < 1e-4
