"""The explanation callbacks on real Trainers (test stage only) with the project's datamodules on tiny generated
sets, logging to a temporary MLflow store."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from lightning import Trainer
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Subset

from callbacks.classification_diagnostics import ClassificationDiagnostics
from callbacks.grading_explanations import GradingExplanations, first_indices_per_grade
from callbacks.segmentation_overlays import SegmentationOverlays, worst_and_best
from compression.benchmark import mask_pair_dice
from datamodules.dr import DRDataModule
from datamodules.optic_disc import DiscDataModule
from datamodules.synthetic import render_fundus
from lightning_modules.classifier import StudentDistiller, TeacherClassifier
from lightning_modules.explain import expected_calibration_error
from lightning_modules.segmenter import DiscSegmenter

GRADES = [0, 1, 2, 3, 4] * 6  # 30 images: every split holds every grade


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite MLflow store for the module (creating its schema is the slow part)."""
    return tmp_path_factory.mktemp("mlflow")


def mlflow_logger(store: Path, run_name: str) -> MLFlowLogger:
    return MLFlowLogger(experiment_name="explain", run_name=run_name, tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
                        artifact_location=str(store / "artifacts"))


def make_trainer(store: Path, run_name: str, callbacks: list) -> tuple[Trainer, MLFlowLogger]:
    logger = mlflow_logger(store, run_name)
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    return trainer, logger


def artifacts(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, folder))


# ---------------------------------------------------------------------------------------------- DR
@pytest.fixture(scope="module")
def dr_data(tmp_path_factory) -> DRDataModule:
    root = tmp_path_factory.mktemp("aptos")
    rows = []
    for index, grade in enumerate(GRADES):
        write_rgb(root / "train_images" / f"eye{index:03d}.png", render_fundus(grade, size=64, seed=index).image)
        rows.append((f"eye{index:03d}", grade))
    pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(root / "train.csv", index=False)
    dm = DRDataModule(format="aptos", root=str(root), image_size=64, batch_size=4, seed=0,
                      cache_dir=str(root / "cache"), topo_resolution=16, topo_image_resolution=8)
    dm.setup()
    return dm


def tiny_student(topo_features: int) -> StudentDistiller:
    torch.manual_seed(0)
    return StudentDistiller(backbone="test_efficientnet", pretrained="none", topo_features=topo_features,
                            teacher_checkpoint=None, channels_last=False)


def test_dr_test_stage_logs_ece_predictions_plots_and_explanations(store: Path, dr_data: DRDataModule,
                                                                   tmp_path: Path):
    torch.manual_seed(0)
    stage = "teacher"
    module = TeacherClassifier(backbone="test_efficientnet", pretrained="none", channels_last=False)
    diagnostics = ClassificationDiagnostics(n_bins=5, weights_dir=str(tmp_path / stage))
    trainer, logger = make_trainer(store, stage, [diagnostics, GradingExplanations(images_per_grade=1)])
    results = trainer.test(module, datamodule=dr_data, verbose=False)[0]

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.get_run(logger.run_id)
    assert artifacts(client, logger.run_id, "plots") == ["plots/pr_curves.png", "plots/reliability.png"]
    assert artifacts(client, logger.run_id, "predictions") == ["predictions/test_predictions.csv"]
    test = dr_data.datasets["test"]
    expected_figures = [f"explain/grade{grade}_{Path(test.paths[list(test.labels).index(grade)]).stem}.png"
                        for grade in range(5)]
    assert artifacts(client, logger.run_id, "explain") == sorted(expected_figures)

    local = Path(client.download_artifacts(logger.run_id, "predictions/test_predictions.csv", str(tmp_path)))
    table = pd.read_csv(local)
    assert list(table.columns) == ["image", "label", "prediction"] + [f"prob_{k}" for k in range(5)]
    assert table["image"].tolist() == [Path(p).name for p in test.paths]
    assert table["label"].tolist() == test.labels.tolist()
    probabilities = table.filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (table["prediction"].to_numpy() == probabilities.argmax(axis=1)).all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / stage / "test_predictions.csv"), table)

    ece = expected_calibration_error(probabilities, table["label"].to_numpy(), n_bins=5)
    assert run.data.metrics["test/ece"] == pytest.approx(ece, abs=1e-5)
    assert results["test/ece"] == pytest.approx(ece, abs=1e-5) and diagnostics.report["test/ece"] == results["test/ece"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["shuffled-sampler", "subset"])
def test_predictions_name_each_image_by_its_batch_index_in_any_loader_order(dr_data: DRDataModule, wrapped: bool,
                                                                              tmp_path: Path):
    test = dr_data.datasets["test"]
    order = np.random.default_rng(3).permutation(len(test))[:7].tolist()  # batches of 3, 3 and 1
    assert order != sorted(order)
    # a loader that serves the test images out of their order: through a sampler, or as a Subset of them
    loader = (DataLoader(Subset(test, order), batch_size=3) if wrapped
              else DataLoader(test, batch_size=3, sampler=order))
    diagnostics = ClassificationDiagnostics(n_bins=5, weights_dir=str(tmp_path))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[diagnostics], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    torch.manual_seed(0)
    module = TeacherClassifier(backbone="test_efficientnet", pretrained="none", channels_last=False)
    trainer.test(module, dataloaders=loader, verbose=False)

    table = pd.read_csv(tmp_path / "test_predictions.csv")
    assert table["image"].tolist() == [Path(test.paths[i]).name for i in order]
    assert table["label"].tolist() == [int(test.labels[i]) for i in order]


def figure_shape(client: MlflowClient, run_id: str, name: str, folder: Path) -> tuple[int, ...]:
    image = cv2.imread(client.download_artifacts(run_id, name, str(folder)))
    assert image is not None
    return image.shape


def test_student_figures_hold_attention_and_topology_unless_the_branch_is_off(store: Path, dr_data: DRDataModule,
                                                                              tmp_path: Path):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    shapes = {}
    for topo_features in (dr_data.topology_dim, 0):
        explanations = GradingExplanations(images_per_grade=1)
        trainer, logger = make_trainer(store, f"student-topo{topo_features}", [explanations])
        trainer.test(tiny_student(topo_features), datamodule=dr_data, verbose=False)
        assert [name[:len("explain/gradeN")] for name in explanations.written] == [
            f"explain/grade{g}" for g in range(5)]
        shapes[topo_features] = figure_shape(client, logger.run_id, explanations.written[0],
                                             tmp_path / str(topo_features))
    # with topology: a second row (diagram, H0 and H1 persistence images); without: the image row alone
    assert shapes[dr_data.topology_dim][0] > 1.5 * shapes[0][0]


def test_grades_absent_from_the_test_split_are_skipped_and_named():
    labels = np.array([0, 2, 0, 4, 2, 0, 4])
    assert first_indices_per_grade(labels, 5, 2) == {0: [0, 2], 2: [1, 4], 4: [3, 6]}
    assert first_indices_per_grade(labels, 5, 1) == {0: [0], 2: [1], 4: [3]}


def test_only_the_chosen_grades_are_explained_and_missing_ones_are_named(store: Path, dr_data: DRDataModule,
                                                                        caplog):
    explanations = GradingExplanations(images_per_grade=1, grades=[3, 9])
    trainer, _ = make_trainer(store, "grades", [explanations])
    module = TeacherClassifier(backbone="test_efficientnet", pretrained="none", channels_last=False)
    with caplog.at_level(logging.INFO, logger="callbacks.grading_explanations"):
        trainer.test(module, datamodule=dr_data, verbose=False)
    assert len(explanations.written) == 1 and explanations.written[0].startswith("explain/grade3_")
    assert "grades [9] are absent from the test split" in caplog.text


def test_grading_explanations_skip_a_network_they_cannot_explain(store: Path, dr_data: DRDataModule, caplog):
    module = TeacherClassifier(backbone="test_efficientnet", pretrained="none", channels_last=False)
    module.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 5))  # no known feature layer
    explanations = GradingExplanations(images_per_grade=1)
    trainer, _ = make_trainer(store, "unknown-net", [explanations])
    with caplog.at_level(logging.WARNING, logger="callbacks.grading_explanations"):
        trainer.test(module, datamodule=dr_data, verbose=False)
    assert explanations.written == [] and "no known feature layer" in caplog.text


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="n_bins"):
        ClassificationDiagnostics(n_bins=0)
    with pytest.raises(ValueError, match="images_per_grade"):
        GradingExplanations(images_per_grade=-1)
    with pytest.raises(ValueError, match="grade numbers"):
        GradingExplanations(grades=[2, "4"])
    with pytest.raises(ValueError, match="num_images"):
        SegmentationOverlays(num_images=1.5)


# ----------------------------------------------------------------------------------------- glaucoma
def test_worst_and_best_never_repeat_an_image():
    dice = np.array([0.9, 0.2, 0.5, 0.9, 0.1])
    assert worst_and_best(dice, 2) == ([4, 1], [0, 3])
    assert worst_and_best(dice[:3], 2) == ([1, 2], [0])


@pytest.fixture(scope="module")
def disc_data(tmp_path_factory) -> DiscDataModule:
    root = tmp_path_factory.mktemp("disc")
    stems = []
    for index in range(14):
        fundus = render_fundus(index % 5, size=64, seed=index)
        write_rgb(root / "images" / f"pair_{index:03d}.png", fundus.image)
        (root / "masks").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "masks" / f"pair_{index:03d}.png"), fundus.disc_mask)
        stems.append(f"pair_{index:03d}")
    # hard cases: the test split's loader is followed by a second, hard-case test loader
    dm = DiscDataModule(format="disc_folder", root=str(root), image_size=32, batch_size=2, num_folds=3, seed=0,
                        test_fraction=0.3, cache_dir=str(root / "cache"), hard_cases=stems[:4])
    dm.setup()
    return dm


def test_segmentation_stage_logs_its_per_image_table_and_extreme_overlays(store: Path, disc_data: DiscDataModule,
                                                                          tmp_path: Path):
    assert isinstance(disc_data.test_dataloader(), list)
    torch.manual_seed(0)
    module = DiscSegmenter(base=4, channels_last=False)
    overlays = SegmentationOverlays(num_images=2, weights_dir=str(tmp_path / "base64"))
    trainer, logger = make_trainer(store, "segmenter", [overlays])
    trainer.test(module, datamodule=disc_data, verbose=False)

    test = disc_data.datasets["test"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    local = Path(client.download_artifacts(logger.run_id, "predictions/test_per_image.csv", str(tmp_path)))
    table = pd.read_csv(local)
    # the test split only (not the hard-case loader), in the test dataset's order, with every per-image metric
    assert table["image"].tolist() == [Path(p).name for p in test.paths]
    assert list(table.columns) == ["image", *module.test_per_image[0].keys()]
    np.testing.assert_allclose(table["dice"], [row["dice"] for row in module.test_per_image])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "base64" / "test_per_image.csv"), table)

    order = np.argsort(table["dice"].to_numpy(), kind="stable")
    stem = [Path(p).stem for p in test.paths]
    expected = [f"overlays/worst_{k}_{stem[order[k - 1]]}.png" for k in (1, 2)]
    best = [i for i in np.argsort(-table["dice"].to_numpy(), kind="stable") if i not in order[:2]][:2]
    expected += [f"overlays/best_{k}_{stem[i]}.png" for k, i in enumerate(best, start=1)]
    assert overlays.written == expected
    assert artifacts(client, logger.run_id, "overlays") == sorted(expected)

    # the overlays show the mask that was scored: at the photograph's own size, with the row's Dice
    worst = int(order[0])
    photograph, true_mask = test.photograph(worst)
    drawn = module.predict_on_source(test[worst]["image"], photograph, test.cache.preprocessing.crop_of(photograph))
    assert drawn.shape == true_mask.shape == photograph.shape[:2] != (32, 32)
    assert mask_pair_dice([(drawn, true_mask)])["dice_per_image"] == pytest.approx(table["dice"][worst], abs=1e-6)


def test_without_mlflow_only_the_stage_files_and_ece_are_produced(dr_data: DRDataModule, tmp_path: Path):
    diagnostics = ClassificationDiagnostics(weights_dir=str(tmp_path / "teacher"))
    explanations = GradingExplanations(images_per_grade=1)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[diagnostics, explanations],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = TeacherClassifier(backbone="test_efficientnet", pretrained="none", channels_last=False)
    trainer.test(module, datamodule=dr_data, verbose=False)
    table = pd.read_csv(tmp_path / "teacher" / "test_predictions.csv")
    assert len(table) == len(dr_data.datasets["test"]) and explanations.written == []
    expected = expected_calibration_error(table.filter(like="prob_").to_numpy(), table["label"].to_numpy())
    assert diagnostics.report["test/ece"] == pytest.approx(expected, abs=1e-5)
