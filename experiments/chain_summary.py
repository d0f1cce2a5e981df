"""The compression chain's plan and its summary table: pure functions over stage results.

A chain starts with one network at the first base (iteration 1), then runs two arms over the smaller
bases: ``prune`` (each iteration prunes the previous one's network and fine-tunes it) and ``kd`` (a fresh
network of each base distilled from iteration 1's). Optional *finishers* then compress chosen stages further:
``qat`` (quantization-aware fine-tuning ending in an int8 ONNX model) and ``share`` (k-means weight sharing
ending in a packed weight file), each a fine-tune of a copy of its source stage's network. The summary has the columns of the two tables of the
pruning/distillation study plus Dice, IoU, false detections and edge-case detection, and names the
*liminal point*: the smallest base that keeps Dice within a tolerance of iteration 1's and still detects
the edge cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

ARMS = ("prune", "kd")
FINISHERS = ("qat", "share")
BASE_ARM = "base"
#: ``chain.finish_after`` value that finishes every stage of the chain
ALL_STAGES = "all"
#: relative Dice tolerance of the liminal point: conf/chain/default.yaml's ``chain.liminal_tolerance``, and the
#: value for runs whose config or params lack it
DEFAULT_LIMINAL_TOLERANCE = 0.05


@dataclass(frozen=True)
class ChainStage:
    """One (arm, base) of the chain; ``source`` is the stage whose network it starts from or learns from."""

    arm: str
    base: int
    source: str | None = None
    prune_ratio: float | None = None

    @property
    def name(self) -> str:
        # a finisher's base is its source's, so its source names it (qat-prune-16 vs qat-kd-16)
        return f"{self.arm}-{self.source}" if self.arm in FINISHERS else f"{self.arm}-{self.base}"


def plan_chain(bases: list[int], arms: list[str], finishers: list[str] = (),
               finish_after: list[str] = ()) -> list[ChainStage]:
    """Iteration 1 at ``bases[0]``, then each arm over ``bases[1:]`` (the prune arm in order, each from the last),
    then each finisher for each stage named in ``finish_after`` (``["all"]``: every stage).

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
    return stages + _plan_finishers(stages, list(finishers), list(finish_after))


def _plan_finishers(stages: list[ChainStage], finishers: list[str], finish_after: list[str]) -> list[ChainStage]:
    unknown = sorted(set(finishers) - set(FINISHERS))
    if unknown:
        raise ValueError(f"chain.finishers has unknown finisher(s) {unknown}: choose from {list(FINISHERS)}")
    if not finishers:
        if finish_after:
            raise ValueError(f"chain.finish_after={finish_after} without chain.finishers: name what to do to "
                             "them, e.g. chain.finishers=[qat,share]")
        return []
    by_name = {stage.name: stage for stage in stages}
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
    """One row per finished stage, in chain order, with cumulative train time per arm.

    Cumulative time counts what it took to obtain the network: for the prune arm, iteration 1 and
    every earlier prune; for a distilled network, iteration 1 (its teacher) and its own training; for a
    finisher, its source's cumulative time and its own fine-tuning.
    """
    rows = []
    cumulative: dict[str, float] = {}
    for stage in stages:
        result = results.get(stage.name)
        if result is None or result.get("status") != "done":
            continue
        row: dict[str, Any] = {"stage": stage.name, "arm": stage.arm, "base": stage.base}
        for column, (section, key) in SUMMARY_COLUMNS.items():
            row[column] = float(result.get(section, {}).get(key, math.nan))
        own_time = 0.0 if math.isnan(row["train_time_s"]) else row["train_time_s"]
        before = cumulative.get(stage.source, 0.0) if stage.source else 0.0
        cumulative[stage.name] = before + own_time
        row["cumulative_train_time_s"] = cumulative[stage.name]
        rows.append(row)
    columns = ["stage", "arm", "base", *SUMMARY_COLUMNS, "cumulative_train_time_s"]
    table = pd.DataFrame(rows, columns=columns)
    reference = table[table["arm"] == BASE_ARM]
    if not reference.empty:
        ref_latency = float(reference["latency_ms"].iloc[0])
        table["latency_vs_base"] = table["latency_ms"] / ref_latency if ref_latency > 0 else math.nan
    return table


def liminal_points(table: pd.DataFrame, tolerance: float = DEFAULT_LIMINAL_TOLERANCE
                   ) -> dict[str, dict[str, Any] | None]:
    """Per arm (and ``"any"``), the smallest base whose Dice is within ``tolerance`` (relative) of iteration 1's
    and whose edge-case detection is too (when edge cases were measured); None where no base qualifies.
    """
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
