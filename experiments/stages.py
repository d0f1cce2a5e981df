"""Stage names of ``make dr-distill`` and run keys (a run's overrides), in a module of their own so that
``make predict`` and ``make report`` know them without importing the training entry points (which pull in
Lightning, timm and the datamodules)."""

from __future__ import annotations

#: dr-distill's stages in training order; ``baseline`` is an architecture baseline (experiment=dr_baselines):
#: a timm classifier trained alone with the student's data, loss and schedule
DR_STAGES = ("teacher", "student", "student_qat", "baseline")
#: dr-distill's finisher: it fine-tunes the finished student into an int8 ONNX model of its own, so it cannot be
#: tested (or bundled) again from a checkpoint with ``retest=true``
DR_FINISHERS = ("student_qat",)
#: the name of every ``make evaluate`` run starts with it: ``external-<dataset>``, a child of the model's run
EXTERNAL_PREFIX = "external-"


def split_run_key(run_key: str) -> dict[str, str]:
    """A run key (run_state.json's ``run_key``: Hydra's override dirname, ``key=value`` joined by commas, lists
    in brackets; ``(defaults)`` for none) as a dict."""
    items, depth, current = [], 0, ""
    for char in "" if run_key in ("", "(defaults)") else run_key:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items += [current] if current else []
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in items)


def run_key_as_overrides(run_key: str) -> str:
    """A run key as the overrides one types on the command line."""
    return " ".join(f"{key}={value}" if value else key for key, value in split_run_key(run_key).items())

#: distill.* keys that configure the run (which teacher, how long it trains), not the student's constructor
NOT_STUDENT_ARGUMENTS = ("teacher_checkpoint", "teacher_epochs", "teacher_image_size")
