"""Deployment bundles of tiny networks: round trip, int8, validation, the predictor, unusable photographs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from scipy.special import expit, softmax

from callbacks.deployment_bundle import DeploymentBundle
from callbacks.quantization_aware_training import QuantizationAwareTraining
from compression.deploy import (
    BundleError,
    Predictor,
    load_bundle,
    write_atomically,
    write_bundle,
)
from compression.export import ort_session, run_session
from datamodules.disc_crops import CoarseToFine
from datamodules.dr import grading_network_inputs, grading_preprocessing_from_spec, grading_spec
from datamodules.fundus import mask_on_source, read_rgb
from datamodules.optic_disc import (
    DiscPreprocessing,
    coarse_to_fine_mask,
    disc_network_input,
    disc_preprocessing_from_spec,
    disc_spec,
)
from datamodules.photograph import NotAFundusError, UnreadableImageError
from tests.compression.deploy_helpers import (
    DISC_PREPROCESSING,
    GRADING_PREPROCESSING,
    STUDENT_HPARAMS,
    BrightnessSegmenter,
    fitted_imager,
    fundus_photo,
    grading_batches,
    tiny_student,
    write_disc_bundle,
    write_grading_bundle,
    write_photo,
)


@pytest.fixture(scope="module")
def grading(tmp_path_factory):
    return write_grading_bundle(tmp_path_factory.mktemp("grading") / "deploy")


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    return write_disc_bundle(tmp_path_factory.mktemp("disc") / "deploy")


def torch_logits(net: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(*inputs).numpy()


# ------------------------------------------------------------------------------------------------ bundle
def test_bundle_round_trip_fp32_equals_torch_and_int8_stays_close(grading):
    bundle, net, imager = grading
    loaded = load_bundle(bundle.folder)
    manifest = json.loads((bundle.folder / "bundle.json").read_text())
    assert manifest["format"] == 2 and loaded.task == "grading" and loaded.stage == "student"
    assert loaded.input_names == ("image", "topo") and loaded.class_names == ["0", "1", "2", "3", "4"]
    assert manifest["files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx", "network": "network.safetensors",
                                 "openvino_fp32": "model.xml", "openvino_fp32_weights": "model.bin",
                                 "openvino_int8": "model_int8.xml", "openvino_int8_weights": "model_int8.bin"}
    assert set(manifest["sha256"]) == set(manifest["files"].values())
    assert manifest["int8"]["calibration_images"] == 4 and manifest["int8"]["parity"]["images"] == 4.0
    assert manifest["preprocessing"]["imager"]["scale"] == imager.state_dict()["scale"]
    # photographs the calibration never saw, three at once: the batch axis is dynamic
    image, topo = (torch.cat(t) for t in zip(*grading_batches(imager, 9)[6:], strict=True))
    expected = torch_logits(net, image, topo)
    (fp32,) = run_session(ort_session(loaded.fp32_path), [image, topo])
    np.testing.assert_allclose(fp32, expected, atol=1e-4, rtol=1e-3)
    (int8,) = run_session(ort_session(loaded.int8_path), [image, topo])
    spread = expected.max() - expected.min()
    assert np.abs(int8 - expected).max() < 0.05 * spread
    np.testing.assert_array_equal(torch_logits(loaded.load_network(), image, topo), expected)


def test_a_given_int8_file_is_copied_instead_of_quantizing(grading, tmp_path: Path):
    bundle, net, imager = grading
    batches = grading_batches(imager, 1)
    copied = write_bundle(tmp_path / "qat", net, batches[0], ["image", "topo"], "grading",
                          bundle.preprocessing, {"stage": "student_qat"}, int8_onnx=bundle.int8_path,
                          exporter="torchscript")
    assert copied.int8_path.read_bytes() == bundle.int8_path.read_bytes()
    assert copied.manifest["int8"]["source"] == "quantization-aware training"
    assert "parity" not in copied.manifest["int8"]  # no calibration images given: nothing to measure on


def test_a_failing_int8_step_keeps_the_fp32_bundle(grading, tmp_path: Path, caplog):
    bundle, net, imager = grading
    batches = grading_batches(imager, 1)
    with caplog.at_level(logging.WARNING, logger="compression.deploy"):
        kept = write_bundle(tmp_path / "b", net, batches[0], ["image", "topo"], "grading",
                            bundle.preprocessing, {}, calibration_batches=[], exporter="torchscript")
    assert kept.int8_path is None and not (tmp_path / "b" / "model_int8.onnx").exists()
    assert "zero images" in kept.manifest["int8"]["error"] and "fp32 model only" in caplog.text
    assert Predictor(kept).precision == "fp32"  # int8 asked for, none there


def test_rewriting_a_folder_leaves_no_stale_int8_file(grading, tmp_path: Path):
    bundle, net, imager = grading
    folder = tmp_path / "deploy"
    shutil.copytree(bundle.folder, folder)
    rewritten = write_bundle(folder, net, grading_batches(imager, 1)[0], ["image", "topo"], "grading",
                             bundle.preprocessing, {}, exporter="torchscript")
    assert rewritten.int8_path is None and not (folder / "model_int8.onnx").exists()


def test_load_bundle_names_what_is_wrong(grading, tmp_path: Path):
    bundle, _, _ = grading
    folder = tmp_path / "copy"
    shutil.copytree(bundle.folder, folder)
    (folder / "model_int8.onnx").unlink()
    with pytest.raises(BundleError, match="model_int8.onnx"):
        load_bundle(folder)
    manifest = json.loads((folder / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps(manifest | {"format": 3}))
    with pytest.raises(BundleError, match="format 3"):
        load_bundle(folder)
    (folder / "bundle.json").unlink()
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_write_bundle_refuses_a_spec_of_another_task_and_reserved_extra_keys(grading, tmp_path: Path):
    _, net, imager = grading
    example = grading_batches(imager, 1)[0]
    with pytest.raises(ValueError, match="'disc' preprocessing spec"):
        write_bundle(tmp_path, net, example, ["image", "topo"], "grading", disc_spec(DISC_PREPROCESSING), {})
    with pytest.raises(ValueError, match="files"):
        write_bundle(tmp_path, net, example, ["image", "topo"], "grading",
                     grading_spec(GRADING_PREPROCESSING, imager), {"files": {}})


# --------------------------------------------------------------------------------------- preprocessing spec
def test_specs_survive_json_and_rebuild_the_same_preprocessing():
    imager = fitted_imager()
    spec = json.loads(json.dumps(grading_spec(GRADING_PREPROCESSING, imager)))
    preprocessing, rebuilt = grading_preprocessing_from_spec(spec)
    assert preprocessing == GRADING_PREPROCESSING
    photo = fundus_photo(11)
    for original, again in zip(grading_network_inputs(photo, GRADING_PREPROCESSING, imager),
                               grading_network_inputs(photo, preprocessing, rebuilt), strict=True):
        np.testing.assert_allclose(np.asarray(again), np.asarray(original), rtol=1e-6, atol=1e-7)
    disc = DiscPreprocessing(image_size=48, clahe=False, equalize_hist=True, clahe_tile_grid=4)
    assert disc_preprocessing_from_spec(json.loads(json.dumps(disc_spec(disc)))) == disc


def test_a_spec_of_another_preprocessing_version_is_refused():
    spec = grading_spec(GRADING_PREPROCESSING, None) | {"preprocess_version": 99}
    with pytest.raises(ValueError, match="version 99"):
        grading_preprocessing_from_spec(spec)
    with pytest.raises(ValueError, match="not a 'disc' spec"):
        disc_preprocessing_from_spec(grading_spec(GRADING_PREPROCESSING, None))


# ------------------------------------------------------------------------------------------------ predictor
def test_the_predictor_grades_as_the_network_does_on_the_evaluation_inputs(grading, tmp_path: Path):
    bundle, net, imager = grading
    photo = write_photo(tmp_path / "eye.png", fundus_photo(21))
    image, topo, _ = grading_network_inputs(read_rgb(photo), GRADING_PREPROCESSING, imager)
    expected = softmax(torch_logits(net, image, topo)[0].astype(np.float64))
    predicted = Predictor(bundle, precision="fp32").predict_file(photo)
    np.testing.assert_allclose(predicted.probabilities, expected, atol=1e-5)
    assert predicted.grade == int(np.argmax(expected))
    assert predicted.latency_ms >= predicted.model_ms > 0
    int8 = Predictor(bundle)
    assert int8.precision == "int8" and int8.model_path.name == "model_int8.onnx"
    assert abs(int8.predict_file(photo).probabilities.sum() - 1.0) < 1e-6


def test_the_predictor_maps_the_disc_mask_back_onto_the_photograph(disc, tmp_path: Path):
    bundle, net = disc
    canvas = np.zeros((80, 120, 3), np.uint8)  # a wide camera frame: crop and padding both matter
    canvas[4:76, 30:102] = fundus_photo(3, size=72)
    photo = write_photo(tmp_path / "wide.png", canvas)
    tensor, _, crop = disc_network_input(read_rgb(photo), DISC_PREPROCESSING)
    # the probabilities scaled to the photograph, then thresholded at 0.5
    expected = mask_on_source(expit(torch_logits(net, tensor)[0, 0]), crop, 0.5).astype(np.uint8) * 255
    predicted = Predictor(bundle, precision="fp32").predict_file(photo)
    assert predicted.mask.shape == (80, 120) and predicted.overlay.shape == (80, 120, 3)
    assert set(np.unique(predicted.mask)) <= {0, 255}
    assert np.mean(predicted.mask != expected) < 0.01  # only pixels at the threshold may flip
    assert 0 < predicted.area_fraction < 1 and predicted.mask[:, :30].max() == 0  # nothing outside the retina
    assert predicted.first_pass == ""  # a one-pass bundle


def test_a_two_pass_bundle_segments_the_crop_around_the_disc_the_first_pass_found(tmp_path: Path):
    settings = CoarseToFine(enabled=True, crop_scale=3.0)
    bundle, net = write_disc_bundle(tmp_path / "deploy", net=BrightnessSegmenter(), coarse_to_fine=settings)
    assert bundle.preprocessing["coarse_to_fine"] == settings.spec()
    photo_rgb = np.zeros((300, 400, 3), np.uint8)  # the camera's dark surround
    cv2.circle(photo_rgb, (200, 150), 140, (90, 40, 30), thickness=-1)  # the retina
    for end in ((80, 60), (90, 250), (330, 260), (200, 20)):  # vessels leaving the disc
        cv2.line(photo_rgb, (260, 120), end, (55, 15, 12), thickness=4)
    cv2.circle(photo_rgb, (260, 120), 22, (250, 240, 200), thickness=-1)  # the bright disc, over the vessels
    photo = write_photo(tmp_path / "eye.png", photo_rgb)
    predictor = Predictor(bundle, precision="fp32")
    calls = []
    run = predictor._run
    predictor._run = lambda inputs: calls.append(inputs[0].shape) or run(inputs)
    predicted = predictor.predict_file(photo)
    assert predicted.first_pass == "found" and calls == [(1, 3, 32, 32)] * 2
    # what the same two passes give with the PyTorch network
    image = read_rgb(photo)
    tensor, _, crop = disc_network_input(image, DISC_PREPROCESSING)
    expected, search = coarse_to_fine_mask(image, expit(torch_logits(net, tensor)[0, 0]), crop, DISC_PREPROCESSING,
                                           settings, 0.5, lambda crop_tensor: expit(torch_logits(net, crop_tensor)[0, 0]))
    assert search.found and np.mean((predicted.mask > 0) != expected) < 0.001
    truth = np.zeros((300, 400), bool)
    cv2.circle(truth.view(np.uint8), (260, 120), 22, 1, thickness=-1)
    # the second pass sees the disc 3x larger: its outline on the photograph is closer than the first pass's
    one_pass = mask_on_source(expit(torch_logits(net, tensor)[0, 0]), crop, 0.5)
    assert (expected ^ truth).sum() < (one_pass ^ truth).sum()
    # a photograph without anything disc-bright: no disc found, the whole-photograph mask, said so
    no_disc = photo_rgb.copy()
    cv2.circle(no_disc, (260, 120), 22, (90, 40, 30), thickness=-1)
    dim = write_photo(tmp_path / "dim.png", no_disc)
    calls.clear()
    nothing = predictor.predict_file(dim)
    assert nothing.first_pass == "no disc found" and calls == [(1, 3, 32, 32)] and nothing.mask.max() == 0


def test_the_predictor_refuses_unreadable_files_and_non_fundus_images(grading, tmp_path: Path):
    predictor = Predictor(grading[0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n not really")
    with pytest.raises(UnreadableImageError, match="not a readable image"):
        predictor.predict_file(tmp_path / "broken.png")
    black = write_photo(tmp_path / "black.png", np.full((100, 100, 3), 3, np.uint8))
    with pytest.raises(NotAFundusError, match="almost black"):
        predictor.predict_file(black)


# ---------------------------------------------------------------------------------------- write_atomically
def test_write_atomically_gives_the_usual_permissions_and_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "results.csv"
    umask = os.umask(0o022)
    try:
        write_atomically(target, lambda path: path.write_text("new\n"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600

    def half_written(path: Path) -> None:
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_written)
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


# ------------------------------------------------------------------------------------------------ callback
class _Data:
    """The datamodule surface the callback reads."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], spec: dict):
        self.batches, self.spec = batches, spec

    def inference_spec(self) -> dict:
        return self.spec

    def calibration_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return self.batches


def test_the_callback_bundles_the_stage_with_the_qat_int8_model(grading, tmp_path: Path):
    bundle, net, imager = grading
    batches = [{"image": image, "topo": topo, "label": torch.tensor([0])}
               for image, topo in grading_batches(imager, 2)]
    qat = QuantizationAwareTraining(output_dir=str(tmp_path))
    qat.int8_path = bundle.int8_path  # what its on_train_end leaves
    trainer = SimpleNamespace(datamodule=_Data(batches, bundle.preprocessing), test_dataloaders=[batches],
                              loggers=[], callbacks=[qat], default_root_dir=str(tmp_path / "unused"))
    module = SimpleNamespace(net=net, num_classes=5, hparams=STUDENT_HPARAMS,
                             example_inputs=lambda batch: (batch["image"][:1], batch["topo"][:1]))
    callback = DeploymentBundle(weights_dir=str(tmp_path / "student_qat"), exporter="torchscript")
    callback.on_test_end(trainer, module)
    written = load_bundle(tmp_path / "student_qat" / "deploy")
    assert written.stage == "student_qat" and written.input_names == ("image", "topo")
    assert written.int8_path.read_bytes() == bundle.int8_path.read_bytes()
    assert written.manifest["int8"]["parity"]["images"] == 2.0  # measured on the calibration images
    assert callback.bundle.folder == written.folder
    # the student is described by its module's hyperparameters, for GradCAM
    assert written.network_path is not None and type(written.load_network()) is type(net)


def test_a_tiny_student_without_topology_bundles_one_input(tmp_path: Path):
    net = tiny_student()
    net.topology = None  # the CNN + CBAM student (topo_features=0)
    head = net.head[1]
    net.head[1] = torch.nn.Linear(8, 5)
    net.head[1].weight.data.copy_(head.weight.data[:, :8])
    image = grading_batches(fitted_imager(), 1)[0][0]
    bundle = write_bundle(tmp_path, net, (image,), ["image"], "grading",
                          grading_spec(GRADING_PREPROCESSING, None), {}, exporter="torchscript")
    photo = write_photo(tmp_path / "eye.png", fundus_photo(4))
    image_only = grading_network_inputs(read_rgb(photo), GRADING_PREPROCESSING)[0]
    expected = softmax(torch_logits(net, image_only)[0])
    np.testing.assert_allclose(Predictor(bundle).predict_file(photo).probabilities, expected, atol=1e-5)
