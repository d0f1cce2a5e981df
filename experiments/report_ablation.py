"""``make report``'s ablation table (experiment=dr_ablation): which part of the student helps on this data.

The sweep trains the distilled student (arm ``full``) and the same student without KD, without CBAM and without
the topological branch, one parent run each in the MLflow experiment ``dr-ablation``, on the same data and split.
Each arm is paired image by image with ``full`` on the test split (``predictions/test_predictions.csv``), and the
QWK, accuracy and macro-F1 differences get a paired-bootstrap interval, as the distillation gain does
(``experiments.report_data.paired_bootstrap_gain``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from experiments.report_data import (
    GAIN_METRICS,
    PREDICTIONS_ARTIFACT,
    BootstrapSettings,
    grading_scores,
    latest_parent_runs,
    newest_sweep,
    pair_predictions,
    paired_bootstrap_gain,
    prediction_num_classes,
    run_link,
)
from experiments.tracking import child_runs, read_csv_artifact

ABLATION = "ablation"
#: the reference arm every other arm is compared with
FULL = "full"
#: the arms of experiment=dr_ablation, in the table's order
ARMS = (FULL, "no_kd", "no_cbam", "no_topology")
ABLATION_COMMAND = 'make dr-distill ARGS="experiment=dr_ablation distill.teacher_checkpoint=<dr-distill run folder>"'
_NO_VALUE = {"", "None", "null"}


@dataclass
class AblationStudy:
    """The ablation table, or why there is none."""

    table: pd.DataFrame | None = None  # arm, run, qwk, acc, f1_macro, d_qwk, ci_low, ci_high, d_acc, d_f1_macro
    images: int = 0
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # arms that could not be scored, and why


def ablation_arm(parent: Run) -> str | None:
    """The arm a dr-distill parent run trained (its ``ablation`` param), None for a run outside any ablation."""
    value = parent.data.params.get(ABLATION)
    return None if value is None or value in _NO_VALUE else value


def latest_ablation_sweep(client: MlflowClient, experiment_name: str) -> list[Run]:
    """Each arm's newest FINISHED parent run of the newest sweep (the newest ablation run defines it,
    ``report_data.newest_sweep``), in the order of :data:`ARMS` (other arm names after them). Empty when the
    experiment has no ablation run."""
    parents = [run for run in latest_parent_runs(client, experiment_name) if ablation_arm(run) is not None]
    order = {arm: index for index, arm in enumerate(ARMS)}
    return sorted(newest_sweep(parents, ABLATION, ablation_arm),
                  key=lambda run: (order.get(ablation_arm(run), len(ARMS)), ablation_arm(run)))


def _student_predictions(client: MlflowClient, parent: Run, workdir: Path) -> tuple[Run | None, pd.DataFrame | None]:
    student = next((run for run in child_runs(client, parent) if run.info.run_name == "student"), None)
    if student is None:
        return None, None
    return student, read_csv_artifact(client, student, PREDICTIONS_ARTIFACT, workdir)


def ablation_study(client: MlflowClient, parents: list[Run], settings: BootstrapSettings, workdir: Path,
                   ui_url: str) -> AblationStudy:
    """One row per arm: its test metrics and, for every arm but ``full``, the difference arm - full with its
    paired-bootstrap interval over the shared test images."""
    study = AblationStudy(runs=list(parents))
    predictions: dict[str, tuple[Run, pd.DataFrame]] = {}
    for parent in parents:
        arm = ablation_arm(parent)
        student, frame = _student_predictions(client, parent, workdir)
        if frame is None:
            study.problems.append(f"arm {arm} (run {parent.info.run_id}) has no student run with "
                                  f"{PREDICTIONS_ARTIFACT}: rerun it with `{ABLATION_COMMAND}`")
            continue
        predictions[arm] = (student, frame)
    if FULL not in predictions:
        study.problems.append(f"no finished `{FULL}` arm to compare with: run `{ABLATION_COMMAND}`")
        return study
    _, full = predictions[FULL]
    rows = []
    for arm, (student, frame) in predictions.items():
        row: dict[str, object] = {"arm": arm, "run": run_link(ui_url, student, arm)}
        try:
            paired = pair_predictions(frame, full)
        except ValueError as error:
            study.problems.append(f"arm {arm} cannot be paired with {FULL}: {error}")
            continue
        num_classes = prediction_num_classes(frame, full)
        if arm == FULL:  # the reference: its scores, no difference to bootstrap
            row |= dict(zip(GAIN_METRICS, grading_scores(paired["label"].to_numpy(),
                                                         paired["with_teacher"].to_numpy(), num_classes)))
        else:
            gains = paired_bootstrap_gain(paired, num_classes, settings)
            for key, (_, gain) in zip(GAIN_METRICS, gains.iterrows()):
                row[key], row[f"d_{key}"] = gain["with_teacher"], gain["gain"]
            row["ci_low"], row["ci_high"] = gains.iloc[0]["ci_low"], gains.iloc[0]["ci_high"]
        study.images = len(paired)
        rows.append(row)
    study.table = pd.DataFrame(rows)
    return study

