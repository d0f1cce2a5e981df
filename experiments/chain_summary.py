"""The compression chain's plan and its summary table: pure functions over stage results.

A chain starts with one network at the first base (iteration 1), then runs two arms over the smaller
bases: ``prune`` (each iteration prunes the previous one's network and fine-tunes it) and ``kd`` (a fresh
network of each base distilled from iteration 1's). Optional *finishers* then compress chosen stages further:
``qat`` (quantization-aware fine-tuning ending in an int8 ONNX model) and ``share`` (k-means weight sharing
ending in a packed weight file), each a fine-tune of a copy of its source stage's network. The summary has the columns of the two tables of the
pruning/distillation study plus Dice, IoU, false detections and edge-case detection, and names the
*liminal point*: the smallest base that keeps Dice within a tolerance of iteration 1's and still detects
the edge cases.

*Comparison* stages (``chain.compare``, arm ``compare``, named ``compare-<name>``) train another segmenter
(``model.compare.<name>``, e.g. the transformer of ``experiment=disc_transformer``) on the same data, split
and metrics. They are rows of the summary (size, latency, ``latency_vs_base``) but no compression
step: they have no base, are never a liminal point, and are neither pruned nor finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

ARMS = ("prune", "kd")
FINISHERS = ("qat", "share")
BASE_ARM = "base"
#: the arm of a comparison stage (``chain.compare``): another architecture, not a compression step
COMPARE_ARM = "compare"
#: ``chain.finish_after`` value that finishes every stage of the chain
ALL_STAGES = "all"
#: run_state.json statuses of a stage that the summary shows (a failed one: a finisher whose deployable file
#: failed its parity check, see experiments.runner.run_finisher)
DONE, FAILED = "done", "failed"
#: relative Dice tolerance of the liminal point: conf/chain/default.yaml's ``chain.liminal_tolerance``, and the
#: value for runs whose config or params lack it
DEFAULT_LIMINAL_TOLERANCE = 0.05


@dataclass(frozen=True)
class ChainStage:
    """One (arm, base) of the chain; ``source`` is the stage whose network it starts from or learns from.

    A comparison stage has no base (None) and names its segmenter config instead: ``model`` is its
    ``model.compare`` key.
    """

    arm: str
    base: int | None
    source: str | None = None
    prune_ratio: float | None = None
    model: str | None = None

    @property
    def name(self) -> str:
        if self.arm == COMPARE_ARM:
            return f"{COMPARE_ARM}-{self.model}"
        # a finisher's base is its source's, so its source names it (qat-prune-16 vs qat-kd-16)
        return f"{self.arm}-{self.source}" if self.arm in FINISHERS else f"{self.arm}-{self.base}"


def plan_chain(bases: list[int], arms: list[str], finishers: list[str] = (),
               finish_after: list[str] = (), compare: list[str] = ()) -> list[ChainStage]:
    """Iteration 1 at ``bases[0]``, then each arm over ``bases[1:]`` (the prune arm in order, each from the last),
    then a comparison stage per ``compare`` name (``compare-<name>``, in order), then each finisher for each
    stage named in ``finish_after`` (``["all"]``: every compression stage; comparisons are not finished).

    The prune ratio of each step is ``1 - base / previous base`` (0.5 for 64 -> 32), so a pruned network
    ends with exactly the widths of a fresh network of its base.
    """
    bases = [int(b) for b in bases]
    if not bases or any(b < 1 for b in bases):
        raise ValueError(f"chain.bases={bases}: give positive widths, the first one trained from scratch")
    if any(later >= earlier for earlier, later in zip(bases, bases[1:])):
        raise ValueError(f"chain.bases={bases} must decrease (e.g. [64, 32, 16, 8])")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"chain.arms has unknown arm(s) {unknown}: choose from {list(ARMS)}")
    first = ChainStage(BASE_ARM, bases[0])
    stages = [first]
    if "prune" in arms:
        previous = first
        for base in bases[1:]:
            stage = ChainStage("prune", base, source=previous.name, prune_ratio=1.0 - base / previous.base)
            stages.append(stage)
            previous = stage
    if "kd" in arms:
        stages += [ChainStage("kd", base, source=first.name) for base in bases[1:]]
    comparisons = _plan_comparisons(list(compare))
    return stages + comparisons + _plan_finishers(stages, list(finishers), list(finish_after), comparisons)


def _plan_comparisons(names: list[str]) -> list[ChainStage]:
    bad = [name for name in names if not isinstance(name, str) or not name or "/" in name]
    if bad:
        raise ValueError(f"chain.compare={names}: give the names of model.compare entries (e.g. "
                         f"[transformer]), not {bad}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"chain.compare={names} names {repeated} more than once: each comparison runs once")
    return [ChainStage(COMPARE_ARM, None, model=name) for name in names]


def _plan_finishers(stages: list[ChainStage], finishers: list[str], finish_after: list[str],
                    comparisons: list[ChainStage] = ()) -> list[ChainStage]:
    unknown = sorted(set(finishers) - set(FINISHERS))
    if unknown:
        raise ValueError(f"chain.finishers has unknown finisher(s) {unknown}: choose from {list(FINISHERS)}")
    if not finishers:
        if finish_after:
            raise ValueError(f"chain.finish_after={finish_after} without chain.finishers: name what to do to "
                             "them, e.g. chain.finishers=[qat,share]")
        return []
    by_name = {stage.name: stage for stage in stages}
    compared = sorted({stage.name for stage in comparisons} & set(finish_after))
    if compared:
        raise ValueError(f"chain.finish_after names the comparison stage(s) {compared}: the qat / share "
                         "finishers compress the chain's VGG-style networks only; drop them from "
                         "chain.finish_after (its [all] leaves comparison stages out)")
    names = list(by_name) if ALL_STAGES in finish_after else list(finish_after)
    if not names:
        raise ValueError(f"chain.finishers={finishers} needs chain.finish_after: the stages to finish, e.g. "
                         f"[prune-16] or [{ALL_STAGES}]; this chain has {list(by_name)}")
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(f"chain.finish_after names {missing}, which this chain does not run: choose from "
                         f"{list(by_name)} (or {ALL_STAGES})")
    return [ChainStage(finisher, by_name[name].base, source=name) for finisher in finishers for name in names]


#: summary column -> (where in a stage result it comes from, key)
SUMMARY_COLUMNS: dict[str, tuple[str, str]] = {
    "params": ("report", "model/params"),
    "size_bytes": ("report", "model/size_bytes"),
    "epochs": ("report", "chain/epochs"),
    "epochs_to_sufficient": ("report", "chain/epochs_to_sufficient"),
    "train_time_s": ("report", "chain/train_time_s"),
    "latency_ms": ("report", "model/latency_ms_median"),
    "accuracy": ("test", "test/pixel_accuracy"),
    "precision": ("test", "test/precision"),
    "recall": ("test", "test/recall"),
    "f1": ("test", "test/f1"),
    "dice": ("test", "test/dice"),
    "iou": ("test", "test/iou"),
    "hd95": ("test", "test/hd95"),
    "false_detections": ("test", "test/false_detections"),
    "edge_case_detection": ("test", "test/edge_case_detection"),
}


def summary_table(stages: list[ChainStage], results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per finished or failed stage, in chain order, with cumulative train time per arm.

    ``status`` is ``done`` or ``failed``; a failed stage (a finisher whose deployable file failed its parity
    check) has its reason as ``note`` and no measurements (NaN). Cumulative time counts what it took to obtain
    the network: for the prune arm, iteration 1 and every earlier prune; for a distilled network, iteration 1
    (its teacher) and its own training; for a finisher, its source's cumulative time and its own fine-tuning;
    for a comparison, its own training.
    ``base`` is a nullable integer column: a comparison stage has none (<NA>, an empty cell in the CSV).
    """
    rows = []
    cumulative: dict[str, float] = {}
    for stage in stages:
        result = results.get(stage.name)
        status = None if result is None else result.get("status")
        if status not in (DONE, FAILED):
            continue
        row: dict[str, Any] = {"stage": stage.name, "arm": stage.arm, "base": stage.base, "status": status}
        for column, (section, key) in SUMMARY_COLUMNS.items():
            row[column] = float(result.get(section, {}).get(key, math.nan))
        if status == FAILED:
            # nothing deployable came of it: no time to add up along its arm
            row["cumulative_train_time_s"] = math.nan
            row["note"] = str(result.get("error", "failed"))
            rows.append(row)
            continue
        own_time = 0.0 if math.isnan(row["train_time_s"]) else row["train_time_s"]
        before = cumulative.get(stage.source, 0.0) if stage.source else 0.0
        cumulative[stage.name] = before + own_time
        row["cumulative_train_time_s"] = cumulative[stage.name]
        row["note"] = ""
        rows.append(row)
    columns = ["stage", "arm", "base", "status", *SUMMARY_COLUMNS, "cumulative_train_time_s", "note"]
    table = pd.DataFrame(rows, columns=columns)
    table["base"] = table["base"].astype("Int64")
    reference = table[table["arm"] == BASE_ARM]
    if not reference.empty:
        ref_latency = float(reference["latency_ms"].iloc[0])
        table["latency_vs_base"] = table["latency_ms"] / ref_latency if ref_latency > 0 else math.nan
    return table


def liminal_points(table: pd.DataFrame, tolerance: float = DEFAULT_LIMINAL_TOLERANCE
                   ) -> dict[str, dict[str, Any] | None]:
    """Per arm (and ``"any"``), the smallest base whose Dice is within ``tolerance`` (relative) of iteration 1's
    and whose edge-case detection is too (when edge cases were measured); None where no base qualifies.
    Comparison stages are no candidates: they are another architecture, not a compression of iteration 1.
    """
    table = table[table["arm"] != COMPARE_ARM]
    if "status" in table:  # summaries written before failed stages were listed have no status: all done
        table = table[table["status"] == DONE]
    reference = table[table["arm"] == BASE_ARM]
    if reference.empty:
        return {}
    ref = reference.iloc[0]
    min_dice = (1.0 - tolerance) * float(ref["dice"])
    ref_edge = float(ref["edge_case_detection"])
    min_edge = (1.0 - tolerance) * ref_edge if not math.isnan(ref_edge) else None

    def qualifies(row: pd.Series) -> bool:
        edge_ok = min_edge is None or (not math.isnan(row["edge_case_detection"])
                                       and row["edge_case_detection"] >= min_edge)
        return bool(row["dice"] >= min_dice and edge_ok)

    points: dict[str, dict[str, Any] | None] = {}
    for arm in [BASE_ARM, *ARMS, *FINISHERS, "any"]:
        rows = table if arm == "any" else table[table["arm"] == arm]
        if rows.empty:
            continue
        good = rows[rows.apply(qualifies, axis=1)]
        if good.empty:
            points[arm] = None
            continue
        # smallest base; among equals (the two arms at one base) the better Dice
        best = good.sort_values(["base", "dice"], ascending=[True, False]).iloc[0]
        # tables written before finishers existed have no stage column
        stage = best["stage"] if "stage" in best else f"{best['arm']}-{int(best['base'])}"
        points[arm] = {"stage": stage, "arm": best["arm"], "base": int(best["base"]), "dice": float(best["dice"]),
                       "edge_case_detection": float(best["edge_case_detection"]),
                       "latency_ms": float(best["latency_ms"]), "size_bytes": float(best["size_bytes"])}
    return points


def describe_liminal(points: dict[str, dict[str, Any] | None], tolerance: float) -> str:
    """Markdown lines naming the liminal point of each arm."""
    lines = [f"Liminal point (smallest base with Dice within {tolerance:.0%} of iteration 1 and edge cases "
             "still detected):"]
    for arm, point in points.items():
        if arm == BASE_ARM:
            continue
        if point is None:
            lines.append(f"- {arm}: none of its bases qualifies")
        else:
            lines.append(f"- {arm}: {point['stage']} (Dice {point['dice']:.4f}, edge-case detection "
                         f"{point['edge_case_detection']:.3f}, {point['latency_ms']:.2f} ms, "
                         f"{point['size_bytes'] / 1e6:.2f} MB)")
    return "\n".join(lines)


def describe_failures(table: pd.DataFrame) -> str:
    """Markdown lines naming the failed stages of a summary table and why (empty without any)."""
    rows = table[table["status"] == FAILED] if "status" in table else table.iloc[:0]
    if rows.empty:
        return ""
    lines = ["Failed stages (their deployable file failed its parity check and is not to be used; rerun with "
             "resume to retry them):"]
    lines += [f"- {row.stage}: {row.note}" for row in rows.itertuples()]
    return "\n".join(lines)


def describe_comparisons(table: pd.DataFrame) -> str:
    """Markdown lines for the comparison stages of a summary table (empty without any): each one's Dice,
    latency, size and parameters, beside iteration 1's."""
    rows = table[table["arm"] == COMPARE_ARM]
    if rows.empty:
        return ""
    reference = table[table["arm"] == BASE_ARM]
    lines = ["Comparison stages (another architecture on the same data and split; not compression steps, so "
             "never a liminal point):"]
    for row in rows.itertuples():
        line = (f"- {row.stage}: Dice {row.dice:.4f}, {row.latency_ms:.2f} ms, "
                f"{row.size_bytes / 1e6:.2f} MB, {row.params:,.0f} parameters")
        if not reference.empty:
            ref = reference.iloc[0]
            line += (f" (iteration 1, {ref['stage']}: Dice {ref['dice']:.4f}, {ref['latency_ms']:.2f} ms, "
                     f"{ref['size_bytes'] / 1e6:.2f} MB, {ref['params']:,.0f} parameters)")
        lines.append(line)
    return "\n".join(lines)
