"""The resumable Optuna sweeper of ``hparams_search=dr_optuna`` / ``disc_optuna`` (see experiments/sweeps.py).

Hydra accepts a sweeper ``_target_`` only inside the ``hydra_plugins`` namespace package, hence this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import optuna
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from experiments.sweeps import (
    TRIAL_KEY,
    finished_trials,
    remaining_trials,
    resumed_sampler_seed,
    sqlite_path,
    study_done_message,
)

log = logging.getLogger(__name__)


class _ResumableImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        database = sqlite_path(self.storage)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        finished = finished_trials(self.storage, self.study_name)
        total = self.n_trials
        self.n_trials = remaining_trials(total, finished)
        seed = self.config.hydra.sweeper.sampler.get("seed")
        if finished and seed is not None and isinstance(self.sampler, optuna.samplers.BaseSampler):
            self.sampler = instantiate(self.config.hydra.sweeper.sampler, seed=resumed_sampler_seed(seed, finished))
        if finished:
            log.info("Study %s in %s already has %d finished trial(s) of %d: running %d more", self.study_name,
                     self.storage, finished, total, self.n_trials)
        if self.n_trials == 0:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            log.warning(study_done_message(study, total))
            return
        super().sweep(arguments)

    def _configure_trials(self, trials, search_space_distributions, fixed_params) -> Sequence[Sequence[str]]:
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        return [(*trial_overrides, f"{TRIAL_KEY}={trial.number}")
                for trial, trial_overrides in zip(trials, overrides)]


class ResumableOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper: optuna`` with ``_target_`` pointing here (see experiments/conf/hparams_search/)."""

    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, search_space: Any, custom_search_space: str | None,
                 params: Any) -> None:
        self.sweeper = _ResumableImpl(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                                      search_space, custom_search_space, params)
