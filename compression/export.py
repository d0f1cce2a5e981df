"""ONNX export of the project's networks, an ONNX Runtime session helper, and an output parity check.

Exporter. torch 2.14's ``torch.onnx.export`` has two exporters, and both handle the VGGUNet and the DR student
(measured: max |ONNX Runtime - PyTorch| < 1e-6 for either, batch size dynamic):

* ``dynamo=True`` (torch.export + onnxscript) is the default of torch >= 2.9 and the supported one. It needs the
  ``onnxscript`` package. Its graph of the DR student is clean: tf_efficientnet's "same" padding is folded into
  the convolutions (11 op types, no shape arithmetic), so on 1 CPU thread ONNX Runtime ran the student in
  8.8 ms fp32 and 4.6 ms int8, and its int8 logits correlated better with fp32 (Pearson r 0.9948).
* ``dynamo=False`` (TorchScript tracing) is deprecated ("will be removed"). It traces the student's padding as
  runtime Shape/Gather/Ceil/Pad chains (26 op types): 10.5 ms fp32 and 7.1 ms int8 on the same run, r 0.9908,
  and ONNX Runtime's symbolic shape inference (``quant_pre_process``) gives up on it. For the VGGUNet both
  exporters give the same five op types (Conv, ConvTranspose, MaxPool, Relu, Concat).

``exporter="auto"`` therefore uses dynamo whenever ``onnxscript`` is installed and falls back to TorchScript
(with a warning) only when it is not.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]
#: opset 18: written natively by the dynamo exporter and supported by the TorchScript one; per-channel
#: QuantizeLinear / DequantizeLinear (opset >= 13) for ONNX Runtime's QDQ format.
DEFAULT_OPSET = 18
_EXPORTERS = ("auto", "dynamo", "torchscript")
_AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}


class ExportParityError(RuntimeError):
    """ONNX Runtime's output of an exported model differs from PyTorch's beyond the given tolerance."""


class OnnxModelError(ValueError):
    """An ONNX file that ONNX Runtime cannot load (missing, truncated, or not a model)."""


def network_input_names(net: nn.Module) -> tuple[str, ...]:
    """The ONNX input names of one of the project's networks: the DR student with its topological branch takes
    the image and its persistence features, every other network the image alone."""
    return ("image", "topo") if getattr(net, "uses_topology", False) else ("image",)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str] = ("logits",),
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "auto",
    dynamic_spatial: bool = False,
) -> Path:
    """Export ``model`` in eval mode to one self-contained ONNX file at ``path`` and return the path.

    The model is exported from a CPU deep copy, so its own train/eval mode, device and hooks are left as they
    are. ``example_inputs`` holds one tensor per ``input_names`` entry (e.g. ``(image,)`` for the VGGUNet,
    ``(image, topo)`` for the DR student); with ``dynamic_batch`` the first dimension of every input and
    output is symbolic, so the file serves any batch size. With ``dynamic_spatial`` the height and width of
    every 4-D (B, C, H, W) input and output are symbolic as well (one ``height`` and one ``width`` for all
    of them), so a segmenter exported once runs at any image size it accepts: timed at 256x256 and
    evaluated at its training size from the same file. Vector inputs (e.g. the DR student's topological
    features) keep their static feature axis. Symbolic sides cost nothing at run time: the trained prune-16
    VGGUNet at 256x256 on 1 thread (dynamo export, 5 alternated rounds) ran 76.9 / 76.8 ms in fp32 and
    35.9 / 34.2 ms in int8 from the static / the dynamic file.

    Raises:
        ValueError: the names do not match the inputs, ``exporter`` is unknown, or ``dynamic_spatial`` is
            asked for a model without a 4-D input.
        ModuleNotFoundError: ``exporter="dynamo"`` without the ``onnxscript`` package.
    """
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter={exporter!r}: choose one of {_EXPORTERS}")
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise ValueError(f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    if len(input_names) != len(example_inputs):
        raise ValueError(
            f"{len(example_inputs)} example inputs but {len(input_names)} input_names {list(input_names)}: "
            "give one name per forward argument, e.g. ('image', 'topo') for the DR student"
        )
    if dynamic_spatial and not any(t.ndim == 4 for t in example_inputs):
        shapes = [tuple(t.shape) for t in example_inputs]
        raise ValueError(f"dynamic_spatial=True needs a (B, C, H, W) image input, got input shapes {shapes}: "
                         "export this model with dynamic_spatial=False")
    use_dynamo = _resolve_exporter(exporter)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).cpu().eval()
    # torch.onnx reads the tensors as they are: channels-last inputs would only add Transpose nodes
    inputs = tuple(t.detach().cpu().contiguous() for t in example_inputs)
    names, outputs = list(input_names), list(output_names)
    with torch.no_grad():
        if use_dynamo:
            if dynamic_batch:
                # torch.export specialises every size-1 dimension to the constant 1, which contradicts a
                # symbolic batch ("Invalid ranges [2:1]"): a batch-1 example is exported as two copies of itself
                inputs = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for t in inputs)
            # torch.export infers the outputs' symbolic axes from the inputs'
            dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
            input_axes = [_symbolic_axes(t.ndim, dynamic_batch, dynamic_spatial) for t in inputs]
            dynamic = dynamic_batch or dynamic_spatial
            torch.onnx.export(
                cpu_model, inputs, str(path), dynamo=True, input_names=names, output_names=outputs,
                opset_version=opset, external_data=False, verbose=False,
                dynamic_shapes=tuple({axis: dims[axis] for axis in axes} for axes in input_axes) if dynamic else None,
            )
        else:
            # the TorchScript exporter must be told every symbolic axis, outputs included: with spatial axes,
            # one forward pass gives the outputs' ranks (a batch axis is in every output)
            output_ranks = [1] * len(outputs)
            if dynamic_spatial:
                produced = cpu_model(*inputs)
                output_ranks = [t.ndim for t in ([produced] if isinstance(produced, Tensor) else produced)]
            ranks = [t.ndim for t in inputs] + output_ranks
            axes = {}
            for name, rank in zip(names + outputs, ranks, strict=False):
                symbolic = _symbolic_axes(rank, dynamic_batch, dynamic_spatial)
                if symbolic:
                    axes[name] = {axis: _AXIS_NAMES[axis] for axis in symbolic}
            torch.onnx.export(cpu_model, inputs, str(path), dynamo=False, input_names=names,
                              output_names=outputs, opset_version=opset, dynamic_axes=axes or None)
    log.info("Exported %s to %s (%s exporter, opset %d, %.2f MB)", type(model).__name__, path,
             "dynamo" if use_dynamo else "TorchScript", opset, path.stat().st_size / 1e6)
    return path


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_onnx_tool_logs() -> None:
    """Keep the ONNX tools' warnings, drop their INFO pages: ONNX Runtime's quantizer logs through the root
    logger itself, one line per rescaled weight channel (hundreds per EfficientNet), and the dynamo exporter's
    optimiser passes (``onnxscript``, ``onnx_ir``) a page per network. Call once from an entry point (a filter
    on the root logger sees only records logged on it directly, not those of named loggers)."""
    root = logging.getLogger()
    if not any(isinstance(f, _WarningsOnly) for f in root.filters):
        root.addFilter(_WarningsOnly())
    for chatty in ("onnxscript", "onnx_ir"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _symbolic_axes(rank: int, dynamic_batch: bool, dynamic_spatial: bool) -> list[int]:
    """The axes of a tensor of this rank that are symbolic in the export."""
    axes = [0] if dynamic_batch and rank >= 1 else []
    return axes + ([2, 3] if dynamic_spatial and rank == 4 else [])


def ort_session(path: str | os.PathLike, threads: int = 1) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with every graph optimisation on (Conv+BN folding, QDQ -> QLinearConv fusion,
    NHWC int8 layouts), ``threads`` intra-op threads and sequential execution.

    Raises:
        OnnxModelError: the file is missing or ONNX Runtime cannot load it.
    """
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {str(path)!r} does not exist: write it with export_onnx(...)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the optimiser's notes on unused initialisers are noise
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise OnnxModelError(
            f"ONNX Runtime cannot load {str(path)!r} ({type(err).__name__}: {str(err)[:300]}); "
            "re-export it with export_onnx(...)"
        ) from err


def run_session(session: ort.InferenceSession, inputs: Sequence[Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on ``inputs`` given in the order of its declared inputs; returns every output."""
    declared = [node.name for node in session.get_inputs()]
    if len(declared) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(declared)} inputs {declared}, got {len(inputs)}")
    return session.run(None, {name: as_ort_array(value) for name, value in zip(declared, inputs, strict=True)})


def onnx_parity(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: tuple[Tensor, ...],
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int = 1,
) -> float:
    """Largest absolute difference between ``model(*inputs)`` (eval mode) and the ONNX file's outputs.

    Raises:
        ExportParityError: some element differs by more than ``atol + rtol * |pytorch value|`` (the test of
            ``numpy.allclose``); the message names the file, the largest difference and its tolerance.
        OnnxModelError: ONNX Runtime cannot load the file.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol={atol} and rtol={rtol} must be >= 0")
    session = ort_session(path, threads)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*inputs)
    finally:
        model.train(was_training)
    expected_list = [expected] if isinstance(expected, Tensor) else list(expected)
    actual_list = run_session(session, inputs)
    if len(actual_list) != len(expected_list):
        raise ExportParityError(f"{str(path)!r} has {len(actual_list)} outputs, the model returns "
                                f"{len(expected_list)}: re-export it from this model")
    largest = 0.0
    for index, (actual, reference) in enumerate(zip(actual_list, expected_list, strict=True)):
        reference_np = as_ort_array(reference)
        if actual.shape != reference_np.shape:
            raise ExportParityError(f"{str(path)!r} output {index} has shape {actual.shape}, PyTorch gives "
                                    f"{reference_np.shape}: re-export it from this model")
        difference = np.abs(actual.astype(np.float64) - reference_np)
        largest = max(largest, float(difference.max(initial=0.0)))
        excess = difference - (atol + rtol * np.abs(reference_np))
        if (excess > 0).any() or not np.isfinite(actual).all():
            worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
            raise ExportParityError(
                f"{str(path)!r} output {index} differs from PyTorch: max |diff| {largest:.3g}, at {worst} "
                f"{float(actual[worst]):.6g} vs {float(reference_np[worst]):.6g}, beyond atol={atol} + "
                f"rtol={rtol} x |value|. Re-export from this exact model in eval mode; for an int8 model "
                "compare with a looser tolerance"
            )
    return largest


def _resolve_exporter(exporter: Exporter) -> bool:
    """True for the dynamo exporter."""
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not has_onnxscript:
        raise ModuleNotFoundError(
            "exporter='dynamo' needs the onnxscript package: pip install onnxscript (or pass "
            "exporter='torchscript', the deprecated exporter)"
        )
    if exporter == "auto" and not has_onnxscript:
        log.warning("onnxscript is not installed: exporting with the deprecated TorchScript exporter, whose DR "
                    "student graph ran 1.5x slower in int8; pip install onnxscript for the dynamo exporter")
    return exporter == "dynamo" or (exporter == "auto" and has_onnxscript)


def as_ort_array(value: Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous NumPy array of ``value`` as ONNX Runtime takes it (floating tensors as float32)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bf16 / fp16 tensors: the exported graphs take float32
        # ORT wants C-contiguous arrays: channels-last tensors are copied to NCHW order here
        return np.ascontiguousarray(value.numpy())
    return np.ascontiguousarray(value)
