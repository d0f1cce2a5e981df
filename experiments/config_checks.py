"""The settings a user overrides on the command line, typed and range-checked before anything starts.

Hydra composes whatever it is given: ``trainer.max_epochs=abc`` is the string ``'abc'`` and
``+distill.temprature=2`` a new key, and both used to surface as a Lightning or ``TypeError`` traceback after a
model had loaded, a run had been opened in MLflow, or a whole teacher had trained. :func:`check_config` reads
the composed config against a table of :class:`Setting` rows (key, type, range or choices) and against the
keys each group may hold, and raises one :class:`ConfigError` that names every bad key, its value and what is
expected. The entry points call it first, before the data is read and before any MLflow run exists.

A table rather than Hydra structured configs: the config groups are plain YAML nodes whose ``_target_``
classes already declare their arguments, and a dataclass schema per group would repeat every default in a
second place. The table holds only what a constructor's signature cannot say (ranges, choices); which keys a
group may hold is read from those signatures.
"""

from __future__ import annotations

import difflib
import inspect
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.stages import NOT_STUDENT_ARGUMENTS
from lightning_modules.nets.grading_head import HEADS

#: what OmegaConf.select returns for a key the config does not have
_ABSENT = object()


class ConfigError(ValueError):
    """Settings that cannot be used: every problem names the key, the value and what is expected."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("Configuration problem(s), nothing was started:\n"
                         + "\n".join(f"  - {problem}" for problem in self.problems)
                         + "\nFix: correct these overrides (add --cfg job to them to print the composed config without "
                           "running anything).")


@dataclass(frozen=True)
class Setting:
    """One key's type and range. ``kind`` is ``int``, ``float`` (an int is accepted), ``bool`` or ``str``;
    ``low``/``high`` bound it (inclusive, unless ``open_low``/``open_high``); ``also`` lists values accepted
    outside the range (Lightning's -1 for "no limit"); ``optional`` accepts null."""

    key: str
    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None
    also: tuple[Any, ...] = ()
    multiple_of: int | None = None
    optional: bool = False
    meaning: str = ""

    def expected(self) -> str:
        if self.choices is not None:
            text = f"one of {list(self.choices)}"
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
            if self.low is not None and self.high is not None:
                text += (f" in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                         f"{')' if self.open_high else ']'}")
            elif self.low is not None:
                text += f" {'>' if self.open_low else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.open_high else '<='} {self.high:g}"
            if self.multiple_of:
                text += f", a multiple of {self.multiple_of}"
        if self.also:
            text += f" (or {', '.join(map(str, self.also))})"
        if self.optional:
            text += " or null"
        return text + (f" ({self.meaning})" if self.meaning else "")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` does not fit, or None."""
        if value is None:
            return None if self.optional else f"{self.key}=null: expected {self.expected()}"
        if value in self.also and not isinstance(value, bool):
            return None
        if self.choices is not None:
            return None if value in self.choices else f"{self.key}={value!r}: expected {self.expected()}"
        if not _has_kind(value, self.kind):
            return (f"{self.key}={value!r} ({type(value).__name__}): expected {self.expected()}")
        if self.kind in (int, float):
            too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
            off_grid = self.multiple_of is not None and value % self.multiple_of != 0
            if too_low or too_high or off_grid:
                return f"{self.key}={value!r}: expected {self.expected()}"
        return None


def _has_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _int(key: str, low: float | None = None, **extra: Any) -> Setting:
    return Setting(key, int, low=low, **extra)


def _float(key: str, low: float | None = None, high: float | None = None, **extra: Any) -> Setting:
    return Setting(key, float, low=low, high=high, **extra)


def _bool(key: str) -> Setting:
    return Setting(key, bool)


def _fraction(key: str, **extra: Any) -> Setting:
    """A share strictly between 0 and 1."""
    return Setting(key, float, low=0, high=1, open_low=True, open_high=True, **extra)


#: the smallest image side any network of the suite is fed: below it EfficientNet's and VGG's last feature maps
#: are a single pixel
MIN_IMAGE_SIZE = 32

#: Lightning Trainer arguments users override (the rest Lightning checks itself when the Trainer is built)
TRAINER_SETTINGS = (
    _int("trainer.max_epochs", 1, also=(-1,), optional=True, meaning="-1: no limit"),
    _int("trainer.min_epochs", 0, optional=True),
    _int("trainer.max_steps", 1, also=(-1,), optional=True),
    _int("trainer.accumulate_grad_batches", 1),
    _float("trainer.gradient_clip_val", 0, optional=True),
    _int("trainer.log_every_n_steps", 1),
    _int("trainer.num_sanity_val_steps", 0, also=(-1,)),
    _int("trainer.check_val_every_n_epoch", 1, optional=True),
    _bool("trainer.deterministic"),
    Setting("trainer.precision", str, choices=("32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16",
                                               "bf16-true", "16-true", "64-true", "64", 64, "transformer-engine")),
)
COMMON_SETTINGS = (
    _int("seed", 0),
    _int("threads", 1, optional=True),
    _float("optim.lr", 0, open_low=True),
    _float("optim.weight_decay", 0),
    _fraction("optim.pct_start"),
    _int("data.batch_size", 1),
    _int("data.num_workers", 0),
    _fraction("data.test_fraction"),
    _bool("data.augment"),
    _bool("data.skip_unusable"),
    _bool("data.require_field_of_view"),
    *TRAINER_SETTINGS,
)
DR_SETTINGS = (
    *COMMON_SETTINGS,
    _int("data.image_size", MIN_IMAGE_SIZE),
    _fraction("data.val_fraction"),
    _bool("data.ben_graham"),
    _bool("data.camera_augment"),
    _bool("data.weighted_sampling"),
    _bool("data.use_topology"),
    _float("data.class_weight_beta", 0, 1, open_high=True),
    _int("data.topo_resolution", 8),
    _float("data.topo_min_persistence", 0),
    _int("data.topo_image_resolution", 2),
    _float("data.topo_bandwidth_fraction", 0, open_low=True),
    _float("distill.temperature", 0, open_low=True),
    _float("distill.alpha_start", 0, 1),
    _float("distill.alpha_end", 0, 1),
    _float("distill.consistency_weight", 0),
    _float("distill.label_smoothing", 0, 1, open_high=True),
    Setting("distill.teacher_checkpoint", str, optional=True),
    _int("distill.teacher_epochs", 1, optional=True),
    _int("distill.teacher_image_size", 32, optional=True),
    Setting("model.student.head", str, choices=HEADS),
    _bool("model.student.use_cbam"),
    _int("qat.max_epochs", 1),
    _float("qat.lr", 0, open_low=True),
    _fraction("qat.pct_start"),
)
#: the VGG16-style U-Net pools four times: its input sides must be multiples of 2^4
DISC_IMAGE_MULTIPLE = 16
DISC_SETTINGS = (
    *COMMON_SETTINGS,
    _int("data.image_size", MIN_IMAGE_SIZE, multiple_of=DISC_IMAGE_MULTIPLE,
         meaning="the VGG U-Net pools four times"),
    _int("data.num_folds", 2),
    _int("data.fold", 0),
    _bool("data.crop_to_retina"),
    _bool("data.clahe"),
    _bool("data.equalize_hist"),
    _float("data.clahe_clip_limit", 0, open_low=True),
    _int("data.clahe_tile_grid", 1),
    _float("data.mask_threshold", 0, 1, open_low=True),
    _bool("data.resize_masks"),
    _bool("data.coarse_to_fine.enabled"),
    _float("data.coarse_to_fine.crop_scale", 1.2),
    _float("data.coarse_to_fine.crop_fraction", 0, 1),
    _float("data.coarse_to_fine.scale_jitter", 0, 1),
    _float("data.coarse_to_fine.shift_jitter", 0, 1),
    _float("data.coarse_to_fine.min_blob_fraction", 0, 1, open_low=True),
    _bool("chain.coarse_to_fine"),
    _float("chain.target_dice", 0, 1, open_low=True),
    _int("chain.patience", 1),
    *(_int(f"chain.max_epochs.{arm}", 1, optional=True) for arm in ("base", "prune", "kd", "qat", "share", "compare")),
    *(_float(f"chain.{group}.lr", 0, open_low=True) for group in ("finetune", "qat", "share")),
    *(_fraction(f"chain.{group}.pct_start") for group in ("finetune", "qat", "share")),
    _float("chain.kd.alpha", 0, 1),
    _float("chain.kd.temperature", 0, open_low=True),
    _float("chain.liminal_tolerance", 0, 1, open_high=True),
)

#: groups whose keys are fixed by the shipped config (a new key there is a typo): group -> its keys
_CHAIN_KEYS = frozenset({"bases", "arms", "finishers", "finish_after", "compare", "target_dice", "patience",
                         "max_epochs", "finetune", "qat", "share", "kd", "liminal_tolerance", "callbacks",
                         "coarse_to_fine"})


def check_settings(cfg: DictConfig, settings: Iterable[Setting]) -> list[str]:
    """The problems of the keys in ``settings`` that ``cfg`` has (a key it lacks is not checked)."""
    problems = []
    for setting in settings:
        value = OmegaConf.select(cfg, setting.key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT or OmegaConf.is_missing(cfg, setting.key):
            continue
        problem = setting.problem(value)
        if problem is not None:
            problems.append(problem)
    return problems


def unknown_keys(node: DictConfig | None, prefix: str, known: Iterable[str]) -> list[str]:
    """Keys of ``node`` not among ``known``, each named with the closest known one (or all of them)."""
    if node is None:
        return []
    known = sorted(set(known))
    problems = []
    for name in node:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {prefix}.{close[0]}?" if close else f"known: {known}"
        problems.append(f"{prefix}.{name} is not a setting of {prefix} ({hint})")
    return problems


def constructor_arguments(target: str) -> set[str] | None:
    """The keyword arguments ``target``'s constructor takes, or None when it takes any (``**kwargs``)."""
    parameters = inspect.signature(get_class(target)).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return {parameter.name for parameter in parameters if parameter.name != "self"}


def target_node_problems(node: DictConfig | None, prefix: str) -> list[str]:
    """Keys of a ``_target_`` node that its class's constructor does not take."""
    if node is None or "_target_" not in node:
        return []
    try:
        arguments = constructor_arguments(node._target_)
    except Exception as error:  # an unimportable _target_ is a config error too
        return [f"{prefix}._target_={node._target_!r} cannot be imported ({type(error).__name__}: {error})"]
    if arguments is None:
        return []
    return unknown_keys(OmegaConf.create({key: None for key in node if not str(key).startswith("_")}), prefix,
                        arguments)


def _list_problems(cfg: DictConfig, key: str, allowed: Sequence[Any] | None = None,
                   item: Callable[[Any], bool] | None = None, expected: str = "") -> list[str]:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT or value is None:
        return []
    if not isinstance(value, ListConfig | list):
        return [f"{key}={value!r}: expected a list, e.g. {key}=[...]"]
    bad = [entry for entry in value
           if (allowed is not None and entry not in allowed) or (item is not None and not item(entry))]
    return [f"{key}={list(value)}: {bad} not allowed; expected {expected or f'entries of {list(allowed)}'}"] if bad else []


def check_dr_config(cfg: DictConfig) -> None:
    """``make dr-distill``'s settings; raises one ConfigError naming every problem."""
    problems = check_settings(cfg, DR_SETTINGS)
    problems += target_node_problems(cfg.get("data"), "data")
    for role in ("teacher", "student", "baseline"):
        problems += target_node_problems(cfg.model.get(role), f"model.{role}")
    student = cfg.model.get("student")
    if student is not None and "_target_" in student:
        # distill.* is passed to the student's constructor: a key it does not take would fail after the teacher
        arguments = constructor_arguments(student._target_)
        if arguments is not None:
            problems += unknown_keys(cfg.get("distill"), "distill", arguments | set(NOT_STUDENT_ARGUMENTS))
    problems += _list_problems(cfg, "stages", item=lambda stage: isinstance(stage, str),
                               expected="stage names, e.g. stages=[teacher,student]")
    problems += _alpha_order(cfg)
    if problems:
        raise ConfigError(problems)


def _alpha_order(cfg: DictConfig) -> list[str]:
    start = OmegaConf.select(cfg, "distill.alpha_start", default=None)
    end = OmegaConf.select(cfg, "distill.alpha_end", default=None)
    numbers = all(_has_kind(value, float) and 0 <= value <= 1 for value in (start, end))
    return [] if not numbers or start <= end else [
        f"distill.alpha_start={start} > distill.alpha_end={end}: the KD weight rises over training; swap them"]


def check_disc_config(cfg: DictConfig) -> None:
    """``make glaucoma-iterations``' settings; raises one ConfigError naming every problem."""
    problems = check_settings(cfg, DISC_SETTINGS)
    problems += target_node_problems(cfg.get("data"), "data")
    problems += target_node_problems(cfg.model.get("segmenter"), "model.segmenter")
    problems += unknown_keys(cfg.get("chain"), "chain", _CHAIN_KEYS)
    problems += _list_problems(cfg, "chain.bases", item=lambda base: _has_kind(base, int) and base >= 1,
                               expected="positive integers, widest first, e.g. chain.bases=[64,32,16,8]")
    problems += _list_problems(cfg, "chain.arms", allowed=("prune", "kd"))
    problems += _list_problems(cfg, "chain.finishers", allowed=("qat", "share"))
    bases = OmegaConf.select(cfg, "chain.bases", default=None)
    if isinstance(bases, ListConfig) and all(_has_kind(base, int) for base in bases) and list(bases) != sorted(
            set(bases), reverse=True):
        problems.append(f"chain.bases={list(bases)}: expected distinct widths, widest first (the chain "
                        "compresses base by base), e.g. chain.bases=[64,32,16,8]")
    fold, folds = (OmegaConf.select(cfg, key, default=None) for key in ("data.fold", "data.num_folds"))
    if _has_kind(fold, int) and _has_kind(folds, int) and fold >= folds:
        problems.append(f"data.fold={fold}: expected one of the data.num_folds={folds} folds 0..{folds - 1}")
    if problems:
        raise ConfigError(problems)


def build_each_or_raise(builds: Mapping[str, Callable[[Path], object]]) -> None:
    """Call ``builds[stage](folder)`` for every stage (``folder``: a scratch folder of its own, removed after),
    before anything trains; one ConfigError names every stage whose build raised, and why."""
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        for stage, build in builds.items():
            try:
                build(Path(scratch) / stage)
            except Exception as error:  # whatever a constructor raises: the stage could not start
                problems.append(instantiation_problem(f"stage {stage}", error))
    if problems:
        raise ConfigError(problems)


def instantiation_problem(what: str, error: BaseException) -> str:
    """One line for a constructor that failed while being tried before the run (Hydra wraps the cause)."""
    cause = error.__cause__ if isinstance(error, InstantiationException) and error.__cause__ else error
    return f"{what} cannot be built: {type(cause).__name__}: {cause}"
