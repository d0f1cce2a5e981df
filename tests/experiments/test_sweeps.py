"""hparams_search=dr_optuna / disc_optuna: configs, the resumable sweeper, and a real two-trial study."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.sweeps import (
    finished_trials,
    remaining_trials,
    resumed_sampler_seed,
    sqlite_path,
    study_done_message,
)
from experiments.tracking import RunState
from experiments.train_dr import run_dr_distill
from hydra_plugins.retina_compress_sweeper import ResumableOptunaSweeper
from tests.experiments.helpers import CONF_DIR, compose_config, mlflow_store

PROJECT = Path(__file__).resolve().parents[2]
SEARCHES = {"dr_optuna": "train_dr", "disc_optuna": "glaucoma_chain"}


def test_every_search_config_is_listed():
    assert sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml")) == sorted(SEARCHES)


@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_every_search_composes_and_its_sweeper_instantiates(search, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose_config(SEARCHES[search], [f"hparams_search={search}"], tmp_path / "run", keep_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    sweeper = instantiate(cfg.hydra.sweeper)
    # by name: Hydra's plugin scan may have loaded the plugin module a second time
    assert type(sweeper).__qualname__ == ResumableOptunaSweeper.__qualname__
    assert type(sweeper).__module__ == ResumableOptunaSweeper.__module__
    assert sweeper.sweeper.direction == "maximize" and sweeper.sweeper.study_name == search
    # the study is stored next to the MLflow store of this project
    assert sqlite_path(sweeper.sweeper.storage) == tmp_path / "mlruns" / "optuna.db"
    # every searched key exists in the job's config (a typo would make Hydra refuse the trial's overrides)
    job = compose_config(SEARCHES[search], [f"hparams_search={search}"], tmp_path / "run")
    for key in cfg.hydra.sweeper.params:
        node, _, leaf = key.rpartition(".")
        assert leaf in OmegaConf.select(job, node), key


def test_the_dr_search_covers_the_distillation_and_optimiser_settings(tmp_path: Path):
    cfg = compose_config("train_dr", ["hparams_search=dr_optuna"], tmp_path, keep_hydra=True)
    assert set(cfg.hydra.sweeper.params) == {"distill.temperature", "distill.alpha_start", "distill.alpha_end",
                                             "distill.consistency_weight", "optim.lr", "optim.weight_decay"}
    assert list(cfg.stages) == ["student"] and cfg.task_name == "dr-optuna"


def test_the_disc_search_ends_in_a_distilled_stage_so_kd_alpha_matters(tmp_path: Path):
    cfg = compose_config("glaucoma_chain", ["hparams_search=disc_optuna"], tmp_path, keep_hydra=True)
    assert set(cfg.hydra.sweeper.params) == {"optim.lr", "model.segmenter.dropout", "chain.kd.alpha",
                                             "callbacks.hard_example_replay.replay_batch_size"}
    assert list(cfg.chain.arms) == ["kd"] and len(cfg.chain.bases) == 2


def test_sqlite_path_of_storage_urls():
    assert sqlite_path("sqlite:////abs/mlruns/optuna.db") == Path("/abs/mlruns/optuna.db")
    assert sqlite_path("sqlite:///./mlruns/optuna.db") == Path("mlruns/optuna.db")
    assert sqlite_path("postgresql://u@host/db") is None and sqlite_path(None) is None


def test_a_study_counts_finished_trials_but_not_failed_or_running_ones(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert finished_trials(storage, "s") == 0  # no database yet
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    assert finished_trials(storage, "other") == 0  # no such study
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # a failed trial is run again after the fix
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.ask()  # an interrupted (or another worker's) trial stays RUNNING
    assert finished_trials(storage, "s") == 3
    assert remaining_trials(5, 3) == 2 and remaining_trials(2, 3) == 0


def test_a_finished_study_names_its_best_trial_or_says_none_completed():
    study = optuna.create_study(study_name="s", direction="maximize")
    for _ in range(2):
        study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    assert "none completed: every finished trial was pruned" in study_done_message(study, 2)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study.tell(trial, 0.75)
    message = study_done_message(study, 3)
    assert message.startswith("Study s already has its 3 trials (best: trial 2, value 0.75, params {'lr': ")


def test_a_resumed_seeded_sampler_does_not_draw_the_finished_trials_again():
    assert resumed_sampler_seed(42, 0) == 42 and resumed_sampler_seed(42, 3) == 45
    assert resumed_sampler_seed(None, 3) is None  # an unseeded sampler draws afresh anyway


def _search(project: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PROJECT_ROOT": str(project)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "experiments.train_dr", "hparams_search=dr_optuna", "debug=tiny",
                           *overrides], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Iterator[Path]:
    """The folder of a finished tiny dr-distill teacher run: what distill.teacher_checkpoint names in a search."""
    project = tmp_path_factory.mktemp("teacher_project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROJECT_ROOT", str(project))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = project / "outputs" / "dr-distill" / "runs" / "teacher"
        run_dr_distill(compose_config("train_dr", ["debug=tiny", "stages=[teacher]"], run))
    assert RunState.load_or_create(run / "run_state.json", "").stage_done("teacher")
    yield run
    # pytest keeps tmp_path_factory folders to the end of the session
    shutil.rmtree(project, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_a_two_trial_study_runs_on_synthetic_data_and_resumes(tiny_teacher: Path, tmp_path: Path):
    search = [f"distill.teacher_checkpoint={tiny_teacher}"]

    # the first sweep is stopped after one trial: what an interrupted 2-trial search has done
    first = _search(tmp_path, *search, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, first.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert finished_trials(storage, "dr_optuna") == 1

    resumed = _search(tmp_path, *search, "hydra.sweeper.n_trials=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already has 1 finished trial(s) of 2: running 1 more" in resumed.stderr + resumed.stdout
    study = optuna.load_study(study_name="dr_optuna", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in trials] == [0, 1]
    assert trials[0].params != trials[1].params
    assert all(-1.0 <= t.value <= 1.0 for t in trials)  # validation QWK (a tiny model may score below 0)
    assert all(1.0 <= t.params["distill.temperature"] <= 8.0 for t in trials)

    # each trial is an MLflow run (parent + student child) tagged with its trial number, holding its parameters
    client = mlflow_store(tmp_path)
    experiment = client.get_experiment_by_name("dr-optuna")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["optuna_trial"] for r in parents) == ["0", "1"]
    for run in parents:
        trial = trials[int(run.data.tags["optuna_trial"])]
        assert float(run.data.params["distill.temperature"]) == pytest.approx(trial.params["distill.temperature"])
        assert run.data.metrics["student/test/qwk"] == run.data.metrics["student/test/qwk"]  # logged, not NaN

    # a complete study runs nothing more
    again = _search(tmp_path, *search, "hydra.sweeper.n_trials=2")
    assert again.returncode == 0 and "already has its 2 trials" in again.stderr + again.stdout
    assert len(optuna.load_study(study_name="dr_optuna", storage=storage).trials) == 2


@pytest.mark.timeout(1200)
def test_trials_run_in_parallel_processes_with_the_joblib_launcher(tiny_teacher: Path, tmp_path: Path):
    result = _search(tmp_path, f"distill.teacher_checkpoint={tiny_teacher}", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stderr + result.stdout  # the launcher's own report
    study = optuna.load_study(study_name="dr_optuna", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
    client = mlflow_store(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("dr-optuna").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # both processes wrote to the one SQLite store: two finished trial runs, each with its student child
    assert sorted(r.data.tags["optuna_trial"] for r in parents) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 4
