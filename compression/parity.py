"""The error of a deployable file (an int8 model, a packed weight file) that disagrees with its network."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


class DeployableParityError(RuntimeError):
    """A compressed model's deployable file disagrees with the network it was made from beyond the configured
    tolerance.

    ``reason`` is one line naming the tolerance that failed, ``metrics`` the measured numbers (as logged, e.g.
    ``quant/mask_dice_int8_vs_fp32``), ``path`` the file. The entry points catch it around their finishers only
    (``experiments.runner.run_finisher``): that stage is recorded as failed and the others go on.
    """

    def __init__(self, path: str | os.PathLike, reason: str, metrics: Mapping[str, float] | None = None,
                 advice: str = ""):
        self.path = Path(path)
        self.reason = reason
        self.metrics = {key: float(value) for key, value in (metrics or {}).items()}
        super().__init__(f"{str(self.path)!r}: {reason}" + (f". {advice}" if advice else ""))
