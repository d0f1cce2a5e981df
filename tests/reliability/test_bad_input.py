"""Bad input, refused before anything trains: a table of what a new user gets wrong, on generated data.

Each case runs the real entry point's function on a composed config and asserts the error names the file or key
and what to do, and that nothing trained: no MLflow run was opened and no checkpoint was written. The pickle
case asserts that a planted model file's code never runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from datamodules.errors import DataValidationError
from experiments.config_checks import ConfigError
from experiments.glaucoma_chain import run_glaucoma_chain
from experiments.train_dr import run_dr_distill
from tests.datamodules.photo_helpers import damaged_jpeg, scanned_page
from tests.experiments.helpers import compose_config, mlflow_store, runs_by_name

pytestmark = pytest.mark.usefixtures("one_thread")

DR = ["debug=fast_dev_run"]
DISC = ["debug=fast_dev_run", "chain.bases=[16,8]", "chain.arms=[prune]"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "project"


def nothing_trained(project: Path) -> bool:
    """No MLflow run in the project's store and no checkpoint under its outputs."""
    store = project / "mlruns" / "mlflow.db"
    if store.is_file():
        client = mlflow_store(project)
        if any(client.search_runs([e.experiment_id]) for e in client.search_experiments()):
            return False
    return not list(project.glob("outputs/**/*.ckpt"))


def run_dr(project: Path, overrides: list[str]):
    return run_dr_distill(compose_config("train_dr", overrides, project / "outputs" / "dr-distill" / "runs" / "r"))


def run_disc(project: Path, overrides: list[str]):
    cfg = compose_config("glaucoma_chain", overrides, project / "outputs" / "glaucoma-iterations" / "runs" / "r")
    return run_glaucoma_chain(cfg)


# ------------------------------------------------------------------------------------ unusable photographs
def _greyscale_jpeg(path: Path, photo: np.ndarray) -> None:
    cv2.imwrite(str(path.with_suffix(".jpg")), cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))


def _tiny(path: Path, photo: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(cv2.resize(photo, (10, 10)), cv2.COLOR_RGB2BGR))


def _black(path: Path, photo: np.ndarray) -> None:
    cv2.imwrite(str(path), np.zeros_like(photo))


def _noise(path: Path, photo: np.ndarray) -> None:
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, photo.shape, dtype=np.uint8))


def _scanned_page(path: Path, photo: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(scanned_page(), cv2.COLOR_RGB2BGR))


def _garbled_jpeg(path: Path, photo: np.ndarray) -> None:
    damaged_jpeg(path.with_suffix(".jpg"))


def _not_an_image(path: Path, photo: np.ndarray) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is a text file")


#: (case, how the file is spoiled, what the error says about it)
UNUSABLE_PHOTOGRAPHS: list[tuple[str, Callable[[Path, np.ndarray], None], str]] = [
    ("greyscale JPEG", _greyscale_jpeg, "1 channel(s) (greyscale)"),
    ("10x10 image", _tiny, "too small (10x10 px)"),
    ("all-black image", _black, "almost black"),
    ("random noise", _noise, "neighbouring pixels are unrelated"),
    ("scanned page", _scanned_page, "as in a document or a scan"),
    ("JPEG with garbled data", _garbled_jpeg, "the JPEG data is damaged and decodes only partly"),
    ("not an image", _not_an_image, "not a readable image"),
]


def _spoil_aptos_image(root: Path, spoil: Callable[[Path, np.ndarray], None]) -> str:
    """Replace img007 of the APTOS set by a spoiled file (a .jpg one keeps the id: the loader tries suffixes)."""
    path = root / "train_images" / "img007.png"
    photo = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    path.unlink()
    spoil(path, photo)
    return "img007"


@pytest.mark.parametrize(("case", "spoil", "reason"), UNUSABLE_PHOTOGRAPHS, ids=[c[0] for c in UNUSABLE_PHOTOGRAPHS])
def test_grading_refuses_an_unusable_photograph_before_training(project, aptos_root, case, spoil, reason):
    name = _spoil_aptos_image(aptos_root, spoil)
    with pytest.raises(DataValidationError) as raised:
        run_dr(project, [*DR, "data=aptos", f"data.root={aptos_root}"])
    message = str(raised.value)
    assert "1 of 40 images cannot be used; nothing was trained" in message
    assert name in message and reason in message, message
    assert "data.skip_unusable=true" in message  # the way out is named
    assert nothing_trained(project)


@pytest.mark.parametrize(("case", "spoil", "reason"), UNUSABLE_PHOTOGRAPHS[2:4] + UNUSABLE_PHOTOGRAPHS[5:6],
                         ids=[c[0] for c in UNUSABLE_PHOTOGRAPHS[2:4] + UNUSABLE_PHOTOGRAPHS[5:6]])
def test_the_disc_chain_refuses_an_unusable_photograph_before_training(project, disc_root, case, spoil, reason):
    image = disc_root / "images" / "disc_03.png"
    photo = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    image.unlink()
    spoil(image, photo)
    with pytest.raises(DataValidationError) as raised:
        run_disc(project, [*DISC, "data=disc_folder", f"data.root={disc_root}"])
    assert "disc_03" in str(raised.value) and reason in str(raised.value), str(raised.value)
    assert nothing_trained(project)


def test_a_mask_of_the_wrong_size_is_refused_before_training(project, disc_root):
    mask = disc_root / "masks" / "disc_05.png"
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE), (50, 40)))
    with pytest.raises(DataValidationError, match=r"disc_05.png: mask is 50x40 px"):
        run_disc(project, [*DISC, "data=disc_folder", f"data.root={disc_root}"])
    assert nothing_trained(project)


def test_skip_unusable_trains_without_the_listed_files_and_logs_them(project, aptos_root):
    _spoil_aptos_image(aptos_root, _black)
    (aptos_root / "train_images" / "img011.png").write_bytes(b"not an image")
    run_dr(project, [*DR, "data=aptos", f"data.root={aptos_root}", "data.skip_unusable=true", "stages=[teacher]"])
    skipped = pd.read_csv(project / "outputs" / "dr-distill" / "runs" / "r" / "skipped_files.csv")
    assert skipped["sample_id"].tolist() == ["img007", "img011"]
    assert "almost black" in skipped["reason"][0] and "not a readable image" in skipped["reason"][1]
    splits = pd.read_csv(project / "outputs" / "dr-distill" / "runs" / "r" / "splits.csv")
    assert len(splits) == 38 and not {"img007", "img011"} & set(splits["sample_id"])
    client = mlflow_store(project)
    parent = next(run for name, runs in runs_by_name(client, "dr-distill").items() if name.startswith("dr-distill")
                  for run in runs)
    assert parent.data.metrics["data/skipped_files"] == 2.0
    assert "run/skipped_files.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "run")}


# ---------------------------------------------------------------------------------------- label files
def test_a_csv_row_without_its_image_and_an_unknown_label_are_refused(project, aptos_root):
    table = pd.read_csv(aptos_root / "train.csv")
    table.loc[3, "diagnosis"] = 7
    table.loc[len(table)] = ["img999", 2]
    table.to_csv(aptos_root / "train.csv", index=False)
    with pytest.raises(DataValidationError) as raised:
        run_dr(project, [*DR, "data=aptos", f"data.root={aptos_root}"])
    assert "label 7 is outside the grades 0-4" in str(raised.value)
    assert "no image for 'img999'" in str(raised.value)
    assert nothing_trained(project)


def test_a_split_without_a_grade_is_refused(project, aptos_root):
    table = pd.read_csv(aptos_root / "train.csv")
    table = table[table["diagnosis"] != 3].iloc[:-2]  # grade 3 gone from every split
    table.to_csv(aptos_root / "train.csv", index=False)
    with pytest.raises(DataValidationError, match=r"split .train. \(\d+ images\) has no image of grade\(s\) \[3\]"):
        run_dr(project, [*DR, "data=aptos", f"data.root={aptos_root}"])
    assert nothing_trained(project)


# ---------------------------------------------------------------------------------------------- config
CONFIG_CASES = [
    ("train_dr", ["trainer.max_epochs=abc"], "trainer.max_epochs='abc' (str): expected an integer >= 1"),
    ("train_dr", ["data.image_size=7"], "data.image_size=7: expected an integer >= 32"),
    ("train_dr", ["+distill.temprature=2"], "distill.temprature is not a setting of distill (did you mean "
                                            "distill.temperature?)"),
    ("train_dr", ["distill.alpha_end=1.5"], "distill.alpha_end=1.5: expected a number in [0, 1]"),
    ("train_dr", ["optim.lr=-0.1"], "optim.lr=-0.1: expected a number > 0"),
    ("train_dr", ["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
    ("train_dr", ["data.skip_unusable=maybe"], "data.skip_unusable='maybe' (str): expected true or false"),
    ("glaucoma_chain", ["data.image_size=100"], "data.image_size=100: expected an integer >= 32, a multiple of 16"),
    ("glaucoma_chain", ["chain.arms=[prune,distill]"], "['distill'] not allowed"),
    ("glaucoma_chain", ["chain.bases=[16,32]"], "expected distinct widths, widest first"),
    ("glaucoma_chain", ["+chain.patiense=3"], "chain.patiense is not a setting of chain (did you mean chain.patience?)"),
    ("glaucoma_chain", ["chain.target_dice=1.2"], "chain.target_dice=1.2: expected a number in (0, 1]"),
    ("glaucoma_chain", ["+model.segmenter.dropuot=0.1"], "model.segmenter.dropuot is not a setting of "
                                                          "model.segmenter"),
]


@pytest.mark.parametrize(("entry", "overrides", "expected"), CONFIG_CASES, ids=[" ".join(c[1]) for c in CONFIG_CASES])
def test_a_bad_setting_is_named_before_anything_starts(project, entry, overrides, expected):
    run = run_dr if entry == "train_dr" else run_disc
    with pytest.raises(ConfigError) as raised:
        run(project, [*(DR if entry == "train_dr" else DISC), *overrides])
    assert expected in str(raised.value), str(raised.value)
    assert nothing_trained(project) and not (project / "mlruns").exists()  # not even a store was created


def test_a_bad_argument_only_a_constructor_knows_fails_before_the_first_stage(project):
    # the weight-sharing finisher's cluster count is checked by its callback: every stage's module and callbacks
    # are built once before iteration 1 trains, so this fails in seconds, not after three stages
    with pytest.raises(ConfigError, match=r"stage share-prune-8 cannot be built: ValueError: k=1: the number of clusters"):
        run_disc(project, [*DISC, "chain.finishers=[share]", "chain.finish_after=[prune-8]",
                           "chain.callbacks.weight_sharing.k=1"])
    assert nothing_trained(project)


def test_the_entry_point_exits_with_a_message_not_a_traceback(project, caplog):
    from experiments.train_dr import main

    cfg = compose_config("train_dr", [*DR, "trainer.max_epochs=abc"], project / "outputs" / "dr-distill" / "x")
    with pytest.raises(SystemExit) as exited:
        main.__wrapped__(cfg)
    assert exited.value.code == 2
    assert "trainer.max_epochs='abc'" in caplog.text and "nothing was started" in caplog.text


@pytest.fixture
def disc_root(tmp_path: Path) -> Path:
    """Eight synthetic photographs with their disc masks in the images/ + masks/ layout."""
    from datamodules.synthetic import render_fundus

    root = tmp_path / "disc"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(12):
        fundus = render_fundus(index % 5, size=160, seed=index)
        cv2.imwrite(str(root / "images" / f"disc_{index:02d}.png"), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "masks" / f"disc_{index:02d}.png"), fundus.disc_mask)
    return root
