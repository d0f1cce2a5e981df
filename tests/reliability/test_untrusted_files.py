"""Files a user or a server hands the suite: a planted model file never runs its code, and a photograph that
training would refuse is skipped by prediction with the same reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from compression.deploy import NETWORK_FILE
from experiments.predict import exit_status
from tests.compression.deploy_helpers import fundus_photo, write_disc_bundle, write_photo
from tests.compression.test_bundle_integrity import PlantedPayload, forge_manifest
from tests.datamodules.photo_helpers import damaged_jpeg, scanned_page

CONF = Path(__file__).resolve().parents[2] / "experiments" / "conf" / "predict"


@pytest.fixture(scope="module")
def disc_bundle(tmp_path_factory) -> Path:
    return write_disc_bundle(tmp_path_factory.mktemp("disc") / "prune-16" / "deploy")[0].folder


def predict_status(**options) -> int:
    """``make predict`` as the command line runs it: the exit status, errors logged."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("predict", overrides=[f"{key}={value}" for key, value in options.items()])
    return exit_status(cfg)


def test_a_planted_network_file_never_runs_its_code_under_gradcam(disc_bundle, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    folder, marker = tmp_path / "deploy", tmp_path / "code-ran"
    shutil.copytree(disc_bundle, folder)
    # whoever controls the folder swaps the network file for a pickle and rewrites bundle.json to match it
    torch.save(PlantedPayload(marker), folder / NETWORK_FILE)
    forge_manifest(folder)
    photo = write_photo(tmp_path / "in" / "eye.png", fundus_photo(3))
    status = predict_status(model=folder, input=photo.parent, output=tmp_path / "out", gradcam="true", threads=1)
    assert status == 2
    assert "not a safetensors network file" in caplog.text and "a pickled network is never read" in caplog.text
    assert not marker.exists()


def test_prediction_skips_what_training_refuses(disc_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    folder = tmp_path / "clinic"
    write_photo(folder / "a_eye.png", fundus_photo(4))
    write_photo(folder / "b_noise.png", np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    write_photo(folder / "c_page.png", scanned_page())
    damaged_jpeg(folder / "d_garbled.jpg")
    assert predict_status(model=disc_bundle, input=folder, output=tmp_path / "discs", threads=1) == 0
    table = pd.read_csv(tmp_path / "discs" / "predictions.csv").set_index("file")
    assert table["status"].to_dict() == {"a_eye.png": "ok", "b_noise.png": "skipped", "c_page.png": "skipped",
                                         "d_garbled.jpg": "skipped"}
    assert "neighbouring pixels are unrelated" in table.loc["b_noise.png", "reason"]
    assert "as in a document or a scan" in table.loc["c_page.png", "reason"]
    assert "the JPEG data is damaged" in table.loc["d_garbled.jpg", "reason"]
