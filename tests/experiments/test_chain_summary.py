import math

import pandas as pd
import pytest

from experiments.chain_summary import liminal_points, plan_chain, summary_table


def test_plan_has_iteration_one_then_the_prune_arm_in_order_then_the_kd_arm():
    stages = plan_chain([64, 32, 16, 8], ["prune", "kd"])
    assert [s.name for s in stages] == ["base-64", "prune-32", "prune-16", "prune-8", "kd-32", "kd-16", "kd-8"]
    assert [s.source for s in stages[1:4]] == ["base-64", "prune-32", "prune-16"]
    assert all(s.prune_ratio == 0.5 for s in stages[1:4])
    assert all(s.source == "base-64" and s.prune_ratio is None for s in stages[4:])


def test_prune_ratio_follows_uneven_bases_and_bad_plans_are_refused():
    stages = plan_chain([64, 16], ["prune"])
    assert stages[1].prune_ratio == pytest.approx(0.75)
    with pytest.raises(ValueError, match="decrease"):
        plan_chain([64, 64], ["prune"])
    with pytest.raises(ValueError, match="unknown arm"):
        plan_chain([64, 32], ["quantize"])


def _result(dice, edge, latency, time_s, size=1e6):
    return {"status": "done",
            "test": {"test/dice": dice, "test/iou": dice - 0.1, "test/edge_case_detection": edge},
            "report": {"model/latency_ms_median": latency, "chain/train_time_s": time_s, "model/size_bytes": size}}


def test_summary_accumulates_train_time_along_each_arm():
    stages = plan_chain([64, 32, 16], ["prune", "kd"])
    results = {"base-64": _result(0.9, 1.0, 100, 10), "prune-32": _result(0.89, 1.0, 30, 5),
               "prune-16": _result(0.8, 0.5, 10, 4), "kd-32": _result(0.88, 1.0, 30, 7),
               "kd-16": {"status": "running"}}
    table = summary_table(stages, results)
    assert list(table["arm"] + "-" + table["base"].astype(str)) == ["base-64", "prune-32", "prune-16", "kd-32"]
    assert list(table["cumulative_train_time_s"]) == [10, 15, 19, 17]
    assert table.loc[1, "latency_vs_base"] == pytest.approx(0.3)
    assert math.isnan(table.loc[0, "precision"])  # not measured: NaN, never a made-up 0


def test_liminal_point_is_the_smallest_base_within_tolerance_that_still_detects_edge_cases():
    table = pd.DataFrame([
        {"arm": "base", "base": 64, "dice": 0.90, "edge_case_detection": 1.0, "latency_ms": 100, "size_bytes": 8},
        {"arm": "prune", "base": 32, "dice": 0.89, "edge_case_detection": 1.0, "latency_ms": 30, "size_bytes": 4},
        {"arm": "prune", "base": 16, "dice": 0.86, "edge_case_detection": 0.96, "latency_ms": 10, "size_bytes": 2},
        {"arm": "prune", "base": 8, "dice": 0.70, "edge_case_detection": 0.5, "latency_ms": 5, "size_bytes": 1},
        {"arm": "kd", "base": 32, "dice": 0.88, "edge_case_detection": 0.9, "latency_ms": 30, "size_bytes": 4},
        {"arm": "kd", "base": 16, "dice": 0.87, "edge_case_detection": 0.8, "latency_ms": 10, "size_bytes": 2},
    ])
    points = liminal_points(table, tolerance=0.05)
    # 0.86 >= 0.95 * 0.90 = 0.855 and 0.96 >= 0.95; base 8 fails both
    assert points["prune"]["base"] == 16
    # kd-16 has the Dice but misses edge cases (0.8 < 0.95); kd-32 too (0.9 < 0.95)
    assert points["kd"] is None
    assert points["any"] == points["prune"]


def test_finishers_follow_the_chain_and_are_named_by_their_source():
    stages = plan_chain([64, 32, 16], ["prune", "kd"], finishers=["qat", "share"], finish_after=["prune-16", "kd-16"])
    finishers = stages[5:]
    assert [s.name for s in finishers] == ["qat-prune-16", "qat-kd-16", "share-prune-16", "share-kd-16"]
    assert all(s.base == 16 for s in finishers) and finishers[1].source == "kd-16"
    every = plan_chain([64, 32], ["prune"], finishers=["share"], finish_after=["all"])
    assert [s.name for s in every] == ["base-64", "prune-32", "share-base-64", "share-prune-32"]


def test_finishers_need_stages_the_chain_runs():
    with pytest.raises(ValueError, match="finish_after"):
        plan_chain([64, 32], ["prune"], finishers=["qat"])
    with pytest.raises(ValueError, match="kd-32"):
        plan_chain([64, 32], ["prune"], finishers=["qat"], finish_after=["kd-32"])
    with pytest.raises(ValueError, match="unknown finisher"):
        plan_chain([64, 32], ["prune"], finishers=["prune"], finish_after=["prune-32"])


def test_finish_after_without_finishers_is_an_error():
    with pytest.raises(ValueError, match="without chain.finishers"):
        plan_chain([64, 32], ["prune"], finish_after=["prune-32"])
