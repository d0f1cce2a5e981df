"""The backend benchmark on tiny generated networks: rows, sizes, quality, ratios, targets, plot, CPU facts.

Timings are never asserted here: they belong to the benchmark, not to a test on a shared machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from compression.benchmark import (
    BACKENDS,
    CPU_FLAGS,
    WEIGHT_SHARED,
    add_ratios,
    benchmark_backends,
    check_targets,
    contention_warning,
    cpu_description,
    grading_quality,
    markdown_report,
    pareto_front,
    pareto_plot,
    segmentation_quality,
    torch_threads,
)
from tests.compression.helpers import tiny_unet

SIZE = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"






class TinyGrader(nn.Module):
    """A conv classifier over 5 grades with enough weights (> 128 per layer) for sharing and int8."""

    def __init__(self, extra: nn.Module | None = None):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      extra or nn.Identity(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def segmentation_batches(count: int = 2) -> list:
    generator = torch.Generator().manual_seed(1)
    return [((torch.rand(3, 3, SIZE, SIZE, generator=generator),),
             (torch.rand(3, 1, SIZE, SIZE, generator=generator) > 0.6).float()) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ quality
def test_segmentation_quality_matches_hand_counts():
    # image 1: prediction 2 px, target 3 px, overlap 2 -> Dice 4/5; image 2: both empty -> Dice 1 (suite convention)
    logits = torch.full((2, 1, 2, 2), -5.0)
    logits[0, 0, 0, 0] = logits[0, 0, 0, 1] = 5.0
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, :] = 1
    masks[0, 0, 1, 0] = 1
    reference = torch.full((2, 1, 2, 2), -5.0)
    reference[0, 0, 0, 0] = 5.0  # 1 px, inside the prediction: agreement Dice 2*1 / (2 + 1)
    scores = segmentation_quality(logits, masks, reference)
    assert scores["dice"] == pytest.approx(2 * 2 / (2 + 3))  # pooled: the empty image adds no pixel
    assert scores["dice_per_image"] == pytest.approx((0.8 + 1.0) / 2)
    assert scores["agreement"] == pytest.approx(2 / 3)


def test_segmentation_quality_thresholds_at_the_given_probability():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2)  # sigmoid 0.5, 0.73, 0.88, 0.95
    masks = torch.ones(1, 1, 2, 2)
    assert segmentation_quality(logits, masks, threshold=0.5)["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert segmentation_quality(logits, masks, threshold=0.9)["dice"] == pytest.approx(2 * 1 / (2 * 1 + 3))


def test_grading_quality_is_quadratic_kappa_and_top1_agreement():
    labels = torch.tensor([0, 1, 2, 3])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 5).float()
    reference = torch.nn.functional.one_hot(torch.tensor([0, 1, 3, 2]), 5).float()
    scores = grading_quality(logits, labels, reference)
    # by hand: weights (i-j)^2/16; observed disagreement only (3 -> 2): 1/16 / 4; expected from the marginals
    observed = (1 / 16) / 4
    rows, cols = [0.25, 0.25, 0.25, 0.25, 0], [0.25, 0.25, 0.5, 0, 0]
    expected = sum(rows[i] * cols[j] * (i - j) ** 2 / 16 for i in range(5) for j in range(5))
    assert scores["qwk"] == pytest.approx(1 - observed / expected)
    assert scores["agreement"] == pytest.approx(0.75)  # images 1, 2 and 4 get the reference's grade, image 3 not


# ---------------------------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def unet_rows(tmp_path_factory) -> tuple[list[dict], Path]:
    workdir = tmp_path_factory.mktemp("bench")
    calibration = [(torch.rand(2, 3, SIZE, SIZE),) for _ in range(2)]
    # timed at 64x64, scored at 32x32: one export with symbolic height and width serves both
    rows = benchmark_backends(tiny_unet(), (torch.rand(1, 3, 64, 64),), calibration, workdir, runs=2, warmup=0,
                              threads=1, name="base-4", eval_batches=segmentation_batches(), task="segmentation",
                              dynamic_spatial=True, exporter="torchscript")
    return rows, workdir


def test_every_backend_and_the_weight_shared_file_get_a_row(unet_rows):
    rows, workdir = unet_rows
    assert [row["backend"] for row in rows] == [*BACKENDS, WEIGHT_SHARED]
    assert all(row["error"] == "" for row in rows), [row["error"] for row in rows]
    for row in rows:
        if row["backend"] != WEIGHT_SHARED:
            assert row["runs"] == 2 and row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_max"]
    assert {p.name for p in workdir.iterdir()} == {"base-4_fp32.onnx", "base-4_int8.onnx", "base-4_shared_k16.rcws"}


def test_sizes_are_the_files_written_and_shrink_as_expected(unet_rows):
    rows, workdir = unet_rows
    first = rows[0]
    assert first["params"] == sum(p.numel() for p in tiny_unet().parameters())
    assert first["onnx_fp32_bytes"] == (workdir / "base-4_fp32.onnx").stat().st_size
    assert first["onnx_int8_bytes"] == (workdir / "base-4_int8.onnx").stat().st_size
    assert first["shared_bytes"] == (workdir / "base-4_shared_k16.rcws").stat().st_size
    # ~100k fp32 weights: int8 stores a quarter of the bytes, 4-bit indices an eighth
    assert first["onnx_int8_bytes"] < 0.5 * first["onnx_fp32_bytes"]
    assert first["shared_bytes"] < 0.2 * first["state_dict_bytes"]
    by_backend = {row["backend"]: row for row in rows}
    assert by_backend["ort_int8"]["file_bytes"] == first["onnx_int8_bytes"]
    assert by_backend["eager"]["file_bytes"] == first["state_dict_bytes"]
    assert by_backend["bf16"]["file_bytes"] < 0.6 * first["state_dict_bytes"]  # bf16 weights: half the bytes
    assert first["macs"] > 0 and first["input_shape"] == "1x3x64x64"


def test_quality_of_each_backend_is_measured_against_eager(unet_rows):
    rows, _ = unet_rows
    by_backend = {row["backend"]: row for row in rows}
    eager = by_backend["eager"]
    assert eager["quality_metric"] == "dice" and eager["agreement"] == 1.0 and eager["quality_delta"] == 0.0
    # fp32 backends compute the same function: the masks agree (up to a pixel or two at the threshold)
    for backend in ("channels_last", "ort_fp32"):
        assert by_backend[backend]["agreement"] > 0.98
        assert by_backend[backend]["quality"] == pytest.approx(eager["quality"], abs=0.02)
    for backend in ("bf16", "ort_int8", WEIGHT_SHARED):
        row = by_backend[backend]
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["quality_delta"] == pytest.approx(row["quality"] - eager["quality"])


def test_an_unsupported_layer_fails_only_the_int8_row(tmp_path: Path):
    torch.manual_seed(0)
    net = TinyGrader(extra=nn.PReLU(16)).eval()  # PReLU has a weight the int8 path cannot quantize
    batches = [((torch.rand(4, 3, 16, 16),), torch.tensor([0, 1, 2, 3]))]
    rows = benchmark_backends(net, (torch.rand(1, 3, 16, 16),), [torch.rand(4, 3, 16, 16)], tmp_path, runs=1,
                              warmup=0, threads=1, name="prelu", eval_batches=batches, task="grading",
                              exporter="torchscript")
    errors = {row["backend"]: row["error"] for row in rows}
    assert "UnsupportedModelError" in errors["ort_int8"] and "PReLU" in errors["ort_int8"]
    assert all(not error for backend, error in errors.items() if backend != "ort_int8")
    assert math.isnan(rows[0]["onnx_int8_bytes"]) and rows[0]["quality_metric"] == "qwk"


def test_calibration_with_zero_images_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="calibration with zero images for 'tiny'"):
        benchmark_backends(TinyGrader().eval(), (torch.rand(1, 3, 16, 16),), [], tmp_path, runs=1, warmup=0,
                           threads=1, name="tiny", exporter="torchscript")
    assert not any(tmp_path.iterdir())  # checked before anything is exported


def test_threads_are_set_for_the_benchmark_and_restored():
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads=0"), torch_threads(0):
        pass


def test_a_busy_cpu_is_warned_about():
    # 2 cores: this process's own load (up to 1) is allowed, any more competes with the benchmark's threads
    assert contention_warning(threads=2, load_average=0.9, cores=2) is None
    assert "load average 1.50 on 2 cores" in contention_warning(threads=2, load_average=1.5, cores=2)
    assert contention_warning(threads=1, load_average=1.9, cores=2) is None
    assert "bench.threads=1" in contention_warning(threads=1, load_average=2.5, cores=2)


# ---------------------------------------------------------------------------------------- the table
def hand_table() -> pd.DataFrame:
    """Two disc models and the DR student with round numbers (ms, Dice/QWK, bytes)."""
    rows = [
        ("disc", "base-64", "eager", 900.0, 0.90, 100e6, 100e6),
        ("disc", "base-64", "bf16", 400.0, 0.90, 50e6, 100e6),
        ("disc", "base-64", "ort_int8", 250.0, 0.89, 25e6, 100e6),
        ("disc", "base-64", WEIGHT_SHARED, math.nan, 0.895, 12.5e6, 100e6),
        ("disc", "prune-16", "eager", 60.0, 0.88, 6e6, 6e6),
        ("disc", "prune-16", "ort_int8", 40.0, 0.86, 1.5e6, 6e6),
        ("dr", "teacher", "eager", 50.0, 0.95, 30e6, 30e6),
        ("dr", "student", "eager", 20.0, 0.93, 16e6, 16e6),
        ("dr", "student", "ort_int8", 5.0, 0.90, 4e6, 16e6),
    ]
    table = pd.DataFrame(rows, columns=["pipeline", "model", "backend", "latency_ms_median", "quality",
                                        "file_bytes", "state_dict_bytes"])
    table["quality_metric"] = table["pipeline"].map({"disc": "dice", "dr": "qwk"})
    return table


def test_ratios_divide_by_the_models_own_eager_and_the_pipeline_reference():
    table = add_ratios(hand_table())
    ratios = table.set_index(["model", "backend"])
    assert ratios.loc[("base-64", "ort_int8"), "latency_vs_fp32"] == pytest.approx(250 / 900)
    assert ratios.loc[("prune-16", "ort_int8"), "latency_vs_fp32"] == pytest.approx(40 / 60)
    assert ratios.loc[("prune-16", "ort_int8"), "latency_vs_reference"] == pytest.approx(40 / 900)
    assert ratios.loc[("student", "ort_int8"), "latency_vs_reference"] == pytest.approx(5 / 50)  # the teacher
    assert ratios.loc[("student", "eager"), "latency_vs_fp32"] == 1.0
    assert math.isnan(ratios.loc[("base-64", WEIGHT_SHARED), "latency_vs_fp32"])
    # another reference for the disc pipeline
    other = add_ratios(hand_table(), {"disc": "prune-16", "dr": "student"}).set_index(["model", "backend"])
    assert other.loc[("base-64", "eager"), "latency_vs_reference"] == pytest.approx(900 / 60)
    assert other.loc[("teacher", "eager"), "latency_vs_reference"] == pytest.approx(50 / 20)


def test_targets_are_checked_from_the_table():
    results = {t["key"]: t for t in check_targets(hand_table())}
    assert len(results) == 7
    speedup = results["disc_low_precision_speedup"]
    assert speedup["measured"] == pytest.approx(900 / 250) and speedup["met"]  # the faster of int8 and bf16
    assert results["pruned_int8_speedup"]["measured"] == pytest.approx(900 / 40)
    assert results["pruned_int8_speedup"]["met"]
    assert results["pruned_int8_dice_loss"]["measured"] == pytest.approx((0.90 - 0.86) / 0.90)
    assert results["pruned_int8_dice_loss"]["met"]  # 4.4% <= 5%
    assert results["shared_size_reduction"]["measured"] == pytest.approx(8.0) and results["shared_size_reduction"]["met"]
    assert results["shared_dice_loss"]["measured"] == pytest.approx(0.005) and results["shared_dice_loss"]["met"]
    assert results["student_int8_latency_fraction"]["measured"] == pytest.approx(0.25)
    assert results["student_int8_latency_fraction"]["met"]
    qwk = results["student_int8_qwk_loss"]
    assert qwk["measured"] == pytest.approx(0.03) and not qwk["met"] and "missed by 0.01" in qwk["note"]


def test_a_target_without_its_rows_is_reported_missed_not_met():
    table = hand_table()
    results = {t["key"]: t for t in check_targets(table[table["model"] != "prune-16"])}
    assert not results["pruned_int8_speedup"]["met"] and "not measured" in results["pruned_int8_speedup"]["note"]
    # a slower int8 misses by the right amount: 900 / 600 = 1.5x against 3x
    slow = hand_table()
    slow.loc[slow["backend"].isin(["ort_int8", "bf16"]) & slow["model"].eq("base-64"), "latency_ms_median"] = 600.0
    missed = {t["key"]: t for t in check_targets(slow)}["disc_low_precision_speedup"]
    assert missed["measured"] == pytest.approx(1.5) and not missed["met"] and "missed by 1.5x" in missed["note"]


def test_pareto_front_keeps_only_undominated_points():
    latency = [10, 20, 30, 15, 40, 10]
    quality = [0.5, 0.8, 0.7, 0.8, 0.9, 0.4]
    # (15, 0.8) beats (20, 0.8); (30, 0.7) is beaten by (15, 0.8); (10, 0.4) by (10, 0.5)
    assert pareto_front(latency, quality).tolist() == [True, False, False, True, True, False]


def test_pareto_plot_writes_a_png(tmp_path: Path):
    path = pareto_plot(add_ratios(hand_table()), tmp_path / "plots" / "pareto.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000


def test_markdown_report_holds_table_targets_and_machine(tmp_path: Path):
    table = add_ratios(hand_table()).assign(params=1000, macs=2e6, error="")
    text = markdown_report(table, check_targets(table), {"cpu_model": "Fake CPU"}, threads=2, runs=30, warmup=5)
    assert "latency over 30 timed runs after 5 warm-up runs" in text and "| base-64 " in text and "| MISSED " in text and "- cpu_model: Fake CPU" in text
    assert "- benchmark threads: 2" in text and "nan" not in text.split("## Targets")[0]


def test_cpu_description_reads_flags_present_and_absent(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake EPYC 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\n"
                       "processor\t: 1\nmodel name\t: Fake EPYC 9000\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    description = cpu_description(cpuinfo)
    assert description["cpu_model"] == "Fake EPYC 9000"
    assert description["flags_present"] == "avx2 avx512f avx512_vnni"
    assert description["flags_absent"] == "avx512_bf16 amx_tile amx_int8 amx_bf16"
    assert {"logical_cores", "load_average_1min", "torch_threads", "torch_cpu_capability", "onnxruntime"} <= set(
        description)
    unknown = cpu_description(tmp_path / "missing")
    assert unknown["flags_present"] == unknown["flags_absent"] == "unknown"
    assert set(CPU_FLAGS) == set(description["flags_present"].split()) | set(description["flags_absent"].split())
