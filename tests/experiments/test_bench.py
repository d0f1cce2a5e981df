from pathlib import Path

from hydra.utils import instantiate

from experiments.bench import benchmark
from tests.experiments.helpers import compose_config


def test_bench_measures_every_model_in_one_run_with_ratios_to_the_teacher(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_config("bench", ["debug=tiny", "bench.runs=2", "bench.warmup=0", "bench.pipeline_runs=1"],
                         tmp_path / "bench")
    dm = instantiate(cfg.data)
    dm.setup()
    table = benchmark(cfg, dm)
    assert [m.split(" (")[0] for m in table["model"]] == [
        "teacher", "student CNN+CBAM", "student + topological branch", "topological features alone",
        "full pipeline",
    ]
    assert table.loc[0, "latency_vs_teacher"] == 1.0
    assert (table["latency_ms_median"] > 0).all() and (table["runs"] >= 1).all()
    cnn, fused = table.iloc[1], table.iloc[2]
    assert fused["params"] > cnn["params"]  # the topological MLP adds weights
    assert table.iloc[4]["latency_ms_median"] > table.iloc[3]["latency_ms_median"]  # pipeline includes topology
