"""make report's k-fold section: a data.fold sweep of glaucoma-iterations summarised as mean ± sd per stage."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments.report_folds import fold_summary, latest_fold_sweep, summarise_folds
from experiments.report_render import _folds_section
from experiments.tracking import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

# stage -> (arm, base, Dice per fold 0, 1, 2)
CHAIN = {"base-64": ("base", 64, [0.92, 0.90, 0.94]), "prune-32": ("prune", 32, [0.91, 0.89, 0.93]),
         "prune-16": ("prune", 16, [0.90, 0.86, 0.91]), "prune-8": ("prune", 8, [0.80, 0.70, 0.85])}


def fold_rows(folds=(0, 1, 2), drop: tuple[str, int] | None = None) -> pd.DataFrame:
    rows = []
    for fold in folds:
        for stage, (arm, base, dice) in CHAIN.items():
            if drop == (stage, fold):
                continue
            rows.append({"fold": fold, "stage": stage, "arm": arm, "base": base, "dice": dice[fold],
                         "iou": dice[fold] - 0.1, "hd95": 10.0 + fold, "false_detections": float(fold),
                         "edge_case_detection": 1.0, "latency_ms": 100.0 / (1 + fold), "size_bytes": base * 1e4})
    return pd.DataFrame(rows)


def test_each_stage_gets_the_mean_and_sample_sd_over_folds_and_the_liminal_point_of_the_means():
    summary = summarise_folds(fold_rows(), [0, 1, 2], tolerance=0.05)
    table = summary.table.set_index("stage")
    assert list(summary.table["stage"]) == ["base-64", "prune-32", "prune-16", "prune-8"]
    for stage, (_, _, dice) in CHAIN.items():
        assert table.loc[stage, "folds"] == 3
        assert table.loc[stage, "dice_mean"] == pytest.approx(np.mean(dice))
        assert table.loc[stage, "dice_sd"] == pytest.approx(np.std(dice, ddof=1))
    assert table.loc["base-64", "hd95_mean"] == pytest.approx(11.0) and table.loc["base-64", "latency_ms"] == 50.0
    # 95% of base-64's mean 0.92 is 0.874: prune-16's mean 0.890 qualifies, prune-8's 0.783 does not
    assert summary.liminal["prune"]["stage"] == "prune-16" and summary.liminal["any"]["stage"] == "prune-16"
    assert not summary.problems


def test_a_stage_missing_from_a_fold_is_listed_and_is_no_liminal_candidate():
    summary = summarise_folds(fold_rows(drop=("prune-16", 2)), [0, 1, 2], tolerance=0.05)
    table = summary.table.set_index("stage")
    assert table.loc["prune-16", "folds"] == 2
    assert table.loc["prune-16", "dice_mean"] == pytest.approx(0.88)
    assert summary.problems == ["stage prune-16 finished in 2 of 3 folds: its mean is over those only, and it is "
                                "no liminal candidate"]
    assert summary.liminal["prune"]["stage"] == "prune-32"


def log_chain(client: MlflowClient, experiment_id: str, overrides: str, fold: int, dice_shift: float = 0.0) -> str:
    parent = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: f"glaucoma-iterations[{overrides}]",
                                                    "overrides": overrides, "data_fingerprint": "abc"})
    client.log_param(parent.info.run_id, "data.fold", str(fold))
    client.log_param(parent.info.run_id, "chain.liminal_tolerance", "0.05")
    for stage, (arm, base, dice) in CHAIN.items():
        child = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: stage, MLFLOW_PARENT_RUN_ID:
                                                       parent.info.run_id, "arm": arm, "base": str(base)})
        client.log_metric(child.info.run_id, "test/dice", dice[fold] + dice_shift)
        client.log_metric(child.info.run_id, "test/edge_case_detection", 1.0)
        client.set_terminated(child.info.run_id, "FINISHED")
    bench = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: "bench", MLFLOW_PARENT_RUN_ID: parent.info.run_id})
    client.set_terminated(bench.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    time.sleep(0.01)  # distinct start times: "newest" is by start time
    return parent.info.run_id


def test_the_newest_fold_sweep_is_found_and_summarised(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("glaucoma-iterations", artifact_location=str(tmp_path / "artifacts"))
    log_chain(client, experiment_id, "data=disc_folder data.fold=0 chain.epochs=2", 0, dice_shift=-0.5)  # another sweep
    first = log_chain(client, experiment_id, "data=disc_folder data.fold=0", 0, dice_shift=-0.3)  # replaced by a rerun
    sweep = [log_chain(client, experiment_id, f"data=disc_folder data.fold={fold}", fold) for fold in (1, 2)]
    rerun = log_chain(client, experiment_id, "data.fold=0 data=disc_folder", 0)  # same sweep, overrides reordered
    log_chain(client, experiment_id, "data=disc_folder", 0, dice_shift=-0.2)  # no fold chosen: not a fold run
    runs = latest_fold_sweep(client, "glaucoma-iterations")
    assert [run.info.run_id for run in runs] == [rerun, *sweep] and first not in {r.info.run_id for r in runs}
    summary = fold_summary(client, runs)
    assert summary.folds == [0, 1, 2] and summary.tolerance == 0.05
    table = summary.table.set_index("stage")
    assert table.loc["prune-8", "dice_mean"] == pytest.approx(np.mean(CHAIN["prune-8"][2]))
    assert math.isnan(table.loc["prune-8", "hd95_mean"])  # not logged: NaN, not 0
    section = _folds_section(summary, ReportStub())
    assert "test Dice" in section.table.columns and len(section.table) == 4
    assert section.table["test Dice"].iloc[0] == f"{np.mean(CHAIN['base-64'][2]):.4g} ± {np.std(CHAIN['base-64'][2], ddof=1):.2g}"
    assert any("liminal point of the fold means (any): prune-16" in bullet for bullet in section.bullets)


class ReportStub:
    """What the section reads of the report's data: where the run links point."""

    ui_url = "http://127.0.0.1:5000"


def test_one_fold_is_no_sweep(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("glaucoma-iterations", artifact_location=str(tmp_path / "artifacts"))
    log_chain(client, experiment_id, "data.fold=0", 0)
    assert latest_fold_sweep(client, "glaucoma-iterations") == []
