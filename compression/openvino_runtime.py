"""OpenVINO, the CPU runtime Intel tunes for AVX-512 VNNI / AMX, beside ONNX Runtime: IR files, compiled models
with a named precision, NNCF's post-training int8, and which precision really ran.

OpenVINO reads the suite's ONNX files directly (``ov.Core.read_model``), so every exported model — the plain
fp32 file and ONNX Runtime's QDQ int8 file alike — runs on it without another export. Three things it does
differently from ONNX Runtime, each handled here rather than left to the caller:

* its CPU plugin runs in bf16 by default on CPUs with AVX512-BF16 or AMX, so a compiled model always gets an
  explicit ``INFERENCE_PRECISION_HINT`` (``fp32`` -> ``f32``, ``bf16`` -> ``bf16``), and
  :func:`executed_precision` reads from the compiled graph what its convolutions and matrix products really run
  in (a bf16 hint on a CPU without bf16 runs f32; an int8 layer the plugin cannot fuse runs in float);
* ``ov.save_model`` compresses weights to fp16 unless told not to: :func:`save_ir` keeps them fp32, so the IR
  is the same network as the ONNX file;
* its int8 comes from NNCF (:func:`quantize_openvino`), the maintained quantizer that targets it, calibrated on
  the same images as ONNX Runtime's static int8, in a process of its own (``compression.nncf_quantize``).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from torch import Tensor

from compression.export import as_ort_array
from compression.nncf_quantize import write_feeds

log = logging.getLogger(__name__)

#: the suite's precision names -> OpenVINO's inference precision hint for the float part of a model
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
#: the compute layers whose runtime precision says what a model really ran in (the rest is data movement)
_COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "GroupConvolution", "FullyConnected", "MatMul",
                             "Gemm", "BinaryConvolution"})
#: OpenVINO's element types -> the suite's precision names
_PRECISION_NAMES = {"u8": "int8", "i8": "int8", "bf16": "bf16", "f32": "fp32", "f16": "fp16"}


class OpenVINOModelError(ValueError):
    """A model file OpenVINO cannot read or compile (missing, truncated, or an unsupported operation)."""


@functools.lru_cache(maxsize=1)
def openvino_core() -> ov.Core:
    """The process's one OpenVINO ``Core``, as OpenVINO advises: every ``Core`` starts thread pools of its own,
    and a test process that had made a Core per call (dozens) was measured to crash with SIGSEGV in its next
    fork of DataLoader workers; with one Core the same sequence runs cleanly. It holds no settings of ours:
    each compiled model gets its own configuration (:func:`compile_model`)."""
    return ov.Core()


def openvino_version() -> str:
    """The installed OpenVINO's version, e.g. ``2026.4.1-22982-...``."""
    return ov.__version__


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin can run on this CPU, e.g. ``['BF16', 'FP32', 'INT8', ...]``."""
    return [str(capability) for capability in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def read_model(path: str | os.PathLike) -> ov.Model:
    """An ONNX file or an IR ``.xml`` (its ``.bin`` beside it) as an OpenVINO model.

    Raises:
        OpenVINOModelError: the file is missing or OpenVINO cannot read it.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenVINOModelError(f"model file {str(path)!r} does not exist")
    try:
        return openvino_core().read_model(str(path))
    except Exception as error:  # OpenVINO raises RuntimeError / its own types for unreadable files
        raise OpenVINOModelError(f"OpenVINO cannot read {str(path)!r} ({type(error).__name__}: "
                                 f"{' '.join(str(error).split())[:300]})") from error


def save_ir(model: ov.Model, xml_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``model`` as OpenVINO IR: ``xml_path`` and the ``.bin`` of its weights beside it, the weights kept
    in their own precision (OpenVINO's default would halve fp32 weights to fp16). Returns (xml, bin)."""
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path, xml_path.with_suffix(".bin")


def quantize_openvino(onnx_path: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]],
                      xml_path: str | os.PathLike) -> tuple[Path, Path]:
    """NNCF's post-training int8 of an ONNX model, written as OpenVINO IR to ``xml_path`` (and its ``.bin``):
    activation ranges from ``feeds`` (one dict of named batch-1 inputs per calibration image,
    ``compression.quantization.calibration_feeds``), per-channel symmetric weights, NNCF's default fast bias
    correction. NNCF runs in a process of its own (``compression.nncf_quantize`` says why). Returns (xml, bin).

    Raises:
        ValueError: no calibration images.
        RuntimeError: NNCF failed (its last error lines in the message).
    """
    if not feeds:
        raise ValueError("NNCF int8 needs calibration images: the calibration feeds are empty")
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        feeds_path = Path(scratch) / "feeds.npz"
        write_feeds([dict(feed) for feed in feeds], feeds_path)
        done = subprocess.run([sys.executable, "-m", "compression.nncf_quantize", str(onnx_path), str(feeds_path),
                               str(xml_path)], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not xml_path.is_file():
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[-500:]
        raise RuntimeError(f"NNCF could not quantize {str(onnx_path)!r} (exit {done.returncode}): {tail}")
    return xml_path, xml_path.with_suffix(".bin")


def compile_model(model: ov.Model | str | os.PathLike, precision: str = "fp32", threads: int = 1,
                  throughput: bool = False) -> ov.CompiledModel:
    """``model`` compiled for the CPU with ``threads`` inference threads, its float part in ``precision``
    (``fp32`` or ``bf16``; int8 layers of a quantized model stay int8 either way), tuned for batch-1 latency
    (one stream) or, with ``throughput``, for many requests at once.

    Raises:
        ValueError: an unknown precision or threads < 1.
        OpenVINOModelError: OpenVINO cannot read or compile the model.
    """
    if precision not in _PRECISION_HINTS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(_PRECISION_HINTS)} (int8 is a property "
                         "of the model file, not of the compilation)")
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    if not isinstance(model, ov.Model):
        model = read_model(model)
    config = {"INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": int(threads),
              "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY"}
    try:
        return openvino_core().compile_model(model, "CPU", config)
    except Exception as error:
        raise OpenVINOModelError(f"OpenVINO cannot compile {model.friendly_name!r} for the CPU "
                                 f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from error


def layer_precisions(compiled: ov.CompiledModel) -> Counter[str]:
    """How many of the compiled model's compute layers (convolutions, matrix products) run in each precision,
    as the CPU plugin scheduled them (``int8``, ``bf16``, ``fp32``)."""
    counts: Counter[str] = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        if str(info["layerType"].astype(str)) not in _COMPUTE_LAYERS:
            continue
        precision = str(info["runtimePrecision"].astype(str)).lower()
        counts[_PRECISION_NAMES.get(precision, precision)] += 1
    return counts


def executed_precision(compiled: ov.CompiledModel) -> str:
    """The precision a compiled model really runs in: ``int8``, ``bf16`` or ``fp32`` when every compute layer
    agrees, else each precision with its layer count, most layers first (``int8 14 + fp32 2``)."""
    counts = layer_precisions(compiled)
    if not counts:
        return "none"
    if len(counts) == 1:
        return next(iter(counts))
    return " + ".join(f"{name} {count}" for name, count in counts.most_common())


@dataclass
class OpenVINOSession:
    """A compiled model and one inference request, run like an ONNX Runtime session: inputs in the model's
    declared order, every output back as a numpy array.

    Build it with :meth:`open`; ``precision`` is the float precision asked for, ``executed`` what really runs.
    """

    compiled: ov.CompiledModel
    precision: str
    executed: str
    input_names: tuple[str, ...]

    @classmethod
    def open(cls, model: ov.Model | str | os.PathLike, precision: str = "fp32", threads: int = 1,
             throughput: bool = False) -> OpenVINOSession:
        compiled = compile_model(model, precision, threads, throughput)
        names = tuple(port.get_any_name() for port in compiled.inputs)
        return cls(compiled, precision, executed_precision(compiled), names)

    def __post_init__(self) -> None:
        self._request = self.compiled.create_infer_request()

    def run(self, inputs: Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
        """Every output of one synchronous inference on ``inputs`` (in the declared input order)."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the model takes {len(self.input_names)} inputs {list(self.input_names)}, got "
                             f"{len(inputs)}")
        results = self._request.infer({index: as_ort_array(value) for index, value in enumerate(inputs)})
        # copies: the request's output buffers are reused by its next inference
        return [np.array(results[port]) for port in self.compiled.outputs]

    def describe(self) -> dict[str, Any]:
        """What ran, for a bench row or a log line."""
        return {"precision": self.precision, "executed_precision": self.executed}
