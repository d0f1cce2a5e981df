import math

import pandas as pd
import pytest

from experiments.chain_summary import (
    describe_comparisons,
    describe_failures,
    liminal_points,
    plan_chain,
    summary_table,
)


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


# --- comparison stages (chain.compare) ---------------------------------------------------------------------
def test_comparison_stages_follow_the_arms_have_no_base_and_precede_the_finishers():
    stages = plan_chain([64, 32], ["prune"], finishers=["qat"], finish_after=["all"], compare=["transformer"])
    assert [s.name for s in stages] == ["base-64", "prune-32", "compare-transformer", "qat-base-64",
                                        "qat-prune-32"]
    comparison = stages[2]
    assert comparison.arm == "compare" and comparison.base is None and comparison.model == "transformer"
    assert comparison.source is None and comparison.prune_ratio is None


def test_finishers_refuse_comparison_stages_and_compare_names_must_be_unique():
    with pytest.raises(ValueError, match=r"comparison stage\(s\) \['compare-transformer'\]"):
        plan_chain([64], [], finishers=["qat"], finish_after=["compare-transformer"], compare=["transformer"])
    with pytest.raises(ValueError, match="more than once"):
        plan_chain([64], [], compare=["transformer", "transformer"])


def test_summary_has_the_comparison_row_without_base_and_liminal_points_ignore_it():
    stages = plan_chain([64, 32], ["prune"], compare=["transformer"])
    # the transformer has iteration 1's Dice at the smallest latency: were it a candidate, it would win "any"
    results = {"base-64": _result(0.90, 1.0, 100, 10, size=8e6),
               "prune-32": _result(0.89, 1.0, 30, 5, size=2e6),
               "compare-transformer": _result(0.91, 1.0, 8, 3, size=14e6)}
    table = summary_table(stages, results)
    assert list(table["stage"]) == ["base-64", "prune-32", "compare-transformer"]
    row = table.iloc[2]
    assert row["arm"] == "compare" and pd.isna(row["base"])
    assert list(table["base"].iloc[:2]) == [64, 32] and str(table["base"].dtype) == "Int64"
    assert row["latency_vs_base"] == pytest.approx(8 / 100)
    assert row["cumulative_train_time_s"] == 3  # its own training only: it starts from no other stage
    points = liminal_points(table, tolerance=0.05)
    assert "compare" not in points
    assert points["any"]["stage"] == "prune-32" and points["prune"]["stage"] == "prune-32"
    text = describe_comparisons(table)
    assert "compare-transformer: Dice 0.9100, 8.00 ms, 14.00 MB" in text
    assert "iteration 1, base-64: Dice 0.9000, 100.00 ms, 8.00 MB" in text
    assert describe_comparisons(table[table["arm"] != "compare"]) == ""


def test_liminal_points_of_a_summary_csv_with_a_comparison_row(tmp_path):
    """make report and make predict read the summary back from its CSV, where a comparison's base is empty."""
    stages = plan_chain([64, 32], ["kd"], compare=["transformer"])
    results = {"base-64": _result(0.90, 1.0, 100, 10), "kd-32": _result(0.88, 1.0, 30, 7),
               "compare-transformer": _result(0.95, 1.0, 5, 3)}
    summary_table(stages, results).to_csv(tmp_path / "summary.csv", index=False)
    table = pd.read_csv(tmp_path / "summary.csv")
    assert table["base"].isna().tolist() == [False, False, True]
    points = liminal_points(table, tolerance=0.05)
    assert points["any"]["stage"] == "kd-32" and points["any"]["base"] == 32


def test_a_failed_finisher_is_a_row_with_its_reason_and_never_a_liminal_point():
    stages = plan_chain([64, 32], ["prune"], ["qat", "share"], ["prune-32"])
    reason = "the int8 model drifts from its fp32 network on 12 validation images: Dice 0.9 < min_mask_dice=0.98"
    results = {"base-64": _result(0.9, 1.0, 100, 10), "prune-32": _result(0.89, 1.0, 30, 5),
               "qat-prune-32": {"status": "failed", "failure": "parity", "error": reason,
                                "parity": {"quant/mask_dice_int8_vs_fp32": 0.9}},
               "share-prune-32": _result(0.88, 1.0, 30, 2)}
    table = summary_table(stages, results).set_index("stage")
    assert list(table.index) == ["base-64", "prune-32", "qat-prune-32", "share-prune-32"]
    assert list(table["status"]) == ["done", "done", "failed", "done"]
    failed = table.loc["qat-prune-32"]
    assert failed["note"] == reason and math.isnan(failed["dice"]) and math.isnan(failed["cumulative_train_time_s"])
    assert table.loc["share-prune-32", "cumulative_train_time_s"] == 17
    assert liminal_points(table.reset_index(), 0.05)["any"]["stage"] == "prune-32"
    assert "qat" not in liminal_points(table.reset_index(), 0.05)
    assert describe_failures(table.reset_index()) == (
        "Failed stages (their deployable file failed its parity check and is not to be used; rerun with resume "
        f"to retry them):\n- qat-prune-32: {reason}")
    assert describe_failures(table[table["status"] == "done"].reset_index()) == ""
