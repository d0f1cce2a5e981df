"""A regression / ordinal student deploys with its fitted thresholds: network file, ONNX fp32 and int8, predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.deployment_bundle import grading_head_manifest
from compression.deploy import Predictor, load_bundle, write_bundle
from compression.export import ort_session, run_session
from compression.packed_format import describe_network
from datamodules.dr import grading_spec
from lightning_modules.nets.grading_head import continuous_grade
from lightning_modules.nets.student import build_student_net
from lightning_modules.ordinal import grades_from_scores
from tests.compression.deploy_helpers import (
    GRADING_PREPROCESSING,
    STUDENT_HPARAMS,
    fitted_imager,
    fundus_photo,
    grading_batches,
    write_photo,
)

#: deliberately far from rounding (0.5, 1.5, ...), so a deployment that ignored them would grade differently
THRESHOLDS = [-0.05, 0.0, 0.02, 0.04]


@pytest.mark.parametrize("head", ["regression", "ordinal"])
def test_a_threshold_head_deploys_with_its_fitted_thresholds(head, tmp_path: Path):
    torch.manual_seed(0)
    hparams = STUDENT_HPARAMS | {"head": head}
    net = build_student_net(**hparams).eval()
    imager = fitted_imager()
    batches = grading_batches(imager, 8)
    image, topo = (torch.cat(t) for t in zip(*batches, strict=True))
    with torch.no_grad():
        scores = continuous_grade(net.raw_outputs(image, topo), head).numpy()
    # thresholds spread around this untrained network's scores, so that several grades are predicted
    centre = float(np.median(scores))
    thresholds = [centre + t for t in THRESHOLDS]
    net.decoder.set_fit(thresholds, scale=0.05)
    expected = grades_from_scores(scores, thresholds)
    assert len(set(expected.tolist())) > 1

    bundle = write_bundle(tmp_path / "deploy", net, batches[0], ["image", "topo"], "grading",
                          grading_spec(GRADING_PREPROCESSING, imager),
                          {"stage": "student", **grading_head_manifest(net, hparams)},
                          calibration_batches=batches, calibration_images=4, exporter="torchscript",
                          architecture=describe_network(net, hparams))
    manifest = json.loads((bundle.folder / "bundle.json").read_text())
    assert manifest["grading_head"]["kind"] == head
    assert manifest["grading_head"]["thresholds"] == pytest.approx(thresholds, abs=1e-5)

    loaded = load_bundle(bundle.folder)
    (fp32,) = run_session(ort_session(loaded.fp32_path), [image, topo])
    assert np.array_equal(fp32.argmax(axis=1), expected)
    rebuilt = loaded.load_network()
    assert torch.allclose(rebuilt.decoder.thresholds, net.decoder.thresholds)
    with torch.no_grad():
        assert np.array_equal(rebuilt(image, topo).argmax(dim=1).numpy(), expected)

    # the predictor on photograph files grades as the network's thresholded score does
    path = write_photo(tmp_path / "photo.png", fundus_photo(3))
    prediction = Predictor(loaded, precision="fp32").predict_file(path)
    with torch.no_grad():
        score = continuous_grade(net.raw_outputs(*(torch.as_tensor(t) for t in prediction.inputs)), head).numpy()
    assert prediction.grade == int(grades_from_scores(score, thresholds)[0])
