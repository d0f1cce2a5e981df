"""``make report``'s cross-validation section: a ``-m data.fold=0,1,2,3,4`` glaucoma-iterations sweep as one result.

Every fold trains the whole chain on its own training folds and is scored on the same fixed test split
(``datamodules.splits.kfold_with_test_split``), so the spread over folds is how much a stage's test scores depend
on which images it was trained and selected on. Per stage: the mean and sample standard deviation over the folds
of test Dice, IoU, HD95, false detections and edge-case detection, and the liminal point computed on the fold
means (``experiments.chain_summary.liminal_points``, the chain's own rule and tolerance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from experiments.chain_summary import ARMS, BASE_ARM, DEFAULT_LIMINAL_TOLERANCE, FINISHERS, liminal_points
from experiments.report_data import is_group_choice, latest_parent_runs, newest_sweep, override_items
from experiments.tracking import child_runs

#: the override a k-fold sweep varies
FOLD_KEY = "data.fold"
#: the per-stage scores summarised over folds: (column, the stage run's metric)
FOLD_METRICS = (("dice", "test/dice"), ("iou", "test/iou"), ("hd95", "test/hd95"),
                ("false_detections", "test/false_detections"),
                ("edge_case_detection", "test/edge_case_detection"))


@dataclass
class FoldSummary:
    """The sweep's parent runs (fold order), per-stage mean and sd over folds, and the liminal points of the means."""

    runs: list[Run]
    folds: list[int]
    tolerance: float
    table: pd.DataFrame
    liminal: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def fold_of(run: Run) -> int | None:
    """The fold a parent run trained on (its ``data.fold`` param), None when it logged none."""
    value = run.data.params.get(FOLD_KEY)
    return int(value) if value is not None and str(value).lstrip("-").isdigit() else None


def is_fold_run(run: Run) -> bool:
    """Whether the run's command chose a fold (``data.fold=<k>``): a job of a k-fold sweep, or a rerun of one."""
    return any(is_group_choice(item, FOLD_KEY) for item in override_items(run.data.tags.get("overrides", "")))


def latest_fold_sweep(client: MlflowClient, experiment_name: str) -> list[Run]:
    """Each fold's newest FINISHED parent run of the newest k-fold sweep (its newest fold run defines the sweep:
    the same data and, the fold aside, the same overrides), in fold order; empty when fewer than two folds ran."""
    parents = [run for run in latest_parent_runs(client, experiment_name) if is_fold_run(run)]
    runs = sorted((run for run in newest_sweep(parents, FOLD_KEY, fold_of) if fold_of(run) is not None),
                  key=fold_of)
    return runs if len(runs) >= 2 else []


def stage_rows(parent: Run, children: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per finished chain stage of one fold's run: its fold, stage, arm, base, scores, latency and size."""
    rows = []
    for child in children:
        arm = child.data.tags.get("arm")
        if arm is None or child.info.status != "FINISHED":
            continue  # the bench child run, a failed stage
        base = child.data.tags.get("base", "")
        metrics = child.data.metrics
        rows.append({"fold": fold_of(parent), "stage": child.info.run_name, "arm": arm,
                     "base": int(base) if base.isdigit() else math.nan,
                     **{column: float(metrics.get(key, math.nan)) for column, key in FOLD_METRICS},
                     "latency_ms": float(metrics.get("model/latency_ms_median", math.nan)),
                     "size_bytes": float(metrics.get("model/size_bytes", math.nan))})
    return rows


def summarise_folds(rows: pd.DataFrame, folds: Sequence[int], tolerance: float) -> FoldSummary:
    """Mean and sample sd (n - 1; NaN for one fold) per stage over ``rows`` (:func:`stage_rows` of every fold),
    and the liminal points of the stage means. A stage missing from some fold is listed in ``problems`` and is no
    liminal candidate (its mean is over fewer folds)."""
    summary = FoldSummary(runs=[], folds=list(folds), tolerance=tolerance, table=pd.DataFrame())
    if rows.empty:
        summary.problems.append("no fold run has a finished chain stage")
        return summary
    grouped = rows.groupby(["stage", "arm", "base"], dropna=False, sort=False)
    table = grouped.size().rename("folds").reset_index()
    for column, _ in FOLD_METRICS:
        table[f"{column}_mean"] = grouped[column].mean().to_numpy()
        table[f"{column}_sd"] = grouped[column].std(ddof=1).to_numpy()
    for column in ("latency_ms", "size_bytes"):
        table[column] = grouped[column].median().to_numpy()
    incomplete = table[table["folds"] < len(folds)]
    for row in incomplete.itertuples():
        summary.problems.append(f"stage {row.stage} finished in {row.folds} of {len(folds)} folds: its mean is "
                                "over those only, and it is no liminal candidate")
    table = table.sort_values(["arm", "base"], ascending=[True, False], key=_arm_order).reset_index(drop=True)
    complete = table[table["folds"] == len(folds)]
    candidates = complete.rename(columns={"dice_mean": "dice", "edge_case_detection_mean": "edge_case_detection"})
    summary.liminal = liminal_points(candidates, tolerance)
    summary.table = table
    return summary


def _arm_order(column: pd.Series) -> pd.Series:
    if column.name != "arm":
        return column
    # the first network first, then the arms and finishers in the chain's order, comparisons last
    order = {arm: position for position, arm in enumerate((BASE_ARM, *ARMS, *FINISHERS))}
    return column.map(lambda arm: order.get(arm, len(order)))


def fold_summary(client: MlflowClient, parents: Sequence[Run]) -> FoldSummary:
    """:func:`summarise_folds` of the stage runs under ``parents`` (one parent run per fold)."""
    rows = [row for parent in parents for row in stage_rows(parent, child_runs(client, parent))]
    tolerances = {parent.data.params.get("chain.liminal_tolerance") for parent in parents}
    tolerance = float(next(iter(tolerances))) if len(tolerances) == 1 and None not in tolerances else \
        DEFAULT_LIMINAL_TOLERANCE
    summary = summarise_folds(pd.DataFrame(rows), [fold_of(parent) for parent in parents], tolerance)
    summary.runs = list(parents)
    if len(tolerances) > 1:
        summary.problems.append(f"the folds ran with different chain.liminal_tolerance {sorted(map(str, tolerances))}: "
                                f"the liminal point uses {tolerance}")
    return summary
