"""Compose the real Hydra config tree the way ``@hydra.main`` would, for in-process tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "experiments" / "conf"


def compose_config(config_name: str, overrides: list[str], output_dir: Path, keep_hydra: bool = False) -> DictConfig:
    """The composed config with Hydra's runtime fields filled in as a real run would have them (``keep_hydra``:
    with its ``hydra`` node, to check sweeper and launcher settings)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.override_dirname = ",".join(o for o in overrides if not o.startswith(("resume=", "retest=")))
        cfg.hydra.overrides.task = list(overrides)
    HydraConfig().set_config(cfg)
    if keep_hydra:
        return cfg
    with open_dict(cfg):
        del cfg["hydra"]  # @hydra.main hands the job a config without its hydra node
    return cfg


def mlflow_store(project: Path):
    """The project's default MLflow store (SQLite under ``<project>/mlruns``)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def runs_by_name(client, experiment_name: str) -> dict[str, list]:
    """Every run of an experiment, grouped by run name."""
    experiment = client.get_experiment_by_name(experiment_name)
    by_name: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        by_name.setdefault(run.info.run_name, []).append(run)
    return by_name


def assert_shown_value_is_the_newest(client, run_id: str, metric: str) -> None:
    """A retested metric was logged twice, and MLflow shows (at the largest step) the value logged last."""
    history = client.get_metric_history(run_id, metric)
    assert len(history) >= 2
    shown = max(history, key=lambda m: (m.step, m.timestamp))
    assert shown.timestamp == max(m.timestamp for m in history)
    assert client.get_run(run_id).data.metrics[metric] == shown.value
