"""Bundles that cannot run code: the network file is safetensors + an architecture (never a pickle), every file
is checked against its SHA-256 in bundle.json, and format-1 bundles are refused with the command that rewrites
them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from callbacks.deployment_bundle import baked_qat_copy
from compression.deploy import (
    MANIFEST_FILE,
    NETWORK_FILE,
    BundleError,
    file_sha256,
    load_bundle,
    read_network_file,
    save_network_file,
    write_bundle,
)
from compression.packed_format import build_network, describe_network
from compression.quantization import prepare_qat
from datamodules.dr import grading_spec
from lightning_modules.explain import grad_cam_heatmaps, grad_cam_target_layer
from lightning_modules.nets.backbones import create_backbone
from lightning_modules.nets.transformer_seg import TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet, default_widths
from tests.compression.deploy_helpers import (
    GRADING_PREPROCESSING,
    fitted_imager,
    grading_batches,
    tiny_student,
    write_disc_bundle,
    write_grading_bundle,
)
from tests.compression.helpers import tiny_unet


@pytest.fixture(scope="module")
def grading(tmp_path_factory):
    return write_grading_bundle(tmp_path_factory.mktemp("grading") / "deploy", calibrate=False)


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    return write_disc_bundle(tmp_path_factory.mktemp("disc") / "deploy")


def _leave_marker(path: str) -> None:
    Path(path).write_text("unpickling ran code")


class PlantedPayload:
    """Unpickling it calls :func:`_leave_marker`: what a planted model file could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _leave_marker, (str(self.marker),)


def forge_manifest(folder: Path, **changes) -> None:
    """Rewrite bundle.json as someone who controls the whole folder would: ``changes`` applied, hashes matching
    the files now there (unless ``changes`` sets them)."""
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["sha256"] = {name: file_sha256(folder / name) for name in manifest["files"].values() if name}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest | changes))


def outputs(net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(*inputs)


# ------------------------------------------------------------------------------------------- planted pickles
def test_the_planted_payload_runs_code_when_unpickled(tmp_path: Path):
    # the threat the other tests guard against is real: torch.load(weights_only=False) runs the payload
    marker = tmp_path / "ran"
    torch.save(PlantedPayload(marker), tmp_path / "network.pt")
    torch.load(tmp_path / "network.pt", weights_only=False)
    assert marker.read_text() == "unpickling ran code"


def test_a_planted_network_file_is_refused_without_running_it(grading, tmp_path: Path):
    bundle, _, _ = grading
    folder, marker = tmp_path / "deploy", tmp_path / "ran"
    shutil.copytree(bundle.folder, folder)
    torch.save(PlantedPayload(marker), folder / NETWORK_FILE)
    # swapped alone, the file no longer matches bundle.json
    with pytest.raises(BundleError, match=rf"{NETWORK_FILE} does not match its SHA-256"):
        load_bundle(folder)
    # with bundle.json forged to match, the file is still never unpickled
    forge_manifest(folder)
    with pytest.raises(BundleError, match="not a safetensors network file.*retest=true"):
        load_bundle(folder).load_network()
    assert not marker.exists()


def test_a_format_1_bundle_with_a_pickled_network_pt_is_refused_with_the_rebundle_command(grading,
                                                                                         tmp_path: Path):
    bundle, _, _ = grading
    run, marker = tmp_path / "run", tmp_path / "ran"
    folder = run / "student" / "deploy"
    shutil.copytree(bundle.folder, folder)
    (run / "run_state.json").write_text("{}")
    (folder / NETWORK_FILE).unlink()
    torch.save(PlantedPayload(marker), folder / "network.pt")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["sha256"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest | {"format": 1, "files": manifest["files"] | {
        "network": "network.pt"}}))
    expected = f'make dr-distill ARGS="<the run\'s overrides> retest=true resume={run}"'
    with pytest.raises(BundleError, match="format 1") as refused:
        load_bundle(folder)
    assert expected in str(refused.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- hashes
def test_a_tampered_onnx_model_is_refused_by_its_hash(disc, tmp_path: Path):
    bundle, _ = disc
    folder = tmp_path / "deploy"
    shutil.copytree(bundle.folder, folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its SHA-256.*Copy the whole deploy/"):
        load_bundle(folder)


def test_a_manifest_without_hashes_or_with_a_path_outside_the_folder_is_refused(disc, tmp_path: Path):
    bundle, _ = disc
    folder = tmp_path / "deploy"
    shutil.copytree(bundle.folder, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["sha256"]) == {"model.onnx", "model_int8.onnx", NETWORK_FILE, "model.xml", "model.bin",
                                       "model_int8.xml", "model_int8.bin"}
    (folder / MANIFEST_FILE).write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    with pytest.raises(BundleError, match="cannot be verified.*make glaucoma-iterations.*retest=true"):
        load_bundle(folder)
    shutil.copy(folder / "model.onnx", tmp_path / "elsewhere.onnx")
    forge_manifest(folder, files=manifest["files"] | {"fp32": "../elsewhere.onnx"})
    with pytest.raises(BundleError, match="not a file name inside the bundle folder"):
        load_bundle(folder)


# ------------------------------------------------------------------------------------------ network files
@pytest.mark.parametrize("which", ["grading", "disc"])
def test_the_gradcam_network_round_trips_through_the_bundle(which, request):
    bundle, net = request.getfixturevalue(which)[:2]
    assert bundle.manifest["files"]["network"] == NETWORK_FILE
    if which == "grading":
        inputs = grading_batches(fitted_imager(), 1)[0]
    else:
        inputs = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    loaded = load_bundle(bundle.folder).load_network()
    assert type(loaded) is type(net) and not loaded.training
    torch.testing.assert_close(outputs(loaded, *inputs), outputs(net, *inputs), rtol=0, atol=0)
    # what predict gradcam=true does with it
    heatmap = grad_cam_heatmaps(loaded, inputs, grad_cam_target_layer(loaded))[0]
    assert heatmap.shape == tuple(inputs[0].shape[-2:])


def _pruned_unet() -> VGGUNet:
    torch.manual_seed(0)
    return VGGUNet.from_spec({"widths": [max(1, width - 1) for width in default_widths(4)]})


def _qat_finished_unet() -> nn.Module:
    return baked_qat_copy(prepare_qat(tiny_unet(base=4), [torch.rand(2, 3, 32, 32)]))


def _baseline() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("test_efficientnet", num_classes=3, drop_rate=0.1)


#: (network, the hyperparameters of the module that built it, an input): every kind a bundle may hold
NETWORKS = {
    "pruned vgg_unet": (_pruned_unet, {}, (1, 3, 32, 32)),
    "qat-finished vgg_unet": (_qat_finished_unet, {}, (1, 3, 32, 32)),
    "transformer": (lambda: TransformerSegNet(encoder="resnet10t", decoder_dim=8), {}, (1, 3, 64, 64)),
    "teacher / baseline": (_baseline, {"backbone": "test_efficientnet", "num_classes": 3, "drop_rate": 0.1,
                                       "backbone_kwargs": None, "lr": 1e-3, "pretrained": "lite"},
                           (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_kind_of_network_round_trips_through_a_network_file(name, tmp_path: Path):
    make, hparams, shape = NETWORKS[name]
    net = make().eval()
    architecture = describe_network(net, hparams)
    json.dumps(architecture)  # plain JSON
    path = save_network_file(net, architecture, tmp_path / NETWORK_FILE)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(outputs(read_network_file(path), image), outputs(net, image), rtol=0, atol=0)


def test_a_network_that_cannot_be_described_is_bundled_without_the_file(tmp_path: Path, caplog):
    image = grading_batches(fitted_imager(), 1)[0][0]
    net = tiny_student()  # a hand-made backbone: no builder makes it
    net.topology = None
    net.head[1] = nn.Linear(8, 5)
    with caplog.at_level(logging.WARNING, logger="compression.deploy"):
        bundle = write_bundle(tmp_path, net, (image,), ["image"], "grading",
                              grading_spec(GRADING_PREPROCESSING, None), {}, exporter="torchscript")
    assert bundle.network_path is None and not list(tmp_path.glob("network.*"))
    assert "never pickled" in caplog.text and "cannot describe a TopoFusionNet" in caplog.text
    assert set(bundle.manifest["sha256"]) == {"model.onnx", "model.xml", "model.bin"}  # the ONNX model and its IR
    with pytest.raises(BundleError, match="run without gradcam=true"):
        bundle.load_network()


def test_an_architecture_that_builds_another_network_gets_no_file(disc, tmp_path: Path, caplog):
    bundle, net = disc
    image = torch.rand(1, 3, 32, 32)
    other = {"kind": "vgg_unet", "spec": {"base": 8}}  # a wrong description: the weights do not fit
    with caplog.at_level(logging.WARNING, logger="compression.deploy"):
        written = write_bundle(tmp_path, net, (image,), ["image"], "disc", bundle.preprocessing, {},
                               exporter="torchscript", architecture=other)
    assert written.network_path is None and "do not fit" in caplog.text


def test_building_a_network_never_reads_other_weights():
    classifier = {"kind": "timm_classifier", "kwargs": {"backbone": "test_efficientnet", "num_classes": 2,
                                                        "backbone_kwargs": {"checkpoint_path": "/tmp/x.pth"}}}
    with pytest.raises(ValueError, match="checkpoint_path"):
        build_network(classifier)
    with pytest.raises(ValueError, match="'pickle' network"):
        build_network({"kind": "pickle"})
