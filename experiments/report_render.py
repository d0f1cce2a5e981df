"""``make report``'s pages: a :class:`~experiments.report_data.ReportData` as sections (text, tables, figures)
written once as Markdown (``report.md`` beside its PNGs) and once as self-contained HTML (``report.html``:
inline CSS, the PNGs as base64 data URIs, nothing fetched when it is opened).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from compression.benchmark import pareto_front
from experiments.report_ablation import AblationStudy
from experiments.report_data import (
    DR,
    GLAUCOMA,
    BaselineSweep,
    DistillationGain,
    Link,
    ReportData,
    run_link,
)
from experiments.report_folds import FoldSummary

PARETO_FILE, BENCH_PARETO_FILE = "pareto.png", "bench_pareto.png"
REPORT_HTML, REPORT_MD = "report.html", "report.md"

#: column of a data table -> its title in the report, per table
DR_COLUMNS = {"run": "run", "stage": "stage", "precision": "precision", "qwk": "test QWK", "acc": "test acc",
              "f1_macro": "test macro F1", "ece": "test ECE", "params": "params", "macs": "MMACs",
              "size_bytes": "size MB", "latency_ms": "latency ms", "pipeline_latency_ms": "pipeline ms",
              "run_id": "run id"}
GLAUCOMA_COLUMNS = {"run": "run", "stage": "stage", "arm": "arm", "base": "base", "precision": "precision",
                    "dice": "test Dice", "iou": "test IoU", "hd95": "HD95 px",
                    "false_detections": "false detections", "edge_case_detection": "edge-case detection",
                    "params": "params", "size_bytes": "size MB", "latency_ms": "latency ms",
                    "epochs": "epochs", "train_time_s": "train s",
                    "cumulative_train_time_s": "cumulative train s",
                    "liminal": "liminal for", "run_id": "run id"}
LIMINAL_COLUMNS = {"arm": "arm", "stage": "stage", "base": "base", "dice": "test Dice",
                   "edge_case_detection": "edge-case detection", "latency_ms": "latency ms",
                   "size_bytes": "size MB"}
BASELINE_COLUMNS = {"backbone": "backbone", "pretrained": "pretrained", "qwk": "test QWK", "acc": "test acc",
                    "f1_macro": "test macro F1", "ece": "test ECE", "params": "params", "macs": "MMACs",
                    "size_bytes": "size MB", "latency_ms": "latency ms", "pipeline_latency_ms": "pipeline ms",
                    "run_id": "run id"}
ABLATION_COLUMNS = {"arm": "arm", "run": "student run", "qwk": "test QWK", "acc": "test acc", "f1_macro": "macro F1",
                    "d_qwk": "QWK - full", "ci_low": "CI low", "ci_high": "CI high", "d_acc": "acc - full",
                    "d_f1_macro": "F1 - full"}
ABLATION_TEXT = ("experiment=dr_ablation: the distilled student (`full`) and the same student without one part each, "
                 "trained on the same data, split and seeds. `QWK - full` is the arm's test QWK minus the full "
                 "student's on the same test images, with a paired-bootstrap interval (as the distillation gain): an "
                 "interval below 0 means the part that arm removes helps.")
FOLD_COLUMNS = {"dice": "test Dice", "iou": "test IoU", "hd95": "HD95 px", "false_detections": "false detections",
                "edge_case_detection": "edge-case detection"}
FOLDS_TEXT = ("A `-m data.fold=...` sweep of glaucoma-iterations: each fold trains the chain on its own training folds "
              "and is scored on the same fixed test split. Each cell is the mean ± sample standard deviation over the "
              "folds; the liminal point is the chain's rule (chain.liminal_tolerance) applied to the fold means.")
BENCH_COLUMNS = {"pipeline": "pipeline", "model": "model", "backend": "backend", "precision": "precision",
                 "params": "params", "file_bytes": "file MB", "latency_ms_median": "median ms",
                 "latency_vs_fp32": "vs fp32", "latency_vs_reference": "vs reference",
                 "quality_metric": "metric", "quality": "quality", "quality_delta": "delta vs fp32",
                 "agreement": "agreement", "error": "error"}
#: columns shown in other units: bytes as MB, MACs as millions
SCALES = {"size_bytes": 1e-6, "file_bytes": 1e-6, "macs": 1e-6}
#: optional columns left out when no row has them
OPTIONAL = {"ece", "cumulative_train_time_s", "liminal", "error"}
_MARKERS = {"fp32": "o", "int8": "v", "shared": "*"}

Part = str | Link


@dataclass
class Section:
    """A titled block: paragraphs (strings with `code` spans, or lists of strings and links), bullets, a
    table (cells: numbers, strings, links; formatted by the renderer) and a figure (a PNG's file name)."""

    title: str
    paragraphs: list[str | list[Part]] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figure: str | None = None
    bullets: list[str] = field(default_factory=list)
    level: int = 2


# ------------------------------------------------------------------------------------------------ cells
def format_number(value: object) -> str:
    """Integral values with thousands separators, others to 4 significant digits, NaN and None empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        if math.isinf(number):
            return str(number)
        return f"{int(number):,}" if number.is_integer() and abs(number) < 1e15 else f"{number:.4g}"
    return str(value)


def display_table(table: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """The chosen columns (key -> title), in ``SCALES``' units (links and texts untouched); optional columns
    no row has are left out."""
    shown = {}
    for key, title in columns.items():
        if key not in table:
            continue
        values = table[key]
        if key in OPTIONAL and not values.map(lambda v: format_number(v) != "").any():
            continue
        shown[title] = values * SCALES[key] if key in SCALES else values
    return pd.DataFrame(shown)


def _markdown_cell(value: object) -> str:
    text = f"[{value.text}]({value.url})" if isinstance(value, Link) else format_number(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _html_inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_cell(value: object) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.url)}">{html.escape(value.text)}</a>'
    return html.escape(format_number(value))


def _html_td(value: object) -> str:
    numeric = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    return f'<td class="number">{_html_cell(value)}</td>' if numeric else f"<td>{_html_cell(value)}</td>"


def _parts(paragraph: str | list[Part]) -> list[Part]:
    return [paragraph] if isinstance(paragraph, str) else list(paragraph)


# -------------------------------------------------------------------------------------------- rendering
def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The sections as one Markdown page (figures referenced by file name, beside it)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += ["".join(_markdown_cell(p) if isinstance(p, Link) else p for p in _parts(paragraph)), ""]
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
        if section.table is not None and len(section.table):
            cells = section.table.map(_markdown_cell)
            # disable_numparse: the cells are already formatted (tabulate would reformat "1,024" and "0.25")
            lines += [cells.to_markdown(index=False, disable_numparse=True), ""]
        if section.figure:
            lines += [f"![{section.title}]({section.figure})", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 110em; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.number { text-align: right; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 0.2em; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def render_html(title: str, sections: Sequence[Section], images: dict[str, bytes]) -> str:
    """One HTML file: inline CSS, each figure in ``images`` (file name -> PNG bytes) as a data URI."""
    escaped = html.escape(title)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{escaped}</title><style>{_CSS}</style></head><body>", f"<h1>{escaped}</h1>"]
    for section in sections:
        out.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        for paragraph in section.paragraphs:
            out.append("<p>" + "".join(_html_cell(p) if isinstance(p, Link) else _html_inline(p)
                                       for p in _parts(paragraph)) + "</p>")
        if section.bullets:
            out.append("<ul>" + "".join(f"<li>{_html_inline(b)}</li>" for b in section.bullets) + "</ul>")
        if section.table is not None and len(section.table):
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in section.table.columns)
            body = "".join("<tr>" + "".join(_html_td(v) for v in row) + "</tr>"
                           for row in section.table.itertuples(index=False))
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        if section.figure and section.figure in images:
            data = base64.b64encode(images[section.figure]).decode("ascii")
            out.append(f'<p><img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- figure
def _short(text: str, length: int = 48) -> str:
    return text if len(text) <= length else text[:length - 3] + "..."


def pareto_points(data: ReportData) -> pd.DataFrame:
    """pipeline, group (the colour: the stage or arm, or the parent run when several are compared), label
    (the stage), precision, quality, metric, latency_ms, size_bytes of every stage run."""
    frames = []
    for kind, table, quality, metric, group in ((DR, data.dr_table, "qwk", "test QWK", "stage"),
                                                (GLAUCOMA, data.glaucoma_table, "dice", "test Dice", "arm")):
        if "external_dataset" in table:  # scores on another set are not points of this set's trade-off
            table = table[table["external_dataset"] == ""]
        if table.empty:
            continue
        several = sum(s.kind == kind for s in data.selected) > 1
        frames.append(pd.DataFrame({
            "pipeline": "DR grading" if kind == DR else "optic-disc segmentation",
            "group": table["run"].map(lambda link: _short(link.text)) if several else table[group],
            "label": table["stage"], "precision": table["precision"], "quality": table[quality],
            "metric": metric, "latency_ms": table["latency_ms"], "size_bytes": table["size_bytes"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["pipeline", "group", "label", "precision", "quality", "metric", "latency_ms", "size_bytes"])


def pareto_figure(points: pd.DataFrame, path: Path) -> Path | None:
    """Quality against latency and against size (log axes where the values span more than 10x), one row of
    panels per pipeline, each stage labelled, the Pareto front (``compression.benchmark.pareto_front``)
    dashed. None when no stage has a quality, a latency and a size."""
    usable = points.dropna(subset=["quality", "latency_ms", "size_bytes"])
    usable = usable[(usable["latency_ms"] > 0) & (usable["size_bytes"] > 0)]
    pipelines = list(dict.fromkeys(usable["pipeline"]))
    if not pipelines:
        return None
    figure = Figure(figsize=(13, 5 * len(pipelines)), layout="constrained")
    axes = figure.subplots(len(pipelines), 2, squeeze=False)
    for row, pipeline in zip(axes, pipelines, strict=True):
        panel = usable[usable["pipeline"] == pipeline]
        colours = {group: f"C{i % 10}" for i, group in enumerate(dict.fromkeys(panel["group"]))}
        for axis, column, title in ((row[0], "latency_ms", "batch-1 CPU latency, median (ms)"),
                                    (row[1], "size_bytes", "deployed file size (MB)")):
            x = panel[column] / (1e6 if column == "size_bytes" else 1.0)
            for xi, point in zip(x, panel.itertuples(), strict=True):
                family = next((k for k in _MARKERS if k in str(point.precision)), "")
                axis.scatter(xi, point.quality, marker=_MARKERS.get(family, "D"), color=colours[point.group],
                             edgecolors="black", linewidths=0.5, s=60, alpha=0.85)
                axis.annotate(point.label, (xi, point.quality), fontsize=7, xytext=(4, 3),
                              textcoords="offset points")
            front = pareto_front(x.to_numpy(), panel["quality"].to_numpy())
            order = np.argsort(x.to_numpy()[front])
            axis.step(x.to_numpy()[front][order], panel["quality"].to_numpy()[front][order], where="post",
                      color="black", linestyle="--", linewidth=1)
            # a log axis only where the values span an order of magnitude (its ticks are unreadable otherwise)
            log_scale = x.max() / x.min() > 10
            if log_scale:
                axis.set_xscale("log")
            else:
                # from zero: autoscaled to the points alone, 11.734 and 11.745 ms were drawn at opposite corners
                axis.set_xlim(left=0, right=float(x.max()) * 1.08)
            axis.set_ylim(bottom=min(0.0, float(panel["quality"].min())), top=1.02)
            axis.set_xlabel(f"{title}{', log scale' if log_scale else ''}")
            axis.set_ylabel(panel["metric"].iloc[0])
            axis.set_title(f"{pipeline}: {panel['metric'].iloc[0]} vs {title.split(',')[0].split(' (')[0]}")
            axis.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=g) for g, c in colours.items()]
        handles += [Line2D([], [], marker=m, linestyle="", color="grey", label=k) for k, m in _MARKERS.items()
                    if panel["precision"].astype(str).str.contains(k).any()]
        handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto front"))
        row[0].legend(handles=handles, fontsize="small", loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------------------------- sections
def _runs_section(data: ReportData) -> Section:
    rows = []
    for selected in data.selected:
        parent = selected.parent
        tags = parent.data.tags
        started = datetime.fromtimestamp(parent.info.start_time / 1000, UTC)
        dirty = " (dirty)" if tags.get("git_dirty") == "true" else ""
        rows.append({"pipeline": "DR grading" if selected.kind == DR else "optic-disc segmentation",
                     "experiment": selected.experiment_name,
                     "run": run_link(data.ui_url, parent, selected.name), "status": parent.info.status,
                     "started (UTC)": started.strftime("%Y-%m-%d %H:%M:%S"),
                     "child runs": len(selected.children),
                     "data fingerprint": tags.get("data_fingerprint", ""),
                     "synthetic data": tags.get("synthetic_data", ""),
                     "git commit": tags.get("mlflow.source.git.commit", "")[:10] + dirty,
                     "overrides": tags.get("overrides", ""), "run id": run_link(data.ui_url, parent)})
    intro = (f"MLflow store: `{data.tracking_uri}`. Run links open the MLflow UI at {data.ui_url} (start it "
             "with `make mlflow-ui`).")
    return Section("Selected runs", [intro], table=pd.DataFrame(rows), bullets=list(data.notes))


def _gain_section(gain: DistillationGain, data: ReportData) -> Section:
    distilled = gain.distilled
    section = Section(distilled.name, level=3, bullets=[f"not a counterpart: {r}" for r in gain.rejected])
    student = distilled.child("student")
    head: list[Part] = ["Distilled student: "]
    head.append(distilled.name if student is None else
                run_link(data.ui_url, student, f"student of {distilled.name}"))
    if gain.counterpart is not None:
        other = gain.counterpart.child("student")
        head += [", student trained without a teacher: ",
                 run_link(data.ui_url, other, f"student of {gain.counterpart.name}"),
                 f" (parent run {gain.counterpart.parent.info.run_id})."]
    section.paragraphs.append(head)
    if gain.problem is not None:
        section.paragraphs.append(f"No distillation gain: {gain.problem}")
        return section
    settings = data.bootstrap
    level = f"{settings.confidence_level:.0%}"
    section.paragraphs.append(
        f"Gain = distilled - without teacher on the same {gain.images} test images, with a {level} paired "
        f"bootstrap confidence interval (scipy.stats.bootstrap, paired over images, {settings.n_resamples} "
        f"resamples, {settings.method} method, seed {settings.seed}). An interval above 0 means the teacher "
        "helped.")
    table = gain.table.astype(object)
    undefined = table[["ci_low", "ci_high"]].isna().any(axis=1)
    if undefined.any():
        table.loc[undefined, ["ci_low", "ci_high"]] = "undefined"
        section.paragraphs.append(
            f"The interval of {', '.join(table.loc[undefined, 'metric'])} is undefined: some resamples of "
            f"the {gain.images} test images make the metric undefined (the QWK of a resample whose true "
            "grades and one student's predictions are all one and the same grade). More test images give an "
            "interval.")
    section.table = table.rename(columns={
        "metric": "metric", "with_teacher": "with teacher", "without_teacher": "without teacher",
        "gain": "gain", "ci_low": f"{level} CI low", "ci_high": f"{level} CI high"})
    return section


def _ablation_section(study: AblationStudy, data: ReportData) -> Section:
    settings = data.bootstrap
    paragraphs: list[str | list[Part]] = [ABLATION_TEXT]
    section = Section("Ablation: which part of the student helps", paragraphs, bullets=list(study.problems))
    if study.table is not None and not study.table.empty:
        paragraphs.append(f"{study.images} test images; {settings.confidence_level:.0%} intervals from "
                          f"{settings.n_resamples} paired resamples ({settings.method}, seed {settings.seed}).")
        section.table = display_table(study.table, ABLATION_COLUMNS)
    return section


def _folds_section(summary: FoldSummary, data: ReportData) -> Section:
    folds = ", ".join(str(fold) for fold in summary.folds)
    links: list[Part] = [f"{len(summary.runs)} folds ({folds}): "]
    for position, run in enumerate(summary.runs):
        links += [", " if position else "", run_link(data.ui_url, run, f"fold {summary.folds[position]}")]
    section = Section("Cross-validation: the chain over folds", [FOLDS_TEXT, links], bullets=list(summary.problems))
    if summary.table.empty:
        return section
    table = summary.table[["stage", "arm", "base", "folds", "latency_ms", "size_bytes"]].copy()
    for column, title in FOLD_COLUMNS.items():
        table[title] = [f"{mean:.4g} ± {sd:.2g}" if not math.isnan(sd) else format_number(mean) for mean, sd in
                        zip(summary.table[f"{column}_mean"], summary.table[f"{column}_sd"], strict=True)]
    section.table = display_table(table,
                                  {"stage": "stage", "arm": "arm", "base": "base", "folds": "folds",
                                   **{title: title for title in FOLD_COLUMNS.values()},
                                   "latency_ms": "latency ms", "size_bytes": "size MB"})
    section.bullets += [
        f"liminal point of the fold means ({arm}): {point['stage']}, mean Dice {point['dice']:.4f}"
        if point else f"liminal point of the fold means ({arm}): none within {summary.tolerance:.0%}"
        for arm, point in summary.liminal.items()]
    return section


def _columns(data: ReportData, kind: str, columns: Mapping[str, str]) -> Mapping[str, str]:
    """The table's columns; the parent run's only when several runs of the pipeline are compared (the
    selected-runs table names a lone one)."""
    several = sum(selected.kind == kind for selected in data.selected) > 1
    return columns if several else {key: title for key, title in columns.items() if key != "run"}


DR_TEXT = ("One row per stage run. precision: fp32 networks run by PyTorch; int8: student_qat's ONNX "
           "Runtime model. Latency: batch-1 CPU median of the network; pipeline: one image file from "
           "decoding to grade (preprocessing and topological features included).")
GLAUCOMA_TEXT = ("One row per chain stage run: base-N the first network, prune-N pruned from the previous "
                 "base, kd-N distilled from the first, qat-* int8 quantization-aware fine-tunes (ONNX "
                 "Runtime latency), share-* k-means weight-shared fine-tunes (packed file size), compare-* "
                 "another architecture trained on the same data and split for comparison (e.g. the transformer "
                 "of experiment=disc_transformer; no base, never a liminal point). Cumulative "
                 "train time: what it took to obtain the network (the chain's summary.csv).")
LIMINAL_TEXT = ("The smallest base whose test Dice stays within {tolerance:.0%} of the first network's and "
                "that still detects the edge cases (chain.liminal_tolerance), per arm and over all arms "
                "(any).")
PARETO_TEXT = ("Each stage's test quality against its batch-1 latency and its deployed file size; the dashed "
               "line is the Pareto front (no other stage is both faster or smaller and better).")
BASELINE_TEXT = ("One row per backbone of the architecture-baseline sweep (experiment=dr_baselines, the "
                 "comparison behind the student's design), best test QWK first: each a plain timm "
                 "classifier trained alone, without a teacher, with the student's data, loss "
                 "(class-weighted cross-entropy and rotation consistency) and schedule. Latency: batch-1 CPU "
                 "median of the network; pipeline: one image file from decoding to grade.")
GAIN_TEXT = ("The student that learned from the teacher against the same student trained without one "
             "(experiment=dr_student_only), on the same test split.")


def baseline_rows(sweep: BaselineSweep) -> pd.DataFrame:
    """The baselines and the distilled students in one table, best test QWK first (the students ranked among
    the baselines, for scale; their ``backbone`` cell marks them)."""
    frames = [frame for frame in (sweep.table, sweep.students) if not frame.empty]
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return table.sort_values("qwk", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _baseline_section(sweep: BaselineSweep, data: ReportData) -> Section:
    chosen = ("The runs named by `report.baselines`." if sweep.explicit else
              "The latest sweep: the newest finished run of each backbone with the same data "
              f"(data_fingerprint {sweep.table['data_fingerprint'].iloc[0]}) and overrides as the newest "
              "baseline run; a rerun of one backbone replaces its older run.")
    paragraphs: list[str | list[Part]] = [f"{BASELINE_TEXT} {chosen}"]
    floors = ", ".join(format_number(value) for value in sweep.majority_accuracy)
    if len(sweep.majority_accuracy) == 1:
        paragraphs.append(f"Majority-class floor: always predicting the test split's most frequent grade "
                          f"scores test accuracy {floors} (and QWK 0).")
    elif sweep.majority_accuracy:
        paragraphs.append(f"Majority-class floor (always the most frequent grade): test accuracy {floors} on "
                          "these runs' different test splits.")
    if not sweep.students.empty:
        owners = [selected.name for selected in data.selected
                  if selected.parent.info.run_id in set(sweep.students["parent_id"])]
        marked = "row marked \"student (distilled)\" is the student" if len(owners) == 1 else \
            "rows marked \"student (distilled)\" are the students"
        paragraphs.append(
            f"For scale, not part of the sweep: the {marked} of {', '.join(owners)} (test metrics of its "
            "student run), which learned from the teacher; \"other data\" marks a student trained and tested "
            "on other data than the baselines.")
    if len(sweep.commands) == 1:
        paragraphs.append(f"Rerun the sweep (every backbone): `{sweep.commands[0]}`.")
    else:
        paragraphs.append(f"These runs come from {len(sweep.commands)} sweeps with other data or overrides: "
                          "compare them with care. Rerun them with "
                          f"{' and '.join(f'`{command}`' for command in sweep.commands)}.")
    rows = baseline_rows(sweep)
    columns = dict(BASELINE_COLUMNS)
    if rows["data_fingerprint"].nunique() > 1:  # rows on other data: say which, beside each run's id
        columns = {**{k: t for k, t in columns.items() if k != "run_id"},
                   "data_fingerprint": "data fingerprint", "run_id": "run id"}
    return Section("Architecture baselines", paragraphs, table=display_table(rows, columns))


def build_sections(data: ReportData, pareto_file: str | None, bench_pareto_file: str | None) -> list[Section]:
    """The report's sections in order: runs, DR table, architecture baselines, chain table, liminal points,
    Pareto figure, distillation gain, bench."""
    sections = [_runs_section(data)]
    if not data.dr_table.empty:
        sections.append(Section("Diabetic retinopathy grading (dr-distill)", [DR_TEXT],
                                table=display_table(data.dr_table, _columns(data, DR, DR_COLUMNS))))
    if data.baselines is not None:
        sections.append(_baseline_section(data.baselines, data))
    if not data.glaucoma_table.empty:
        table = display_table(data.glaucoma_table, _columns(data, GLAUCOMA, GLAUCOMA_COLUMNS))
        sections.append(Section("Optic-disc segmentation (glaucoma-iterations)", [GLAUCOMA_TEXT],
                                table=table))
    for result in data.liminal:
        section = Section(f"Liminal point of {result.parent.info.run_name}",
                          [LIMINAL_TEXT.format(tolerance=result.tolerance)])
        if result.problem:
            section.paragraphs.append(f"Not available: {result.problem}.")
        else:
            section.table = display_table(result.points, LIMINAL_COLUMNS)
        if result.mismatch:
            section.bullets.append(f"Warning: {result.mismatch}.")
        sections.append(section)
    pareto = Section("Quality against latency and size", [PARETO_TEXT], figure=pareto_file)
    if pareto_file is None:
        pareto.paragraphs.append("No stage has a quality, a latency and a size logged: nothing to plot.")
    sections.append(pareto)
    if data.gains:
        sections.append(Section("Distillation gain", [GAIN_TEXT]))
        sections += [_gain_section(gain, data) for gain in data.gains]
    if data.ablation is not None:
        sections.append(_ablation_section(data.ablation, data))
    if data.folds is not None:
        sections.append(_folds_section(data.folds, data))
    if data.bench is not None:
        bench = data.bench
        paragraphs: list[str | list[Part]] = [[
            "Run ", run_link(data.ui_url, bench.run, bench.run.info.run_name),
            f" ({bench.run.info.run_id}) of `make bench`: every model on every CPU backend, measured in one "
            "process."]]
        if bench.note:
            paragraphs.append(f"Measured: {bench.note}.")
        sections.append(Section("CPU inference backends (make bench)", paragraphs,
                                table=display_table(bench.table, BENCH_COLUMNS),
                                figure=bench_pareto_file if bench.pareto_png is not None else None))
    return sections


def write_report(data: ReportData, output_dir: Path,
                 title: str = "retina-compress run report") -> dict[str, Path]:
    """report.md with its PNGs and the self-contained report.html in ``output_dir``; returns their paths
    (``html``, ``markdown`` and each PNG by file name)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    pareto = pareto_figure(pareto_points(data), output_dir / PARETO_FILE)
    if pareto is not None:
        figures[PARETO_FILE] = pareto
    if data.bench is not None and data.bench.pareto_png is not None:
        figures[BENCH_PARETO_FILE] = output_dir / BENCH_PARETO_FILE
        figures[BENCH_PARETO_FILE].write_bytes(data.bench.pareto_png)
    sections = build_sections(data, PARETO_FILE if pareto else None,
                              BENCH_PARETO_FILE if BENCH_PARETO_FILE in figures else None)
    full_title = f"{title} ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')})"
    markdown, page = output_dir / REPORT_MD, output_dir / REPORT_HTML
    markdown.write_text(render_markdown(full_title, sections))
    images = {name: path.read_bytes() for name, path in figures.items()}
    page.write_text(render_html(full_title, sections, images))
    return {"html": page, "markdown": markdown, **figures}
