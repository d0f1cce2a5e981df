"""hydra-optuna-sweeper, made resumable: ``hparams_search=dr_optuna`` / ``disc_optuna``.

The stock sweeper (hydra-optuna-sweeper 1.3) reopens a stored study (``load_if_exists``) but then runs
``n_trials`` *more* trials, so an interrupted 20-trial search rerun with the same command would end with 20 + k.
Here ``n_trials`` is the study's total: a rerun runs only the trials still missing, and an SQLite storage's folder is
created first (the study lives next to the MLflow store, ``mlruns/optuna.db``, before any trial has made ``mlruns/``).
Each trial also gets its Optuna trial number as the ``optuna_trial`` config key, which the entry points tag their
MLflow runs with. Everything else is the library's.

Hydra only instantiates sweepers from its ``hydra_plugins`` namespace package, so the sweeper class lives in
``hydra_plugins/retina_compress_sweeper``; the decisions it takes are the plain functions here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

#: trial states that used up a place in the study's budget. A failed trial (a bad argument, say) does not: the
#: rerun after the fix still runs them all. RUNNING ones may belong to another worker sharing the storage (or to an
#: interrupted process: those stay RUNNING and the samplers ignore them).
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

#: the config key a trial's number arrives in (primary configs declare it null; hydra/default.yaml keeps it out
#: of the run key, so resuming a trial's run does not depend on it)
TRIAL_KEY = "optuna_trial"


def sqlite_path(storage: str | None) -> Path | None:
    """The database file of an ``sqlite:///<path>`` storage URL, else None."""
    prefix = "sqlite:///"
    if not storage or not str(storage).startswith(prefix):
        return None
    return Path(str(storage)[len(prefix):])


def finished_trials(storage: str | None, study_name: str | None) -> int:
    """Trials of a stored study that finished (complete or pruned); 0 for no storage or a new study."""
    if storage is None or study_name is None:
        return 0
    database = sqlite_path(storage)
    if database is not None and not database.is_file():
        return 0
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # optuna's "no such study" in this storage
        return 0
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def remaining_trials(total: int, finished: int) -> int:
    return max(0, total - finished)


def resumed_sampler_seed(seed: int | None, finished: int) -> int | None:
    """A seeded sampler restarted on a study with ``finished`` trials would draw its first (random start-up)
    points again, i.e. repeat trials already run: a resumed search continues with ``seed + finished``, which is
    still reproducible from the command and the study."""
    return None if seed is None else int(seed) + finished


def study_done_message(study: optuna.Study, total: int) -> str:
    """What a rerun of a search whose study already has its ``total`` finished trials says: its best trial, if
    any completed (a study of only pruned trials has none: ``study.best_trial`` would raise)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        result = f"best: trial {best.number}, value {best.value}, params {best.params}"
    else:
        result = "none completed: every finished trial was pruned"
    return (f"Study {study.study_name} already has its {total} trials ({result}): raise hydra.sweeper.n_trials "
            "to search further, or name a new study with hydra.sweeper.study_name")
