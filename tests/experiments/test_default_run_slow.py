"""The default `make dr-distill` on synthetic data: the student must beat the majority class (~12 min)."""

import json
from pathlib import Path

import pytest

from experiments.train_dr import run_dr_distill
from tests.experiments.helpers import compose_config


@pytest.mark.slow
def test_default_student_beats_the_majority_baseline_on_the_synthetic_test_split(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    run_dir = tmp_path / "run"
    run_dr_distill(compose_config("train_dr", [], run_dir))
    state = json.loads((run_dir / "run_state.json").read_text())
    student = state["stages"]["student"]["test"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    majority = parent.data.metrics["majority_class/test_acc"]
    assert student["test/acc"] > majority + 0.1
    assert student["test/qwk"] > 0.5
