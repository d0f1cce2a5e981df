"""OpenVINO beside ONNX Runtime: IR round trip, NNCF int8, the precision that really ran, and the runtime a
bundle records and a predictor reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compression.deploy import BundleError, Predictor, load_bundle, write_bundle
from compression.export import export_onnx, ort_session, run_session
from compression.nncf_quantize import read_feeds, write_feeds
from compression.openvino_runtime import (
    OpenVINOModelError,
    OpenVINOSession,
    compile_model,
    cpu_capabilities,
    quantize_openvino,
    read_model,
    save_ir,
)
from compression.quantization import calibration_feeds
from compression.runtimes import OPENVINO, ORT, open_runner, runtime_of
from tests.compression.deploy_helpers import (
    DISC_PREPROCESSING,
    fundus_photo,
    write_disc_bundle,
    write_photo,
)
from tests.compression.helpers import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    net = tiny_unet()
    path = export_onnx(net, (torch.rand(1, 3, 32, 32),), tmp_path_factory.mktemp("ov") / "unet.onnx", ("image",),
                       exporter="torchscript", dynamic_spatial=True)
    return net, path


def logits(net: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(images).numpy()


def test_openvino_runs_the_exported_network_as_pytorch_does(exported, tmp_path: Path):
    net, path = exported
    images = torch.rand(3, 3, 48, 48)  # another batch and another size than the export's example
    session = OpenVINOSession.open(path, "fp32", threads=1)
    assert session.executed == "fp32" and session.input_names == ("image",)
    np.testing.assert_allclose(session.run([images])[0], logits(net, images), atol=1e-4, rtol=1e-3)
    # the IR keeps fp32 weights (OpenVINO's own default would store fp16) and runs the same
    xml, weights = save_ir(read_model(path), tmp_path / "unet.xml")
    assert weights.stat().st_size > 0.9 * path.stat().st_size
    np.testing.assert_allclose(OpenVINOSession.open(xml).run([images])[0], logits(net, images), atol=1e-4, rtol=1e-3)


def test_bf16_is_asked_for_explicitly_and_named_as_it_ran(exported):
    net, path = exported
    session = OpenVINOSession.open(path, "bf16", threads=1)
    # a CPU without bf16 runs the hint in fp32, and the row must say so
    assert session.executed == ("bf16" if "BF16" in cpu_capabilities() else "fp32")
    images = torch.rand(2, 3, 32, 32)
    expected = logits(net, images)
    assert np.corrcoef(session.run([images])[0].ravel(), expected.ravel())[0, 1] > 0.99


def test_nncf_int8_of_a_tiny_network_follows_fp32(exported, tmp_path: Path):
    net, path = exported
    feeds = calibration_feeds([torch.rand(8, 3, 32, 32)], ("image",), 8)
    xml, weights = quantize_openvino(path, feeds, tmp_path / "int8.xml")
    session = OpenVINOSession.open(xml, "fp32", threads=1)
    assert session.executed == "int8"  # every convolution really runs int8 kernels
    assert weights.stat().st_size < 0.5 * path.stat().st_size  # int8 weights in the .bin
    images = torch.rand(4, 3, 32, 32)
    quantized, expected = session.run([images])[0], logits(net, images)
    assert np.corrcoef(quantized.ravel(), expected.ravel())[0, 1] > 0.98
    # not a copy of fp32: the int8 arithmetic moves the logits
    assert np.abs(quantized - expected).max() > 1e-4
    with pytest.raises(ValueError, match="calibration feeds are empty"):
        quantize_openvino(path, [], tmp_path / "none.xml")
    with pytest.raises(RuntimeError, match="NNCF could not quantize"):
        quantize_openvino(tmp_path / "missing.onnx", feeds, tmp_path / "none.xml")


def test_unreadable_files_and_bad_settings_are_named(exported, tmp_path: Path):
    _, path = exported
    with pytest.raises(OpenVINOModelError, match="does not exist"):
        read_model(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(OpenVINOModelError, match="garbage.onnx"):
        read_model(garbage)
    with pytest.raises(ValueError, match="int8 is a property of the model file"):
        compile_model(path, "int8")
    with pytest.raises(ValueError, match="threads=0"):
        compile_model(path, "fp32", threads=0)
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        open_runner(path, "tensorrt")
    assert runtime_of(path) == ORT and runtime_of(tmp_path / "m.xml") == OPENVINO


# ------------------------------------------------------------------------------------------------ bundles
@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    return write_disc_bundle(tmp_path_factory.mktemp("disc") / "deploy")


def test_a_bundle_holds_both_runtimes_models_and_records_the_faster(disc):
    bundle, net = disc
    manifest = bundle.manifest
    openvino = manifest["openvino"]
    assert openvino["fp32"]["max_abs_diff"] < 1e-4 and openvino["fp32"]["executed_precision"] == "fp32"
    assert openvino["int8"]["source"] == "NNCF post-training quantization"
    assert openvino["int8"]["executed_precision"] == "int8"
    assert openvino["int8"]["parity"]["images"] == manifest["int8"]["parity"]["images"] > 0
    assert openvino["int8"]["parity"]["mask_dice_int8_vs_fp32"] > 0.8
    runtime = manifest["runtime"]
    assert set(runtime["latency_ms"]) == {"ort_fp32", "ort_int8", "openvino_fp32", "openvino_int8"}
    for precision in ("fp32", "int8"):
        faster = min((ORT, OPENVINO), key=lambda name: runtime["latency_ms"][f"{name}_{precision}"])
        assert runtime["default"][precision] == faster == bundle.default_runtime(precision)
    assert "INT8" in runtime["cpu_capabilities"] or "FP32" in runtime["cpu_capabilities"]
    assert manifest["versions"]["openvino"] and manifest["versions"]["nncf"]


def test_the_predictor_runs_the_runtime_asked_for_or_the_recorded_one(disc, tmp_path: Path):
    bundle, net = disc
    photo = write_photo(tmp_path / "eye.png", fundus_photo(4, size=64))
    on_ort = Predictor(bundle, "fp32", runtime="ort").predict_file(photo)
    openvino = Predictor(bundle, "fp32", runtime="openvino")
    assert openvino.model_path.name == "model.xml" and openvino.executed_precision == "fp32"
    assert np.mean(openvino.predict_file(photo).mask != on_ort.mask) < 0.01  # only pixels at the threshold
    int8 = Predictor(bundle, "int8", runtime="openvino")
    assert int8.model_path.name == "model_int8.xml" and int8.executed_precision == "int8"
    assert int8.predict_file(photo).mask.shape == on_ort.mask.shape
    assert Predictor(bundle, "int8").runtime == bundle.default_runtime("int8")
    with pytest.raises(ValueError, match="runtime='gpu'"):
        Predictor(bundle, "fp32", runtime="gpu")


def test_the_recorded_runtime_is_read_from_bundle_json(disc, tmp_path: Path):
    bundle, _ = disc
    copy = Path(shutil.copytree(bundle.folder, tmp_path / "copy"))
    for chosen in (ORT, OPENVINO):
        manifest = json.loads((copy / "bundle.json").read_text())
        manifest["runtime"]["default"]["int8"] = chosen
        (copy / "bundle.json").write_text(json.dumps(manifest))
        assert Predictor(load_bundle(copy), "int8").runtime == chosen
    # a bundle without an int8 model runs fp32 for int8: on fp32's faster runtime
    manifest = json.loads((copy / "bundle.json").read_text())
    del manifest["runtime"]["default"]["int8"]
    manifest["runtime"]["default"]["fp32"] = OPENVINO
    (copy / "bundle.json").write_text(json.dumps(manifest))
    assert load_bundle(copy).default_runtime("int8") == OPENVINO


def test_a_bundle_without_openvino_says_to_use_onnx_runtime(disc, tmp_path: Path):
    bundle, net = disc
    images = torch.rand(1, 3, DISC_PREPROCESSING.image_size, DISC_PREPROCESSING.image_size)
    plain = write_bundle(tmp_path / "plain", net, (images,), ["image"], "disc", bundle.preprocessing, {},
                         exporter="torchscript", openvino=False)
    assert plain.manifest["openvino"] is None and plain.default_runtime("fp32") == ORT
    assert not any(path.suffix in (".xml", ".bin") for path in plain.folder.iterdir())
    with pytest.raises(BundleError, match="no OpenVINO model.*runtime=ort"):
        Predictor(plain, "fp32", runtime="openvino")
    (fp32,) = run_session(ort_session(plain.fp32_path), [images])
    assert fp32.shape == (1, 1, DISC_PREPROCESSING.image_size, DISC_PREPROCESSING.image_size)


def test_a_changed_ir_weights_file_is_refused(disc, tmp_path: Path):
    bundle, _ = disc
    copy = Path(shutil.copytree(bundle.folder, tmp_path / "tampered"))
    weights = bytearray((copy / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (copy / "model.bin").write_bytes(bytes(weights))
    with pytest.raises(BundleError, match="model.bin does not match its SHA-256"):
        load_bundle(copy)


def test_calibration_feeds_reach_the_quantizer_process_as_they_were(tmp_path: Path):
    feeds = [{"image": np.full((1, 3, 4, 4), float(i), np.float32), "topo": np.arange(3, dtype=np.float32) + i}
             for i in range(12)]  # more than 10 images: the order must not be the file names' text order
    write_feeds(feeds, tmp_path / "feeds.npz")
    read = read_feeds(tmp_path / "feeds.npz")
    assert len(read) == 12
    for expected, got in zip(feeds, read, strict=True):
        assert expected.keys() == got.keys()
        for name in expected:
            np.testing.assert_array_equal(expected[name], got[name])
