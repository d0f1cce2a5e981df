"""One way to open a deployed model file on either CPU runtime: ONNX Runtime (``ort``, the portable one) or
OpenVINO (``openvino``, tuned for Intel CPUs), each run as ``runner(inputs) -> outputs``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from compression.export import ort_session, run_session
from compression.openvino_runtime import OpenVINOSession

ORT, OPENVINO = "ort", "openvino"
RUNTIMES = (ORT, OPENVINO)
#: a model file opened on a runtime: inputs in the model's declared order -> every output as numpy
Runner = Callable[[Sequence[Tensor | np.ndarray]], list[np.ndarray]]


def runtime_of(path: str | os.PathLike) -> str:
    """The runtime a model file is for: OpenVINO IR (``.xml``) or ONNX (anything else, run by ONNX Runtime)."""
    return OPENVINO if Path(path).suffix == ".xml" else ORT


def open_runner(path: str | os.PathLike, runtime: str | None = None, threads: int = 1) -> tuple[Runner, str]:
    """(runner, the precision its compute layers really run in) for ``path`` on ``runtime`` (default: by the
    file, :func:`runtime_of`). OpenVINO runs the float part of a model in fp32 (never its bf16 default), so an
    fp32 file is fp32 on both runtimes and an int8 file's int8 layers stay int8.

    Raises:
        ValueError: an unknown runtime; compression.export.OnnxModelError /
            compression.openvino_runtime.OpenVINOModelError: a file the runtime cannot load.
    """
    runtime = runtime or runtime_of(path)
    if runtime == ORT:
        session = ort_session(path, threads)
        return (lambda inputs: run_session(session, inputs)), ""
    if runtime == OPENVINO:
        opened = OpenVINOSession.open(path, "fp32", threads)
        return opened.run, opened.executed
    raise ValueError(f"runtime={runtime!r}: choose one of {RUNTIMES}")
