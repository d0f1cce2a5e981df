"""DeploymentBundle on a real Trainer's test stage: a bundle that cannot be written never fails the stage, and a
network still prepared for quantization-aware training is bundled as a plain copy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning import LightningDataModule, Trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

import compression.deploy
from callbacks.deployment_bundle import DeploymentBundle, baked_qat_copy
from compression.deploy import DEPLOY_FOLDER, MANIFEST_FILE, load_bundle
from compression.export import ExportParityError
from compression.quantization import is_qat_prepared, prepare_qat
from datamodules.optic_disc import DiscPreprocessing, disc_spec
from lightning_modules.segmenter import DiscSegmenter
from tests.compression.helpers import DiscBatches, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32


def discs(count: int, seed: int) -> DiscBatches:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, SIZE, SIZE, generator=generator)
    return DiscBatches(images, (images[:, :1] > 0.5).float())


class TinyDiscData(LightningDataModule):
    """What DeploymentBundle reads of a datamodule: the test loader, the preprocessing spec, calibration images."""

    def test_dataloader(self) -> DataLoader:
        return DataLoader(discs(4, seed=0), batch_size=2)

    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(discs(2, seed=1), batch_size=2)

    def inference_spec(self) -> dict:
        return disc_spec(DiscPreprocessing(image_size=SIZE))


def segmenter(net: nn.Module | None = None) -> DiscSegmenter:
    module = DiscSegmenter(base=4, channels_last=False)
    module.net = net if net is not None else tiny_unet(base=4)
    return module


def run_test_stage(stage_dir: Path, module: DiscSegmenter, int8: bool = False) -> tuple[DeploymentBundle, dict]:
    callback = DeploymentBundle(weights_dir=str(stage_dir), int8=int8, calibration_images=2, exporter="torchscript")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    results = trainer.test(module, datamodule=TinyDiscData(), verbose=False)[0]
    return callback, results


def test_a_failed_export_is_logged_and_reported_and_the_stage_finishes(tmp_path: Path, monkeypatch, caplog):
    stage_dir = tmp_path / "runs" / "2026-01-01_00-00-00" / "prune-8"
    # a bundle from an earlier test of this stage: stale once the weights change, so it must not survive
    (stage_dir / DEPLOY_FOLDER).mkdir(parents=True)
    (stage_dir / DEPLOY_FOLDER / MANIFEST_FILE).write_text("{}")
    written: list[Path] = []

    def parity_fails(network, path, inputs, **kwargs):
        written.append(Path(path))  # model.onnx is on disk by now: the folder is half-written
        raise ExportParityError("ONNX Runtime differs from PyTorch by 3.2 (tolerance 1e-4)")

    monkeypatch.setattr(compression.deploy, "onnx_parity", parity_fails)
    with caplog.at_level(logging.ERROR, logger="callbacks.deployment_bundle"):
        callback, results = run_test_stage(stage_dir, segmenter())

    assert written == [stage_dir / DEPLOY_FOLDER / "model.onnx"]
    assert "test/dice" in results  # the test stage ended normally, with its metrics
    assert callback.report == {"deploy/failed": 1.0} and callback.bundle is None
    assert not (stage_dir / DEPLOY_FOLDER).exists()  # neither the half-written nor the stale bundle
    message = caplog.records[-1].getMessage()
    assert str(stage_dir) in message and "ExportParityError: ONNX Runtime differs" in message
    assert f"retest=true resume={stage_dir.parent}" in message


def test_a_written_bundle_reports_no_failure(tmp_path: Path):
    callback, _ = run_test_stage(tmp_path / "base-16", segmenter())
    assert callback.report == {} and load_bundle(tmp_path / "base-16" / DEPLOY_FOLDER).stage == "base-16"


def quantized_weights_in_a_plain_network(prepared: nn.Module) -> nn.Module:
    """The network ``tiny_unet`` builds, its weights replaced by the fake-quantized ones of ``prepared``."""
    reference = tiny_unet(base=4)
    layers = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in prepared.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                layers[name].weight.copy_(module.weight)
    return reference


def test_a_network_still_prepared_for_qat_is_bundled_as_a_plain_copy_with_its_quantized_weights(tmp_path: Path):
    prepared = prepare_qat(tiny_unet(base=4), [discs(2, seed=2).images])
    module = segmenter(prepared)
    callback, _ = run_test_stage(tmp_path / "qat-prune-8", module, int8=True)

    assert module.net is prepared and is_qat_prepared(prepared)  # the module's network is left as it is
    bundle = load_bundle(tmp_path / "qat-prune-8" / DEPLOY_FOLDER)
    assert bundle.int8_path is not None and bundle.manifest["files"]["network"] == "network.safetensors"
    network = bundle.load_network()
    assert not any(parametrize.is_parametrized(m) for m in network.modules()) and not is_qat_prepared(network)
    images = discs(2, seed=3).images
    with torch.no_grad():
        torch.testing.assert_close(network(images), quantized_weights_in_a_plain_network(prepared)(images))


def test_baked_copy_leaves_the_prepared_network_working():
    prepared = prepare_qat(tiny_unet(base=4), [discs(2, seed=2).images])
    conv = prepared.encoder[0][0]
    quantized_weight = conv.weight.detach().clone()
    plain = baked_qat_copy(prepared)
    assert type(plain.encoder[0][0]) is nn.Conv2d
    assert torch.equal(plain.encoder[0][0].weight, quantized_weight)
    # stripping a deep copy with remove_parametrizations would delete the class property both copies share
    assert parametrize.is_parametrized(conv) and torch.equal(conv.weight, quantized_weight)
    assert isinstance(plain.encoder[0][0].weight, nn.Parameter)
