"""What ``make report`` shows, read from the MLflow store: the selected runs, their stage tables, the chain's
liminal point, the bench's per-precision rows, the architecture baselines (experiment=dr_baselines) and the
distillation gain with a paired bootstrap interval.

Functions over an ``MlflowClient`` and pandas frames; ``experiments/report_render.py`` turns a
:class:`ReportData` into HTML and Markdown, and ``experiments/report.py`` is the Hydra entry point.

Where the runs already logged a result it is read, not recomputed: the chain's ``summary/summary.csv`` (its
cumulative train times) and liminal point (``experiments.chain_summary.liminal_points`` over that same table
at the run's own ``chain.liminal_tolerance``, checked against the parent's ``liminal/<arm>_base`` metrics),
the bench's ``bench/bench.csv`` and ``bench/pareto.png``, the baselines' parent-run metrics ``baseline/*``.
Only the distillation gain is new: it needs both students' per-image test predictions
(``predictions/test_predictions.csv``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from experiments.chain_summary import BASE_ARM, DEFAULT_LIMINAL_TOLERANCE, liminal_points
from experiments.stages import DR_STAGES, EXTERNAL_PREFIX
from experiments.tracking import child_runs, download_artifact, is_parent, read_csv_artifact

log = logging.getLogger(__name__)

DR, GLAUCOMA = "dr", "glaucoma"
PREDICTIONS_ARTIFACT = "predictions/test_predictions.csv"
SPLITS_ARTIFACT = "run/splits.csv"
SUMMARY_ARTIFACT = "summary/summary.csv"
BENCH_CSV, BENCH_PARETO = "bench/bench.csv", "bench/pareto.png"
BASELINES = "baselines"
#: the experiment names of the entry points (their ``task_name``); ``baselines``: experiment=dr_baselines
DEFAULT_EXPERIMENTS = {DR: "dr-distill", GLAUCOMA: "glaucoma-iterations", "bench": "bench",
                       BASELINES: "dr-baselines", "ablation": "dr-ablation"}
#: the make target of each pipeline, for the messages that say what to run
MAKE_TARGETS = {DR: "make dr-distill", GLAUCOMA: "make glaucoma-iterations"}
#: the default experiment of dr-distill, whose no-teacher twin is experiment=dr_student_only
CPU_EXPERIMENT = "dr_distill_cpu"
GAIN_METRICS = {"qwk": "test QWK", "acc": "test accuracy", "f1_macro": "test macro F1"}
#: bench backends -> the precision they run at
BENCH_PRECISION = {"eager": "fp32", "channels_last": "fp32 (channels-last)", "bf16": "bf16",
                   "ort_fp32": "fp32 (ONNX Runtime)", "ort_int8": "int8 (ONNX Runtime)",
                   "ov_fp32": "fp32 (OpenVINO)", "ov_bf16": "bf16 (OpenVINO)", "ov_int8": "int8 (OpenVINO, NNCF)",
                   "weight_shared": "weight-shared"}


class NoRunsError(LookupError):
    """Nothing in the store to report on; the message says which run to make first."""


@dataclass(frozen=True)
class Link:
    """A table cell or line that links to the MLflow UI."""

    text: str
    url: str


@dataclass
class SelectedRun:
    """A parent run of one pipeline with its stage child runs (oldest first)."""

    kind: str  # DR or GLAUCOMA
    parent: Run
    children: list[Run]
    experiment_name: str

    @property
    def name(self) -> str:
        return self.parent.info.run_name

    def child(self, stage: str) -> Run | None:
        return next((run for run in self.children if run.info.run_name == stage), None)


@dataclass(frozen=True)
class BootstrapSettings:
    """The paired bootstrap of the distillation gain (scipy.stats.bootstrap)."""

    n_resamples: int = 2000
    confidence_level: float = 0.95
    seed: int = 0
    method: str = "percentile"

    def __post_init__(self) -> None:
        if self.n_resamples < 1 or not 0 < self.confidence_level < 1:
            raise ValueError(f"report.bootstrap: n_resamples={self.n_resamples} must be >= 1 and "
                             f"confidence_level={self.confidence_level} in (0, 1)")
        if self.method not in ("percentile", "basic", "BCa"):
            raise ValueError(f"report.bootstrap.method={self.method!r}: choose percentile, basic or BCa")


@dataclass
class LiminalResult:
    """The liminal point of one chain run: one row per arm (and ``any``), or why there is none."""

    parent: Run
    tolerance: float
    points: pd.DataFrame
    problem: str | None = None
    mismatch: str | None = None


@dataclass
class BenchResult:
    """The per-precision rows of a ``make bench`` run and its Pareto figure."""

    run: Run
    table: pd.DataFrame
    pareto_png: bytes | None
    note: str


@dataclass
class DistillationGain:
    """The distilled student of one dr-distill run against a student trained without a teacher."""

    distilled: SelectedRun
    counterpart: SelectedRun | None = None
    table: pd.DataFrame | None = None  # metric, with_teacher, without_teacher, gain, ci_low, ci_high
    images: int = 0
    problem: str | None = None  # why there is no number, and what to run
    rejected: list[str] = field(default_factory=list)  # no-teacher runs that do not qualify, and why


@dataclass
class BaselineSweep:
    """The architecture baselines the report shows (experiment=dr_baselines): one parent run per backbone."""

    table: pd.DataFrame  # BASELINE_TABLE_COLUMNS, one row per parent run, best test QWK first
    runs: list[Run]  # the parent runs, in the table's order
    commands: list[str]  # the make command of each sweep the runs come from (one, unless named by id)
    majority_accuracy: list[float]  # the majority-class test accuracy of each distinct test split: the floor
    students: pd.DataFrame  # the distilled students of the selected dr-distill runs, for scale (same columns)
    explicit: bool  # named by report.baselines, not the latest sweep


@dataclass
class ReportData:
    """Everything the report shows."""

    tracking_uri: str
    selected: list[SelectedRun]
    notes: list[str]
    dr_table: pd.DataFrame
    glaucoma_table: pd.DataFrame
    liminal: list[LiminalResult]
    bench: BenchResult | None
    gains: list[DistillationGain]
    ui_url: str
    bootstrap: BootstrapSettings
    baselines: BaselineSweep | None = None
    #: experiment=dr_ablation's table (experiments.report_ablation.AblationStudy), set by the report's entry point
    ablation: Any = None
    #: the k-fold sweep's summary (experiments.report_folds.FoldSummary), set by the report's entry point
    folds: Any = None


# ----------------------------------------------------------------------------------------------- the store
def run_url(ui_url: str, run: Run) -> str:
    """The run's page in the MLflow UI (``make mlflow-ui``)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def run_link(ui_url: str, run: Run, text: str | None = None) -> Link:
    return Link(text or run.info.run_id, run_url(ui_url, run))


def latest_parent_runs(client: MlflowClient, experiment_name: str) -> list[Run]:
    """FINISHED parent runs of the experiment, newest first (empty when the experiment does not exist)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    parents, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=500, page_token=token)
        parents += [run for run in page if is_parent(run)]
        token = page.token
        if not token:
            return parents


def pipeline_kind(children: Sequence[Run]) -> str | None:
    """DR (teacher/student child runs), GLAUCOMA (children tagged with an ``arm``) or None."""
    if any("arm" in child.data.tags for child in children):
        return GLAUCOMA
    if any(child.info.run_name in DR_STAGES for child in children):
        return DR
    return None


def student_distills(params: Mapping[str, str]) -> bool:
    """Whether a student run learned from a teacher, from its logged hyperparameters: the mirror of
    ``StudentDistiller.distills`` (a teacher checkpoint and a distillation weight above 0)."""
    teacher = str(params.get("teacher_checkpoint", "None")).strip()
    alphas = [float(params.get(key, 0.0)) for key in ("alpha_start", "alpha_end")]
    return teacher not in {"", "None", "null"} and any(alpha > 0 for alpha in alphas)


def _selected(client: MlflowClient, parent: Run, origin: str) -> SelectedRun:
    children = child_runs(client, parent)
    kind = pipeline_kind(children)
    experiment_name = client.get_experiment(parent.info.experiment_id).name
    if kind is None:
        raise NoRunsError(
            f"{origin}: run {parent.info.run_id} ({parent.info.run_name!r}, experiment {experiment_name!r}) "
            "has neither teacher/student nor chain-stage child runs: pass the parent run of a dr-distill or "
            "glaucoma-iterations invocation (a bench run goes in report.bench)")
    return SelectedRun(kind, parent, children, experiment_name)


def _get_run(client: MlflowClient, run_id: str, option: str, tracking_uri: str) -> Run:
    try:
        return client.get_run(str(run_id))
    except MlflowException as error:
        raise NoRunsError(f"{option}: there is no run {run_id} in the MLflow store {tracking_uri} "
                          f"({str(error).splitlines()[0]}); copy a run id from the MLflow UI (make "
                          "mlflow-ui) or leave the option out for the latest runs") from error


def _parent_of(client: MlflowClient, run: Run, option: str, tracking_uri: str) -> Run:
    """``run`` itself, or its parent when a stage's child run was given."""
    if is_parent(run):
        return run
    parent = _get_run(client, run.data.tags[MLFLOW_PARENT_RUN_ID], option, tracking_uri)
    log.warning("%s: %s is the stage run %r of %s; reporting on that parent run", option, run.info.run_id,
                run.info.run_name, parent.info.run_id)
    return parent


def _latest_selected(client: MlflowClient, experiment_name: str, kind: str) -> SelectedRun | None:
    """The newest FINISHED parent run of the experiment with stage runs of ``kind``; for DR, the newest whose
    student learned from a teacher when there is one."""
    fallback = None
    for parent in latest_parent_runs(client, experiment_name):
        children = child_runs(client, parent)
        if pipeline_kind(children) != kind:
            continue
        run = SelectedRun(kind, parent, children, experiment_name)
        student = run.child("student")
        if kind != DR or (student is not None and student_distills(student.data.params)):
            return run
        fallback = fallback or run
    return fallback


def no_runs_message(tracking_uri: str, experiments: Mapping[str, str]) -> str:
    names = " or ".join(f"`{MAKE_TARGETS[k]}`" for k in (DR, GLAUCOMA))
    return (f"The MLflow store {tracking_uri} has no finished {experiments[DR]} or {experiments[GLAUCOMA]} run "
            f"to report on: run {names} first (or `make dr-distill ARGS=\"experiment=dr_baselines\"` for the "
            "architecture baselines, or select runs with report.runs=[<parent run id>,...]).")


def select_runs(client: MlflowClient, tracking_uri: str, run_ids: Sequence[str] = (),
                experiments: Mapping[str, str] | None = None,
                allow_none: bool = False) -> tuple[list[SelectedRun], list[str]]:
    """The parent runs to report on and notes on what is missing.

    ``run_ids``: parent runs (a stage's child run stands for its parent). Default: the latest FINISHED parent
    run of the dr-distill experiment whose student learned from a teacher (the latest parent at all when
    none did: a student-only run is the gain's counterpart, not what the report is about), and the latest of
    glaucoma-iterations. ``allow_none``: no such run is no error (the report may still show the baselines).

    Raises:
        NoRunsError: nothing to report on (and not ``allow_none``); the message names the make targets to run
            first.
    """
    experiments = {**DEFAULT_EXPERIMENTS, **(experiments or {})}
    if run_ids:
        selected, seen = [], set()
        for run_id in run_ids:
            parent = _parent_of(client, _get_run(client, run_id, "report.runs", tracking_uri), "report.runs",
                                tracking_uri)
            if parent.info.run_id not in seen:
                seen.add(parent.info.run_id)
                selected.append(_selected(client, parent, "report.runs"))
        return selected, []
    selected, notes = [], []
    for kind in (DR, GLAUCOMA):
        latest = _latest_selected(client, experiments[kind], kind)
        if latest is not None:
            selected.append(latest)
        else:
            notes.append(f"No finished {experiments[kind]} run in the store: run `{MAKE_TARGETS[kind]}` for "
                         "its section.")
    if not selected and not allow_none:
        raise NoRunsError(no_runs_message(tracking_uri, experiments))
    return selected, notes


# ------------------------------------------------------------------------------------------------ tables
def _metric(run: Run, key: str) -> float:
    return float(run.data.metrics.get(key, math.nan))


def dr_table(selected: Sequence[SelectedRun], ui_url: str) -> pd.DataFrame:
    """One row per teacher / student / student_qat child run of the selected dr-distill runs, and one per
    ``make evaluate`` run of theirs (``<stage> on <dataset>``: its scores, the stage's size and latency)."""
    rows = []
    for parent in (s for s in selected if s.kind == DR):
        by_stage = {child.info.run_name: child for child in parent.children}
        for child in parent.children:
            stage = child.info.run_name
            external = ""
            if stage in DR_STAGES:
                model, label, precision = child, stage, "int8" if stage == "student_qat" else "fp32"
            elif stage.startswith(EXTERNAL_PREFIX) and child.data.tags.get("stage") in by_stage:
                # make evaluate's score of a stage on another set: the stage's own size and latency beside it
                model = by_stage[child.data.tags["stage"]]
                external = stage.removeprefix(EXTERNAL_PREFIX)
                label = f"{child.data.tags['stage']} on {external}"
                precision = child.data.tags.get("precision", "")
            else:
                continue  # e.g. the bench child run of make bench
            rows.append({
                "parent_id": parent.parent.info.run_id, "run": run_link(ui_url, parent.parent, parent.name),
                "stage": label,
                "precision": precision,
                "qwk": _metric(child, "test/qwk"), "acc": _metric(child, "test/acc"),
                "f1_macro": _metric(child, "test/f1_macro"), "ece": _metric(child, "test/ece"),
                "params": _metric(model, "model/params"), "macs": _metric(model, "model/macs"),
                "size_bytes": _metric(model, "model/size_bytes"),
                "latency_ms": _metric(model, "model/latency_ms_median"),
                "pipeline_latency_ms": _metric(model, "pipeline/latency_ms_median"),
                "run_id": run_link(ui_url, child), "external_dataset": external,
            })
    return pd.DataFrame(rows, columns=["parent_id", "run", "stage", "precision", "qwk", "acc", "f1_macro",
                                       "ece", "params", "macs", "size_bytes", "latency_ms",
                                       "pipeline_latency_ms", "run_id", "external_dataset"])


def _glaucoma_precision(arm: str, params: Mapping[str, str]) -> str:
    if arm == "qat":
        return "int8"
    if arm == "share":
        # k shared values per layer: each weight is stored as a log2(k)-bit index
        k = params.get("chain.callbacks.weight_sharing.k")
        return f"{math.ceil(math.log2(int(k)))}-bit shared (k={k})" if k and k.isdigit() and int(k) > 1 \
            else "weight-shared"
    return "fp32"


def glaucoma_table(selected: Sequence[SelectedRun], ui_url: str,
                   summaries: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per chain-stage child run of the selected glaucoma-iterations runs, and one per ``make evaluate``
    run of theirs (``<stage> on <dataset>``: its scores, the stage's size and latency); ``summaries[parent id]``
    (the run's summary.csv) adds each stage's cumulative train time."""
    rows = []
    for parent in (s for s in selected if s.kind == GLAUCOMA):
        summary = (summaries or {}).get(parent.parent.info.run_id)
        cumulative = {} if summary is None or "cumulative_train_time_s" not in summary else dict(
            zip(summary["stage"], summary["cumulative_train_time_s"], strict=True))
        by_stage = {child.info.run_name: child for child in parent.children if "arm" in child.data.tags}
        for child in parent.children:
            name, external = child.info.run_name, ""
            if name in by_stage:
                model, label = child, name
                precision = _glaucoma_precision(child.data.tags["arm"], child.data.params)
            elif name.startswith(EXTERNAL_PREFIX) and child.data.tags.get("stage") in by_stage:
                model = by_stage[child.data.tags["stage"]]
                external = name.removeprefix(EXTERNAL_PREFIX)
                label, precision = f"{model.info.run_name} on {external}", child.data.tags.get("precision", "")
            else:
                continue  # e.g. the bench child run of make bench
            arm, base = model.data.tags["arm"], model.data.tags.get("base", "")
            rows.append({
                "parent_id": parent.parent.info.run_id, "run": run_link(ui_url, parent.parent, parent.name),
                "stage": label, "arm": arm, "base": int(base) if base.isdigit() else math.nan,
                "precision": precision,
                "dice": _metric(child, "test/dice"), "iou": _metric(child, "test/iou"),
                "hd95": _metric(child, "test/hd95"),
                "false_detections": _metric(child, "test/false_detections"),
                "edge_case_detection": _metric(child, "test/edge_case_detection"),
                "params": _metric(model, "model/params"), "size_bytes": _metric(model, "model/size_bytes"),
                "latency_ms": _metric(model, "model/latency_ms_median"),
                "epochs": _metric(model, "chain/epochs"),
                "train_time_s": _metric(model, "chain/train_time_s"),
                "cumulative_train_time_s": float(cumulative.get(model.info.run_name, math.nan)),
                "liminal": "", "run_id": run_link(ui_url, child), "external_dataset": external,
            })
    return pd.DataFrame(rows, columns=[
        "parent_id", "run", "stage", "arm", "base", "precision", "dice", "iou", "hd95", "false_detections",
        "edge_case_detection", "params", "size_bytes", "latency_ms", "epochs", "train_time_s",
        "cumulative_train_time_s", "liminal", "run_id", "external_dataset"])


def liminal_result(selected: SelectedRun, summary: pd.DataFrame | None) -> LiminalResult:
    """The chain's liminal point per arm, from its own summary table and tolerance (``liminal_points``)."""
    params, metrics = selected.parent.data.params, selected.parent.data.metrics
    tolerance = float(params.get("chain.liminal_tolerance", DEFAULT_LIMINAL_TOLERANCE))
    columns = ["arm", "stage", "base", "dice", "edge_case_detection", "latency_ms", "size_bytes"]
    if summary is None:
        return LiminalResult(selected.parent, tolerance, pd.DataFrame(columns=columns),
                             problem=f"run {selected.parent.info.run_id} has no {SUMMARY_ARTIFACT} artifact "
                                     "(an unfinished or an older chain): rerun the chain to get its summary")
    points = liminal_points(summary, tolerance)
    # the first network is the reference, not a candidate; "any" names the arm of its stage in ``stage``
    rows = [{**(point or {"stage": "none of its bases qualifies"}), "arm": arm}
            for arm, point in points.items() if arm != BASE_ARM]
    table = pd.DataFrame(rows).reindex(columns=columns)
    # the chain logged each arm's liminal base; they differ only if the table was edited since
    logged = {key.removeprefix("liminal/").removesuffix("_base"): value for key, value in metrics.items()
              if key.startswith("liminal/")}
    computed = {arm: float(point["base"]) for arm, point in points.items() if point is not None}
    mismatch = None if logged == computed else (
        f"the parent run's liminal/*_base metrics {logged} differ from its summary.csv's {computed}")
    return LiminalResult(selected.parent, tolerance, table, mismatch=mismatch)


def mark_liminal(table: pd.DataFrame, results: Sequence[LiminalResult]) -> pd.DataFrame:
    """The glaucoma table with each stage's ``liminal`` cell naming the arms whose liminal point it is."""
    table = table.copy()
    for result in results:
        for row in result.points.dropna(subset=["base"]).itertuples():
            match = (table["stage"] == row.stage) & (table["parent_id"] == result.parent.info.run_id)
            table.loc[match, "liminal"] = [", ".join(filter(None, [cell, row.arm])) for cell in
                                           table.loc[match, "liminal"]]
    return table


# ------------------------------------------------------------------------------------------------- bench
def find_bench_run(client: MlflowClient, selected: Sequence[SelectedRun], setting: str | None,
                   experiment_name: str, tracking_uri: str) -> Run | None:
    """``setting``: None (no bench section), a run id, or ``latest``: the newest ``bench`` child run of a
    selected run (make bench logs one under each parent it measured), else the latest FINISHED run of the
    bench experiment."""
    if setting is None or str(setting).strip().lower() in {"", "null", "none"}:
        return None
    if str(setting) != "latest":
        return _get_run(client, str(setting), "report.bench", tracking_uri)
    children = [c for s in selected for c in s.children if c.info.run_name == "bench"]
    if children:
        return max(children, key=lambda run: run.info.start_time)
    parents = latest_parent_runs(client, experiment_name)
    return parents[0] if parents else None


def bench_result(client: MlflowClient, run: Run, workdir: Path) -> BenchResult | None:
    """bench.csv (one row per model and backend) with a ``precision`` column, and pareto.png."""
    table = read_csv_artifact(client, run, BENCH_CSV, workdir)
    if table is None:
        log.warning("The bench run %s has no %s artifact: no bench section", run.info.run_id, BENCH_CSV)
        return None
    table.insert(table.columns.get_loc("backend") + 1, "precision",
                 table["backend"].map(BENCH_PRECISION).fillna(table["backend"]))
    png = download_artifact(client, run, BENCH_PARETO, workdir)
    sources = [f"{key.removesuffix('_source')}: {value}" for key, value in sorted(run.data.tags.items())
               if key.endswith("_source")]
    where = run.data.tags.get("bench_run_dir")
    note = "; ".join(sources) or (f"the bench of this run (bench run directory {where})" if where else "")
    return BenchResult(run, table, png.read_bytes() if png is not None else None, note)


# ----------------------------------------------------------------------------------- architecture baselines
#: the config group experiment=dr_baselines sweeps over: one value (a backbone) per job
BASELINE_GROUP = "model/baseline"
#: the parent-run metric of each column of the baseline table (train_dr's summary: stage ``baseline``)
BASELINE_METRICS = {"qwk": "test/qwk", "acc": "test/acc", "f1_macro": "test/f1_macro", "ece": "test/ece",
                    "params": "model/params", "macs": "model/macs", "size_bytes": "model/size_bytes",
                    "latency_ms": "model/latency_ms_median",
                    "pipeline_latency_ms": "pipeline/latency_ms_median"}
#: the majority-class test accuracy; runs made before it moved out of ``baseline/`` logged the second key
MAJORITY_METRICS = ("majority_class/test_acc", "baseline/majority_acc")
BASELINE_TABLE_COLUMNS = ["parent_id", "choice", "backbone", "pretrained", *BASELINE_METRICS, "majority_acc",
                          "data_fingerprint", "run_id"]
_NO_VALUE = {"", "None", "none", "null"}


def run_id_list(value: str | Sequence[str] | None) -> list[str]:
    """A run-id option (``report.runs``, ``report.baselines``) as a list of ids: a list (a Hydra ListConfig
    too), or one string of ids separated by commas or spaces."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):  # one string (Hydra may read it as a number)
        return [item for item in str(value).replace(",", " ").split() if item]
    return [str(item).strip() for item in value if str(item).strip()]


def baseline_setting(value: str | Sequence[str] | None) -> str | list[str] | None:
    """``report.baselines`` normalised: None (no section), ``"latest"``, or a list of run ids
    (:func:`run_id_list`)."""
    ids = run_id_list(value)
    if not ids or (len(ids) == 1 and ids[0].lower() in {"null", "none"}):
        return None
    return "latest" if ids == ["latest"] else ids


def is_baseline_run(run: Run) -> bool:
    """Whether a parent run trained an architecture baseline (it logged the ``model.baseline`` config)."""
    return run.data.params.get("model.baseline.backbone", "None") not in _NO_VALUE


def override_items(overrides: str) -> list[str]:
    """The ``overrides`` tag (standard_tags: the command-line overrides joined by spaces) as a list."""
    return [item for item in overrides.split() if item != "(none)"]


def is_group_choice(item: str, group: str) -> bool:
    """Whether an override chooses ``group`` (``model/baseline=...``), also as ``+group=`` / ``++group=``."""
    return item.split("=", 1)[0].lstrip("+") == group


def sweep_key(parent: Run, group: str) -> tuple[str | None, frozenset[str]]:
    """(data fingerprint, the overrides without the ``group`` choice as a set): equal for the jobs of one sweep over
    ``group`` and for a rerun of one of its choices, whatever order the overrides were typed in."""
    shared = frozenset(item for item in override_items(parent.data.tags.get("overrides", ""))
                       if not is_group_choice(item, group))
    return parent.data.tags.get("data_fingerprint"), shared


def newest_sweep(parents: Sequence[Run], group: str, choice: Callable[[Run], str | None]) -> list[Run]:
    """Of ``parents`` (newest first): the newest run's sweep over ``group`` (:func:`sweep_key`), one run per
    ``choice``, the newest (a rerun of one choice replaces its older run; other sweeps are left out)."""
    if not parents:
        return []
    key = sweep_key(parents[0], group)
    newest: dict[str | None, Run] = {}
    for parent in parents:
        if sweep_key(parent, group) == key:
            newest.setdefault(choice(parent), parent)
    return list(newest.values())


def baseline_sweep_overrides(parent: Run) -> list[str]:
    """The run's overrides without its backbone choice: what every job of its sweep shares."""
    return [item for item in override_items(parent.data.tags.get("overrides", "")) if not
            is_group_choice(item, BASELINE_GROUP)]


def baseline_sweep_key(parent: Run) -> tuple[str | None, frozenset[str]]:
    """:func:`sweep_key` over the backbone choice."""
    return sweep_key(parent, BASELINE_GROUP)


def backbone_label(params: Mapping[str, str], prefix: str = "model.baseline.") -> str:
    """The timm backbone of a run's params, with ConvNeXt's depthwise kernel: ``convnext_tiny k=5``."""
    label = params.get(f"{prefix}backbone", params.get("backbone", ""))
    kernel = params.get(f"{prefix}backbone_kwargs.kernel_sizes")
    return label if kernel in _NO_VALUE or kernel is None else f"{label} k={kernel}"


def pretrained_label(params: Mapping[str, str], prefix: str = "model.baseline.") -> str:
    """Where the backbone's initial weights came from: ``none`` (random), ``hub``, ``lite`` or a local file
    (``pretrained_path`` takes precedence, as in ``create_backbone``)."""
    path = params.get(f"{prefix}pretrained_path", params.get("pretrained_path", "None"))
    if path not in _NO_VALUE:
        return f"file {Path(path).name}"
    return params.get(f"{prefix}pretrained", params.get("pretrained", ""))


def baseline_choice(parent: Run) -> str:
    """The backbone choice of a sweep job: its ``model/baseline`` override, else (a single run of the
    experiment's default) the backbone it trained."""
    for item in override_items(parent.data.tags.get("overrides", "")):
        if is_group_choice(item, BASELINE_GROUP) and "=" in item:
            return item.split("=", 1)[1]
    return backbone_label(parent.data.params)


def latest_baseline_sweep(client: MlflowClient, experiment_name: str) -> list[Run]:
    """The newest sweep of the experiment: its newest FINISHED baseline parent run defines the sweep
    (:func:`baseline_sweep_key`), and each backbone choice contributes its newest FINISHED run of that sweep
    (a rerun of one backbone replaces its older run; sweeps on other data or settings are left out). Newest
    first; empty when the experiment has no finished baseline run."""
    parents = [run for run in latest_parent_runs(client, experiment_name) if is_baseline_run(run)]
    return newest_sweep(parents, BASELINE_GROUP, baseline_choice)


def explicit_baseline_runs(client: MlflowClient, run_ids: Sequence[str], tracking_uri: str) -> list[Run]:
    """The parent runs named by ``report.baselines`` (a stage's child run stands for its parent), in order.

    Raises:
        NoRunsError: an id not in the store, or a run that trained no architecture baseline.
    """
    option = "report.baselines"
    runs, seen = [], set()
    for run_id in run_ids:
        parent = _parent_of(client, _get_run(client, run_id, option, tracking_uri), option, tracking_uri)
        if not is_baseline_run(parent):
            experiment = client.get_experiment(parent.info.experiment_id).name
            raise NoRunsError(
                f"{option}: run {parent.info.run_id} ({parent.info.run_name!r}, experiment {experiment!r}) "
                "trained no architecture baseline (it has no model.baseline.backbone param): name parent "
                "runs of `make dr-distill ARGS=\"experiment=dr_baselines\"`, or report.baselines=latest")
        if parent.info.run_id not in seen:
            seen.add(parent.info.run_id)
            runs.append(parent)
    return runs


def _first_metric(run: Run, keys: Sequence[str]) -> float:
    return next((_metric(run, key) for key in keys if key in run.data.metrics), math.nan)


def baseline_table(runs: Sequence[Run], ui_url: str) -> pd.DataFrame:
    """One row per baseline parent run (its ``baseline/*`` metrics), best test QWK first (runs without one
    last, ties in the given order)."""
    rows = [{
        "parent_id": run.info.run_id, "choice": baseline_choice(run),
        "backbone": backbone_label(run.data.params), "pretrained": pretrained_label(run.data.params),
        **{column: _metric(run, f"baseline/{key}") for column, key in BASELINE_METRICS.items()},
        "majority_acc": _first_metric(run, MAJORITY_METRICS),
        "data_fingerprint": run.data.tags.get("data_fingerprint", ""), "run_id": run_link(ui_url, run),
    } for run in runs]
    table = pd.DataFrame(rows, columns=BASELINE_TABLE_COLUMNS)
    return table.sort_values("qwk", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def distilled_student_rows(selected: Sequence[SelectedRun], ui_url: str,
                           fingerprints: Sequence[str]) -> pd.DataFrame:
    """The student of each selected dr-distill run that learned from a teacher, as rows of the baseline
    table (its child run's ``test/*`` and ``model/*`` metrics), for scale. The ``backbone`` cell marks it,
    and says so when it was trained on other data than the baselines (``fingerprints``)."""
    rows = []
    for run in (s for s in selected if s.kind == DR):
        student = run.child("student")
        if student is None or not student_distills(student.data.params):
            continue
        fingerprint = run.parent.data.tags.get("data_fingerprint", "")
        mark = "student (distilled)" if fingerprint in fingerprints else "student (distilled, other data)"
        backbone = backbone_label(student.data.params, "model.student.")
        rows.append({
            "parent_id": run.parent.info.run_id, "choice": "",
            "backbone": f"{mark}: {backbone}" if backbone else mark,
            "pretrained": pretrained_label(student.data.params, "model.student."),
            **{column: _metric(student, key) for column, key in BASELINE_METRICS.items()},
            "majority_acc": _first_metric(run.parent, MAJORITY_METRICS), "data_fingerprint": fingerprint,
            "run_id": run_link(ui_url, student),
        })
    return pd.DataFrame(rows, columns=BASELINE_TABLE_COLUMNS)


def baseline_rerun_command(parent: Run) -> str:
    """The make command that runs the parent's sweep again (every backbone of experiment=dr_baselines)."""
    return f'make dr-distill ARGS="{" ".join(baseline_sweep_overrides(parent)) or "experiment=dr_baselines"}"'


def baseline_sweep(client: MlflowClient, setting: str | Sequence[str] | None, experiment_name: str,
                   tracking_uri: str, selected: Sequence[SelectedRun] = (),
                   ui_url: str = "") -> BaselineSweep | None:
    """The baseline runs of ``report.baselines`` (see :func:`baseline_setting`): None for no section, and
    for ``latest`` when the store holds no finished baseline run (the section is optional).

    Raises:
        NoRunsError: an explicit id that is not in the store or not a baseline run.
    """
    setting = baseline_setting(setting)
    if setting is None:
        return None
    explicit = setting != "latest"
    runs = explicit_baseline_runs(client, setting, tracking_uri) if explicit else latest_baseline_sweep(
        client, experiment_name)
    if not runs:
        return None
    table = baseline_table(runs, ui_url)
    by_id = {run.info.run_id: run for run in runs}
    ordered = [by_id[run_id] for run_id in table["parent_id"]]
    # each sweep's newest run, newest sweep first: its command keeps the overrides' order of that invocation
    sweeps: dict[tuple[str | None, frozenset[str]], Run] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        sweeps.setdefault(baseline_sweep_key(run), run)
    commands = list(dict.fromkeys(baseline_rerun_command(run) for run in sweeps.values()))
    majority = sorted({value for value in table["majority_acc"] if not math.isnan(value)})
    students = distilled_student_rows(selected, ui_url, list(table["data_fingerprint"]))
    return BaselineSweep(table, ordered, commands, majority, students, explicit)


# ------------------------------------------------------------------------------------ distillation gain
def grading_scores(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[QWK, accuracy, macro F1] of one student's grades (the order of ``GAIN_METRICS``)."""
    # the suite's one QWK (the bench and the int8 parity check use it too); imported here because it brings
    # torch and ONNX Runtime, which the rest of the report never needs
    import torch

    from compression.quantization import quadratic_weighted_kappa

    labels = list(range(num_classes))
    qwk = quadratic_weighted_kappa(torch.from_numpy(np.asarray(truth)), torch.from_numpy(np.asarray(predicted)),
                                   num_classes)
    return np.array([qwk,
                     accuracy_score(truth, predicted),
                     f1_score(truth, predicted, average="macro", labels=labels, zero_division=0.0)])


def pair_predictions(with_teacher: pd.DataFrame, without_teacher: pd.DataFrame) -> pd.DataFrame:
    """``image, label, with_teacher, without_teacher``: the two students' test predictions (the
    ``predictions/test_predictions.csv`` columns ``image, label, prediction``) matched image by image.

    Raises:
        ValueError: missing columns, or the two files do not hold the same test images with the same labels.
    """
    for name, frame in (("distilled", with_teacher), ("no-teacher", without_teacher)):
        missing = {"image", "label", "prediction"} - set(frame.columns)
        if missing:
            raise ValueError(f"the {name} student's {PREDICTIONS_ARTIFACT} lacks the column(s) "
                             f"{sorted(missing)}")
    a, b = (f.set_index(f["image"].astype(str)) for f in (with_teacher, without_teacher))
    if a.index.has_duplicates or b.index.has_duplicates:
        raise ValueError(f"an image appears twice in a {PREDICTIONS_ARTIFACT}: it must hold one row per test "
                         "image")
    only_a, only_b = sorted(set(a.index) - set(b.index)), sorted(set(b.index) - set(a.index))
    if only_a or only_b:
        raise ValueError(f"the two students were tested on different images ({len(only_a)} only in the "
                         f"distilled student's predictions, e.g. {only_a[:3]}; {len(only_b)} only in the "
                         f"other's, e.g. {only_b[:3]}): they are not the same test split")
    b = b.loc[a.index]
    differ = a.index[a["label"].to_numpy() != b["label"].to_numpy()]
    if len(differ):
        raise ValueError(f"the two prediction files give different true grades for {len(differ)} images "
                         f"(e.g. {list(differ[:3])}): they were not made from the same labels")
    return pd.DataFrame({"image": a.index, "label": a["label"].to_numpy(dtype=int),
                         "with_teacher": a["prediction"].to_numpy(dtype=int),
                         "without_teacher": b["prediction"].to_numpy(dtype=int)}).reset_index(drop=True)


def paired_bootstrap_gain(paired: pd.DataFrame, num_classes: int,
                          settings: BootstrapSettings) -> pd.DataFrame:
    """Test QWK, accuracy and macro F1 of both students, their difference (with - without teacher) and its
    confidence interval from a paired bootstrap over test images (``scipy.stats.bootstrap(paired=True)``:
    each resample draws images with replacement and scores both students on the same images).

    ``paired``: :func:`pair_predictions`' frame. A gain that is undefined on some resamples (the QWK of a
    resample holding a single grade) gives a NaN interval. The statistic calls sklearn's metrics once per
    resample (2000 resamples of 550 images: about 10 s on one core).
    """
    if len(paired) < 2:
        raise ValueError(f"{len(paired)} test image(s): a bootstrap interval needs at least 2")
    truth, with_teacher, without_teacher = (paired[c].to_numpy() for c in ("label", "with_teacher",
                                                                            "without_teacher"))

    def gain(truth: np.ndarray, with_teacher: np.ndarray, without_teacher: np.ndarray) -> np.ndarray:
        return grading_scores(truth, with_teacher, num_classes) - grading_scores(truth, without_teacher,
                                                                                 num_classes)

    # sklearn's argument checks are most of each call's time; the inputs are checked once, above
    quiet = np.errstate(invalid="ignore", divide="ignore")
    with sklearn.config_context(skip_parameter_validation=True), quiet:
        result = stats.bootstrap((truth, with_teacher, without_teacher), gain, paired=True, vectorized=False,
                                 n_resamples=settings.n_resamples, confidence_level=settings.confidence_level,
                                 method=settings.method, rng=np.random.default_rng(settings.seed))
        scores_with = grading_scores(truth, with_teacher, num_classes)
        scores_without = grading_scores(truth, without_teacher, num_classes)
    return pd.DataFrame({"metric": list(GAIN_METRICS.values()), "with_teacher": scores_with,
                         "without_teacher": scores_without, "gain": scores_with - scores_without,
                         "ci_low": result.confidence_interval.low,
                         "ci_high": result.confidence_interval.high})


def student_only_command(overrides: str) -> str:
    """The make command that trains the no-teacher twin of a dr-distill run made with ``overrides`` (its
    ``overrides`` tag): the same data and settings, the student alone (experiment/dr_student_only.yaml)."""
    dropped = ("stages=", "distill=", "resume=")
    kept = [o for o in overrides.split() if o != "(none)" and not o.startswith(dropped)]
    experiment = next((o.split("=", 1)[1] for o in kept if o.startswith("experiment=")), CPU_EXPERIMENT)
    if experiment in (CPU_EXPERIMENT, "dr_student_only"):
        args = [o for o in kept if not o.startswith("experiment=")] + ["experiment=dr_student_only"]
    else:  # dr_student_only derives from the CPU experiment; any other keeps its own and drops the teacher
        args = [*kept, "distill=none", "stages=[student]"]
    return f'make dr-distill ARGS="{" ".join(args)}"'


def rerun_command(parent: Run) -> str:
    overrides = parent.data.tags.get("overrides", "(none)")
    return "make dr-distill" if overrides in {"", "(none)"} else f'make dr-distill ARGS="{overrides}"'


def split_test_ids(client: MlflowClient, run: Run, workdir: Path) -> frozenset[str] | None:
    """The sample ids of the run's test split (its ``run/splits.csv``), None when it was not logged."""
    table = read_csv_artifact(client, run, SPLITS_ARTIFACT, workdir)
    if table is None or not {"split", "sample_id"} <= set(table.columns):
        return None
    return frozenset(table.loc[table["split"] == "test", "sample_id"].astype(str))


def _mismatch(client: MlflowClient, distilled: Run, candidate: Run, workdir: Path) -> str | None:
    """Why ``candidate`` (a no-teacher student run) was not tested like ``distilled``; None when it was."""
    ours, theirs = (run.data.tags.get("data_fingerprint") for run in (distilled, candidate))
    if ours != theirs:
        return f"other data (data_fingerprint {theirs}, the distilled student's is {ours})"
    ours_ids, theirs_ids = (split_test_ids(client, run, workdir) for run in (distilled, candidate))
    if ours_ids is not None and theirs_ids is not None and ours_ids != theirs_ids:
        return f"another test split ({len(ours_ids ^ theirs_ids)} test images differ in {SPLITS_ARTIFACT})"
    return None


def find_student_without_teacher(
    client: MlflowClient, distilled: SelectedRun, explicit: str | None, tracking_uri: str, workdir: Path,
) -> tuple[SelectedRun | None, list[str], str | None]:
    """(the counterpart run, the no-teacher runs rejected with their reason, why ``explicit`` does not
    qualify).

    ``explicit``: a parent (or student) run id from ``report.student_without_teacher``; None searches the
    distilled run's experiment, newest first, for a FINISHED run whose student learned without a teacher on
    the same data (``data_fingerprint``) and test split (``run/splits.csv``).
    """
    student = distilled.child("student")
    if explicit:
        option = "report.student_without_teacher"
        parent = _parent_of(client, _get_run(client, explicit, option, tracking_uri), option, tracking_uri)
        candidate = SelectedRun(DR, parent, child_runs(client, parent),
                                client.get_experiment(parent.info.experiment_id).name)
        other = candidate.child("student")
        if other is None:
            return None, [], f"{option}={explicit}: run {candidate.name!r} has no student stage"
        if student_distills(other.data.params):
            teacher = other.data.params.get("teacher_checkpoint")
            return None, [], (f"{option}={explicit}: the student of {candidate.name!r} learned from a "
                              f"teacher (teacher_checkpoint={teacher}); name a run made with "
                              "experiment=dr_student_only or distill=none")
        problem = _mismatch(client, student, other, workdir)
        return (candidate, [], None) if problem is None else (None, [], f"{option}={explicit}: {problem}")
    rejected = []
    for parent in latest_parent_runs(client, distilled.experiment_name):
        if parent.info.run_id == distilled.parent.info.run_id:
            continue
        children = child_runs(client, parent)
        other = next((c for c in children if c.info.run_name == "student"), None)
        if other is None or student_distills(other.data.params):
            continue
        problem = _mismatch(client, student, other, workdir)
        if problem is None:
            return SelectedRun(DR, parent, children, distilled.experiment_name), rejected, None
        rejected.append(f"{parent.info.run_name} ({parent.info.run_id}): {problem}")
    return None, rejected, None


def prediction_num_classes(*frames: pd.DataFrame) -> int:
    """K from the ``prob_0 .. prob_{K-1}`` columns (the predictions file), else from the largest grade seen."""
    probs = max(sum(str(c).startswith("prob_") for c in f.columns) for f in frames)
    seen = max(int(max(f["label"].max(), f["prediction"].max())) + 1 for f in frames)
    return max(probs, seen, 2)


def distillation_gain(client: MlflowClient, distilled: SelectedRun, explicit: str | None,
                      settings: BootstrapSettings, tracking_uri: str, workdir: Path) -> DistillationGain:
    """The distilled student against its no-teacher counterpart on the same test images, or the reason
    there is no number and the run that would give one."""
    result = DistillationGain(distilled)
    student = distilled.child("student")
    if student is None:
        result.problem = f"{distilled.name} has no student stage: nothing was distilled"
        return result
    counterpart, result.rejected, problem = find_student_without_teacher(client, distilled, explicit,
                                                                         tracking_uri, workdir)
    command = student_only_command(distilled.parent.data.tags.get("overrides", "(none)"))
    if counterpart is None:
        result.problem = problem or (
            f"No finished {distilled.experiment_name} run trained the student without a teacher on the same "
            f"data and test split as {distilled.name} (data_fingerprint "
            f"{distilled.parent.data.tags.get('data_fingerprint')}). Make one with `{command}` and rerun the "
            "report, or name one with `report.student_without_teacher=<parent run id>`.")
        return result
    result.counterpart = counterpart
    other = counterpart.child("student")
    frames = {}
    owners = ((student, distilled, rerun_command(distilled.parent)), (other, counterpart, command))
    for run, owner, remake in owners:
        frame = read_csv_artifact(client, run, PREDICTIONS_ARTIFACT, workdir)
        if frame is None:
            result.problem = (f"The student run {run.info.run_id} of {owner.name} has no "
                              f"{PREDICTIONS_ARTIFACT} artifact (it was made before per-image test "
                              f"predictions were logged): rerun `{remake}` and then the report.")
            return result
        frames[owner.parent.info.run_id] = frame
    with_teacher = frames[distilled.parent.info.run_id]
    without_teacher = frames[counterpart.parent.info.run_id]
    try:
        paired = pair_predictions(with_teacher, without_teacher)
    except ValueError as error:
        result.problem = (f"Cannot pair the two students' test predictions: {error}. Make the counterpart "
                          f"again with `{command}`.")
        return result
    result.images = len(paired)
    result.table = paired_bootstrap_gain(paired, prediction_num_classes(with_teacher, without_teacher), settings)
    return result


# ------------------------------------------------------------------------------------------------ all of it
def collect_report(client: MlflowClient, tracking_uri: str, *, ui_url: str, run_ids: Sequence[str] = (),
                   experiments: Mapping[str, str] | None = None, bench: str | None = "latest",
                   student_without_teacher: str | None = None,
                   bootstrap: BootstrapSettings | None = None,
                   baselines: str | Sequence[str] | None = "latest") -> ReportData:
    """Select the runs and read everything the report shows (see the module docstring). ``baselines``: the
    architecture baselines' section (:func:`baseline_sweep`).

    A store holding only architecture baselines gets a report of them alone.

    Raises:
        NoRunsError: no run to report on, or a run id that is not in the store.
    """
    experiments = {**DEFAULT_EXPERIMENTS, **(experiments or {})}
    bootstrap = bootstrap or BootstrapSettings()
    selected, notes = select_runs(client, tracking_uri, run_ids, experiments, allow_none=True)
    sweep = baseline_sweep(client, baselines, experiments[BASELINES], tracking_uri, selected, ui_url)
    if not selected and sweep is None:
        raise NoRunsError(no_runs_message(tracking_uri, experiments))
    notes += [f"Run {s.name} ({s.parent.info.run_id}) is {s.parent.info.status}, not FINISHED: its numbers "
              "may be incomplete." for s in selected if s.parent.info.status != "FINISHED"]
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        workdir = Path(tmp)
        chains = [s for s in selected if s.kind == GLAUCOMA]
        summaries = {s.parent.info.run_id: read_csv_artifact(client, s.parent, SUMMARY_ARTIFACT, workdir)
                     for s in chains}
        liminal = [liminal_result(s, summaries[s.parent.info.run_id]) for s in chains]
        bench_run = find_bench_run(client, selected, bench, experiments["bench"], tracking_uri)
        bench_rows = None if bench_run is None else bench_result(client, bench_run, workdir)
        if bench_run is None and str(bench) == "latest":
            notes.append("No `make bench` run of these runs nor in the bench experiment: run `make bench` "
                         "for every model on every CPU backend (fp32, channels-last, bf16, ONNX Runtime fp32 "
                         "and int8, weight-shared).")
        gains = []
        for run in (s for s in selected if s.kind == DR):
            student = run.child("student")
            if student is not None and not student_distills(student.data.params):
                notes.append(f"{run.name} trained its student without a teacher: it is the counterpart of a "
                             "distillation gain, not a distilled run.")
                continue
            gains.append(distillation_gain(client, run, student_without_teacher, bootstrap, tracking_uri,
                                           workdir))
    notes += [f"Baseline run {run.info.run_name} ({run.info.run_id}) is {run.info.status}, not FINISHED: its "
              "numbers may be incomplete." for run in (sweep.runs if sweep else [])
              if run.info.status != "FINISHED"]
    return ReportData(
        tracking_uri=tracking_uri, selected=selected, notes=notes, dr_table=dr_table(selected, ui_url),
        glaucoma_table=mark_liminal(glaucoma_table(selected, ui_url, summaries), liminal), liminal=liminal,
        bench=bench_rows, gains=gains, ui_url=ui_url, bootstrap=bootstrap, baselines=sweep)
