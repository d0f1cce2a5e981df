"""Real int8 (ONNX Runtime) and bf16 (PyTorch) inference on the CPU, and quantization-aware training (QAT).

The earlier study found post-training int8 "negligible" because its int8 was simulated (fake-quant kept in
fp32). Here int8 runs as real integer kernels: the model is exported to ONNX, quantized by ONNX Runtime's
static quantizer, and run by ONNX Runtime, whose graph optimiser fuses every DequantizeLinear -> Conv ->
QuantizeLinear group into a QLinearConv (u8 x s8 -> s32 with AVX512-VNNI).

Measured on this project's CPU (AMD EPYC, AVX512-VNNI and AVX512-BF16, no AMX), 1 thread, batch 1, every
candidate alternated round by round within one process while another training job shared the machine
(medians of 7-21 rounds; the trained networks of a glaucoma chain and a DR student; /tmp/quant_lab scripts):

=================================  ===========  ===========  ============
latency in ms (speed-up)           VGGUNet b64  VGGUNet b16  DR student
                                   256x256      256x256      192x192
=================================  ===========  ===========  ============
PyTorch fp32 eager                 1383         116          20.9
PyTorch fp32 channels-last         1163 (1.2x)  94 (1.2x)    17.2 (1.2x)
PyTorch bf16 (``bf16_module``)     546 (2.5x)   43 (2.7x)    14.6 (1.4x)
ONNX Runtime fp32                  1085 (1.3x)  70 (1.7x)    7.7 (2.7x)
ONNX Runtime int8 (defaults here)  330 (4.2x)   31 (3.8x)    3.9 (5.3x)
int8 file size vs fp32 ONNX        26 / 104 MB  1.7 / 6.6    4.7 / 16.7
=================================  ===========  ===========  ============

Accuracy of post-training int8 (100 calibration images) at the networks' training size (96x96, 34
validation discs): pooled Dice against the masks 0.9022 -> 0.9024 (b64) and 0.8511 -> 0.8485 (b16), int8 and
fp32 masks agreeing at Dice 0.997 / 0.995; bf16 moved Dice by < 0.0005. DR student: same top-1 class on all
12 validation images, mean |logit difference| 0.12.

Quantizer settings, chosen by measurement (earlier runs of the same alternating benchmark, ms):

* Activations u8 / weights s8 ("U8S8"), QDQ format. S8S8 was 1.6x slower (VGGUNet b64 503 vs 320, b16 49 vs
  29; student 7.7 vs 4.6): the VNNI kernels multiply u8 by s8, so s8 activations take a slower path. The
  QOperator format was as fast as QDQ with U8S8 (b64 317, b16 29, student 4.7) but pathologically slow with
  S8S8 (b64 3612, student 50) and is the legacy format; QDQ keeps one portable file.
* Per-channel weights: no slower than per-tensor (b64 320 vs 314, student 4.6 vs 4.6) and more faithful
  (student logits r 0.995 vs 0.939 against fp32, top-1 agreement 100% vs 83%; b16 mask Dice vs fp32 0.987 vs
  0.970).
* ConvTranspose2d: ONNX Runtime's CPU provider has no int8 ConvTranspose kernel, so with or without
  quantization it runs in fp32 (DQ -> ConvTranspose -> Q). Quantizing it anyway stores its weights in int8
  (b64 file 26.0 vs 31.2 MB) and lets the following Concat run as QLinearConcat; latency was the same
  (b64 320 vs 336 ms, b16 29 vs 32 ms), so it is quantized.
* ``quant_pre_process`` is not run: on these exports it changed neither the node count nor the latency, and
  its symbolic shape inference fails on the DR student (both exporters).
* The TorchScript export of the student ran int8 in 7.1 ms vs 4.6 ms for the dynamo export (see
  ``compression.export``).

Quantization-aware training path: QDQ fake quantization in PyTorch, exported to ONNX and quantized by ONNX
Runtime. torch.ao's eager/FX QAT is deprecated and PT2E lives in torchao (not a dependency). PT2E with
torchao 0.18's X86InductorQuantizer was tried in a throwaway environment: on the VGGUNet its int8 was no
faster than ONNX Runtime's (b16 37 vs 38 ms; b64 487 vs 400 ms, same run), inductor fp32 and bf16 were slower
than ONNX Runtime int8 (b64 1417 and 733 ms), it needs a C++ compiler and 15-45 s of compilation at
deployment, and its quantizer failed on the DR student ("Input partition has more than one output node").

QAT design: weights are fake-quantized per output channel, symmetric int8 in [-127, 127] with scale
max|w| / 127 (exactly ONNX Runtime's per-channel weight quantization), through ``torch.nn.utils.parametrize``;
the input of every Conv2d / ConvTranspose2d / Linear and the model's output are fake-quantized per tensor,
asymmetric uint8 with a running min/max (ONNX Runtime's activation scheme), by forward hooks. Per-channel
symmetric quantization commutes with the BatchNorm folding that export does (a folded weight is the
unfolded one times a per-channel factor, and so is its scale), so the int8 grid seen in training is the one
deployed. After training the fake-quantized weights are baked in, the model is exported in fp32 and
quantized statically with activation ranges recalibrated on training images: the weight rounding that QAT
adapted to is reproduced exactly, while activation rounding is input-dependent noise whose scale (min/max of
the same images) QAT has already seen. A graph exported straight from the fake-quant model was tried and is
slower: its Relu between Conv and QuantizeLinear blocks the QLinearConv fusion of 4 of 22 convs.
Measured (b16 at 96x96, 34 fine-tuning steps, dropout off, BatchNorm statistics re-estimated afterwards):
QAT int8 Dice 0.872 against post-training int8 0.849 (fp32 0.851). With dropout on and no BatchNorm
re-estimation the same fine-tune fell to 0.70 (the BatchNorm variance shift ``callbacks.batchnorm_recalibration``
describes), so fine-tune with ``DropoutToggle`` / ``BatchNormRecalibration``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from sklearn.metrics import cohen_kappa_score
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchmetrics.functional.classification import binary_stat_scores

from compression.export import DEFAULT_OPSET, Exporter, as_ort_array, export_onnx
from compression.parity import DeployableParityError
from compression.runtimes import open_runner

log = logging.getLogger(__name__)

#: ONNX op types whose weights ONNX Runtime's static quantizer stores in int8
QUANTIZABLE_ONNX_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: PyTorch layers that QAT fake-quantizes (weights and inputs)
QAT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
#: layers with parameters that stay in floating point: BatchNorm is folded into the conv before it at export,
#: the others run in fp32 between dequantized tensors
FLOAT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                                   nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)
DEFAULT_CALIBRATION_IMAGES = 100
_ACTIVATION_RANGE = (0, 255)  # uint8, asymmetric
_WEIGHT_RANGE = (-127, 127)  # int8, symmetric: ONNX Runtime's WeightSymmetric default
_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_QUANT_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_INPUT_QUANT = "qat_input_quant"
_OUTPUT_QUANT = "qat_output_quant"


class UnsupportedModelError(ValueError):
    """A model (or ONNX graph) that this quantization path cannot quantize; the message lists why."""


class QuantizationParityError(DeployableParityError):
    """The int8 model's outputs drift from the fp32 model's beyond the configured tolerance
    (see :func:`int8_parity_problems`)."""


# ------------------------------------------------------------------------------------------ ONNX Runtime int8
class _FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration protocol over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self._feeds):
            return None
        self._position += 1
        return self._feeds[self._position - 1]

    def rewind(self) -> None:
        self._position = 0


def quantize_onnx_static(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration: Iterable[Mapping[str, np.ndarray | Tensor]],
    per_channel: bool = True,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    quant_format: str = "qdq",
    exclude_op_types: Sequence[str] = (),
) -> Path:
    """Statically quantize the fp32 ONNX model to int8 with ONNX Runtime; returns ``int8_path``.

    ``calibration`` yields input feeds (input name -> array, e.g. ``{"image": (1, 3, H, W)}``): activation
    ranges are the min/max over them. The defaults are the fastest settings measured on this CPU (module
    docstring). ``exclude_op_types`` keeps ops of those types (e.g. ``["ConvTranspose"]``) in fp32.
    The file is written in one step (a temporary file renamed), so a failure leaves no partial model.

    Raises:
        ValueError: zero calibration feeds, feeds that do not match the model's inputs, or an unknown option;
            checked before anything is written.
        UnsupportedModelError: the graph has no Conv / ConvTranspose / Gemm / MatMul to quantize.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if activation_type not in _QUANT_TYPES or weight_type not in _QUANT_TYPES:
        raise ValueError(f"activation_type={activation_type!r}, weight_type={weight_type!r}: each must be one "
                         f"of {sorted(_QUANT_TYPES)}")
    if quant_format not in _QUANT_FORMATS:
        raise ValueError(f"quant_format={quant_format!r}: choose one of {sorted(_QUANT_FORMATS)}")
    feeds = [{name: as_ort_array(value) for name, value in feed.items()} for feed in calibration]
    if not feeds:
        raise ValueError(
            f"calibration with zero images: quantizing {str(fp32_path)!r} needs calibration inputs (e.g. 100 "
            "training images) to measure activation ranges; check that the calibration loader is not empty"
        )
    if not fp32_path.is_file():
        raise FileNotFoundError(f"fp32 ONNX model {str(fp32_path)!r} does not exist: write it with export_onnx")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    input_names = [value.name for value in graph.input if value.name not in initializers]
    for index, feed in enumerate(feeds):
        if sorted(feed) != sorted(input_names):
            raise ValueError(f"calibration feed {index} has inputs {sorted(feed)} but {str(fp32_path)!r} takes "
                             f"{input_names}: give one array per model input")
    op_types = {node.op_type for node in graph.node}
    if not (op_types & QUANTIZABLE_ONNX_OPS) - set(exclude_op_types):
        raise UnsupportedModelError(
            f"{str(fp32_path)!r} has no {sorted(QUANTIZABLE_ONNX_OPS)} node to quantize (op types: "
            f"{sorted(op_types)}, excluded: {list(exclude_op_types)}): int8 would not make it faster"
        )
    excluded_nodes = [node.name for node in graph.node if node.op_type in set(exclude_op_types)]
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".onnx", dir=int8_path.parent)
    os.close(handle)
    try:
        quantize_static(
            str(fp32_path), temporary, _FeedReader(feeds), quant_format=_QUANT_FORMATS[quant_format],
            per_channel=per_channel, activation_type=_QUANT_TYPES[activation_type],
            weight_type=_QUANT_TYPES[weight_type], nodes_to_exclude=excluded_nodes or None,
        )
        os.replace(temporary, int8_path)
        # mkstemp's file is private (0600); the int8 model is as readable as the model it was made from
        shutil.copymode(fp32_path, int8_path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    log.info("Quantized %s -> %s (%.2f -> %.2f MB, %d calibration feeds)", fp32_path, int8_path,
             fp32_path.stat().st_size / 1e6, int8_path.stat().st_size / 1e6, len(feeds))
    return int8_path


def calibration_feeds(
    batches: Iterable[Tensor | Sequence[Tensor]],
    input_names: Sequence[str],
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> list[dict[str, np.ndarray]]:
    """One feed per image (batch of 1, so static-batch exports calibrate too) from at most ``max_images``.

    Each batch is a tensor (single-input models) or a sequence of tensors in ``input_names`` order.
    """
    if max_images < 1:
        raise ValueError(f"max_images={max_images} must be >= 1")
    feeds: list[dict[str, np.ndarray]] = []
    for batch in batches:
        tensors = (batch,) if isinstance(batch, Tensor) else tuple(batch)
        if len(tensors) != len(input_names):
            raise ValueError(f"a calibration batch has {len(tensors)} tensors for inputs {list(input_names)}")
        arrays = [as_ort_array(tensor) for tensor in tensors]
        for index in range(len(arrays[0])):
            feeds.append({name: array[index:index + 1] for name, array in zip(input_names, arrays, strict=True)})
            if len(feeds) == max_images:
                return feeds
    return feeds


@dataclass(frozen=True)
class Int8Export:
    """Files written by :func:`quantize_model_int8`."""

    fp32_path: Path
    int8_path: Path
    calibration_images: int

    @property
    def fp32_bytes(self) -> int:
        return self.fp32_path.stat().st_size

    @property
    def int8_bytes(self) -> int:
        return self.int8_path.stat().st_size


def quantize_model_int8(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    calibration_batches: Iterable[Tensor | Sequence[Tensor]],
    directory: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str] = ("logits",),
    name: str = "model",
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
    exporter: Exporter = "auto",
    opset: int = DEFAULT_OPSET,
    **quantize_options,
) -> Int8Export:
    """Post-training int8: export ``model`` to ``<directory>/<name>_fp32.onnx`` and quantize it to
    ``<directory>/<name>_int8.onnx`` on up to ``max_images`` calibration images. ``model`` is not modified.

    Raises:
        UnsupportedModelError: see :func:`check_quantizable`; nothing is written.
        ValueError: zero calibration images; nothing is written.
    """
    check_quantizable(model)
    feeds = calibration_feeds(calibration_batches, input_names, max_images)
    if not feeds:
        raise ValueError(f"calibration with zero images: the calibration batches for {name!r} were empty; "
                         "pass training images (100 by default)")
    directory = Path(directory)
    fp32_path = export_onnx(model, example_inputs, directory / f"{name}_fp32.onnx", input_names, output_names,
                            opset=opset, exporter=exporter)
    int8_path = quantize_onnx_static(fp32_path, directory / f"{name}_int8.onnx", feeds, **quantize_options)
    return Int8Export(fp32_path, int8_path, len(feeds))


# ------------------------------------------------------------------------------------------------- bf16
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``nn.BatchNorm2d`` that directly follows an ``nn.Conv2d`` in an ``nn.Sequential``
    into that conv, in place; the BN's slot becomes ``nn.Identity`` so module names stay. Returns ``model``.

    Only exact ``nn.BatchNorm2d`` is folded: subclasses such as timm's ``BatchNormAct2d`` also apply an
    activation, which folding would drop. (``torch.fx``'s fuser cannot trace the VGGUNet's input checks.)
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (running statistics): call model.eval() first")
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d:
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
    return model


class BFloat16Inference(nn.Module):
    """Runs a bfloat16 copy of a network: float inputs are cast to bf16 (4-D ones to channels-last), outputs
    come back as float32. Inference only (``torch.inference_mode``)."""

    def __init__(self, model: nn.Module, channels_last: bool = True):
        super().__init__()
        self.model = model
        self.channels_last = channels_last

    @torch.inference_mode()
    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = self.model(*(self._cast(value) for value in inputs))
        if isinstance(outputs, Tensor):
            return outputs.float()
        return tuple(value.float() for value in outputs)

    def _cast(self, value: Tensor) -> Tensor:
        if not value.is_floating_point():
            return value
        value = value.to(torch.bfloat16)
        if self.channels_last and value.ndim == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        return value


def bf16_module(model: nn.Module, channels_last: bool = True, fold_bn: bool = True) -> BFloat16Inference:
    """A bf16 inference copy of ``model`` (left untouched): eval mode, BatchNorm folded into the convs,
    weights cast to bfloat16 and stored channels-last.

    Casting the weights beat ``torch.autocast(dtype=torch.bfloat16)`` (VGGUNet b64 561 vs 572 ms, b16 43 vs
    45 ms, student 19.1 vs 20.8 ms: autocast re-casts every weight on every call); channels-last is what lets
    oneDNN use its AVX512-BF16 kernels without reorders (b64 687 -> 561 ms, b16 64 -> 43 ms); folding BN saved
    a further 7-9% (b64 524 ms, b16 39 ms). bf16 does not reach int8's speed-up: see the module docstring.
    """
    copied = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(copied)
    copied = copied.to(torch.bfloat16)
    if channels_last:
        copied = copied.to(memory_format=torch.channels_last)
    return BFloat16Inference(copied, channels_last)


# -------------------------------------------------------------------------------- quantization-aware training
def check_quantizable(model: nn.Module) -> list[str]:
    """Names of the layers that int8 quantizes; raises :class:`UnsupportedModelError` if there is none, if a
    layer with parameters has a type this path cannot quantize (e.g. an LSTM or a Conv3d), or if the model is
    already prepared for QAT."""
    quantizable, unsupported, prepared = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, QAT_LAYER_TYPES):
            quantizable.append(name)
            if parametrize.is_parametrized(module) or hasattr(module, _INPUT_QUANT):
                prepared.append(name)
        elif not isinstance(module, FLOAT_LAYER_TYPES) and any(True for _ in module.parameters(recurse=False)):
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    if prepared:
        raise UnsupportedModelError(
            f"{type(model).__name__} is already prepared for QAT or parametrized ({', '.join(prepared[:5])}); "
            "pass the plain fp32 network, or strip_qat(model) first"
        )
    if unsupported:
        raise UnsupportedModelError(
            f"{type(model).__name__} has layers this int8 path cannot quantize: {', '.join(unsupported)}. "
            f"Supported: {', '.join(t.__name__ for t in QAT_LAYER_TYPES)} (int8) and "
            f"{', '.join(t.__name__ for t in FLOAT_LAYER_TYPES)} (kept in float); deploy such a model in bf16"
        )
    if not quantizable:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Conv2d / ConvTranspose2d / Linear layer: int8 has nothing to "
            "quantize here"
        )
    return quantizable


class PerChannelWeightFakeQuant(nn.Module):
    """Parametrization: symmetric int8 fake quantization of a weight per output channel, scale max|w| / 127.

    Gradients pass straight through (``torch.fake_quantize_per_channel_affine``'s estimator).
    """

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, weight: Tensor) -> Tensor:
        reduce_dims = [dim for dim in range(weight.ndim) if dim != self.axis]
        absmax = weight.detach().abs().amax(dim=reduce_dims).float()
        scale = (absmax / _WEIGHT_RANGE[1]).clamp_min(torch.finfo(torch.float32).tiny)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        quantized = torch.fake_quantize_per_channel_affine(weight.float(), scale, zero_point, self.axis,
                                                           *_WEIGHT_RANGE)
        return quantized.to(weight.dtype)


class ActivationFakeQuant(nn.Module):
    """Asymmetric uint8 per-tensor fake quantization with a running min/max, as ONNX Runtime quantizes
    activations (range widened to include 0; scale (max - min) / 255).

    In training mode each batch updates the range (the first sets it, later ones move it by ``momentum``);
    in eval mode the range is frozen. Before any range is known the input passes unchanged.
    """

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum} must be in (0, 1]")
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, value: Tensor) -> Tensor:
        if self.training:
            self._observe(value)
        if not bool(self.initialized):
            return value
        scale, zero_point = self.quantization_parameters()
        quantized = torch.fake_quantize_per_tensor_affine(value.float(), scale, zero_point, *_ACTIVATION_RANGE)
        return quantized.to(value.dtype)

    @torch.no_grad()
    def _observe(self, value: Tensor) -> None:
        low, high = value.detach().float().aminmax()
        if not bool(self.initialized):
            self.min_val.copy_(low)
            self.max_val.copy_(high)
            self.initialized.fill_(True)
        else:
            self.min_val.lerp_(low, self.momentum)
            self.max_val.lerp_(high, self.momentum)

    def quantization_parameters(self) -> tuple[Tensor, Tensor]:
        """(scale, zero point) of the current range."""
        low = self.min_val.clamp(max=0.0)
        high = self.max_val.clamp(min=0.0)
        levels = _ACTIVATION_RANGE[1] - _ACTIVATION_RANGE[0]
        scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).eps)
        zero_point = (_ACTIVATION_RANGE[0] - low / scale).round().clamp(*_ACTIVATION_RANGE).to(torch.int32)
        return scale, zero_point


def _fake_quantize_input(module: nn.Module, args: tuple) -> tuple:
    # module-level (no closure), so a deep copy of a prepared model quantizes with its own observers
    return (getattr(module, _INPUT_QUANT)(args[0]), *args[1:])


def _fake_quantize_output(module: nn.Module, args: tuple, output: object) -> object:
    if isinstance(output, Tensor):
        return getattr(module, _OUTPUT_QUANT)(output)
    return output


def _attach_observer(module: nn.Module, attribute: str, observer: ActivationFakeQuant, output: bool) -> None:
    setattr(module, attribute, observer)
    hook = _fake_quantize_output if output else _fake_quantize_input
    register = module.register_forward_hook if output else module.register_forward_pre_hook
    # kept on the observer: a deep copy of the model copies the handle with it, bound to the copy's hooks
    observer.hook_handle = register(hook)


def prepare_qat(
    model: nn.Module,
    calibration: Iterable[Tensor | Sequence[Tensor]] = (),
    momentum: float = 0.01,
) -> nn.Module:
    """A QAT copy of ``model`` (which is left untouched): int8 fake quantization of every Conv2d /
    ConvTranspose2d / Linear weight and input and of the model's output (see the module docstring).

    ``calibration`` batches (tensors, or tuples of forward arguments) set the initial activation ranges in an
    eval-mode pass, so training starts from the ranges post-training quantization would use.

    Raises:
        UnsupportedModelError: see :func:`check_quantizable`.
    """
    layer_names = set(check_quantizable(model))
    prepared = copy.deepcopy(model)
    reference = next(prepared.parameters())
    for name, layer in prepared.named_modules():
        if name not in layer_names:
            continue
        axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0  # weight (in, out, kh, kw) vs (out, ...)
        parametrize.register_parametrization(layer, "weight", PerChannelWeightFakeQuant(axis))
        _attach_observer(layer, _INPUT_QUANT, ActivationFakeQuant(momentum).to(reference.device), output=False)
    _attach_observer(prepared, _OUTPUT_QUANT, ActivationFakeQuant(momentum).to(reference.device), output=True)
    calibrate_qat(prepared, calibration)
    return prepared


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches: Iterable[Tensor | Sequence[Tensor]]) -> int:
    """Update the activation ranges of a QAT model on ``batches`` with every other layer in eval mode (BatchNorm
    running statistics untouched); returns the number of batches used."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if isinstance(module, ActivationFakeQuant):
            module.train()
    reference = next(model.parameters())
    used = 0
    try:
        for batch in batches:
            tensors = (batch,) if isinstance(batch, Tensor) else tuple(batch)
            model(*(tensor.to(reference.device) for tensor in tensors))
            used += 1
    finally:
        model.train(was_training)
    return used


def is_qat_prepared(model: nn.Module) -> bool:
    return hasattr(model, _OUTPUT_QUANT)


def strip_qat(model: nn.Module) -> nn.Module:
    """Turn a QAT model back into a plain fp32 network, in place, and return it: the fake-quantized weights are
    baked in (they already lie on the int8 grid), observers and hooks removed.

    In place because ``parametrize.remove_parametrizations`` edits the parametrized class, which deep copies
    of a parametrized model share: stripping a copy would break the original.
    """
    if not is_qat_prepared(model):
        raise ValueError(f"{type(model).__name__} was not prepared with prepare_qat: nothing to strip")
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for attribute in (_INPUT_QUANT, _OUTPUT_QUANT):
            observer = getattr(module, attribute, None)
            if observer is not None:
                observer.hook_handle.remove()
                delattr(module, attribute)
    return model


def export_qat_int8(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...],
    calibration_batches: Iterable[Tensor | Sequence[Tensor]],
    directory: str | os.PathLike,
    input_names: Sequence[str],
    **options,
) -> Int8Export:
    """Int8 ONNX model of a QAT-trained model: :func:`strip_qat` (in place: ``model`` becomes the plain fp32
    network with the QAT weights), then :func:`quantize_model_int8` with recalibrated activation ranges."""
    return quantize_model_int8(strip_qat(model), example_inputs, calibration_batches, directory, input_names,
                               **options)


# ------------------------------------------------------------------------------------------------ parity
def int8_parity(
    reference: Tensor,
    quantized: Tensor,
    target_masks: Tensor | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """How far int8 outputs drift from fp32 ones (same shape, logits).

    Always: ``mean_abs_logit_diff``, ``max_abs_logit_diff``. For one-channel (B, 1, H, W) logits (binary
    masks at probability ``threshold``): ``mask_dice_int8_vs_fp32``, the Dice of the int8 mask against the fp32
    mask pooled over all pixels (1 = identical; both empty counts as identical); with ``target_masks`` also
    ``dice_fp32``, ``dice_int8`` (pooled, against the targets) and ``dice_delta`` = int8 - fp32. For (B, C)
    class logits: ``agreement`` (the share of inputs whose top-1 class is the same) and, with ``target_masks``
    holding the (B,) labels of ordinal grades, ``qwk_fp32``, ``qwk_int8`` (quadratic-weighted kappa against the
    labels) and ``qwk_delta`` = int8 - fp32.
    """
    if reference.shape != quantized.shape:
        raise ValueError(f"fp32 outputs {tuple(reference.shape)} and int8 outputs {tuple(quantized.shape)} differ")
    reference, quantized = reference.detach().float().cpu(), quantized.detach().float().cpu()
    difference = (quantized - reference).abs()
    results = {"mean_abs_logit_diff": float(difference.mean()), "max_abs_logit_diff": float(difference.max())}
    if reference.ndim == 4 and reference.shape[1] == 1:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} is a probability in (0, 1)")
        cut = float(np.log(threshold / (1.0 - threshold)))  # sigmoid(x) > t  <=>  x > logit(t)
        fp32_mask, int8_mask = reference > cut, quantized > cut
        results["mask_dice_int8_vs_fp32"] = _pooled_dice(int8_mask, fp32_mask)
        if target_masks is not None:
            target = target_masks.detach().cpu().reshape(reference.shape) > 0.5
            results["dice_fp32"] = _pooled_dice(fp32_mask, target)
            results["dice_int8"] = _pooled_dice(int8_mask, target)
            results["dice_delta"] = results["dice_int8"] - results["dice_fp32"]
    elif reference.ndim == 2:
        fp32_class, int8_class = reference.argmax(1), quantized.argmax(1)
        results["agreement"] = float((fp32_class == int8_class).float().mean())
        if target_masks is not None:
            labels = target_masks.detach().cpu().reshape(-1)
            results["qwk_fp32"] = quadratic_weighted_kappa(labels, fp32_class, reference.shape[1])
            results["qwk_int8"] = quadratic_weighted_kappa(labels, int8_class, reference.shape[1])
            results["qwk_delta"] = results["qwk_int8"] - results["qwk_fp32"]
    return results


#: int8_parity_problems' defaults: int8 masks must agree with fp32's at this pooled Dice (per-channel
#: post-training int8 of the base-16 VGGUNet reached 0.987, see the module docstring)
DEFAULT_MIN_MASK_DICE = 0.98
#: share of inputs whose int8 top-1 class must be the fp32 network's (the DR student's QAT: 100%)
DEFAULT_MIN_AGREEMENT = 0.9
#: largest drop of the quadratic-weighted kappa against the labels, fp32 to int8
DEFAULT_MAX_QWK_DROP = 0.05


def int8_parity_problems(
    parity: Mapping[str, float],
    min_mask_dice: float = DEFAULT_MIN_MASK_DICE,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_qwk_drop: float = DEFAULT_MAX_QWK_DROP,
    max_mean_abs_logit_diff: float | None = None,
) -> list[str]:
    """The tolerances that :func:`int8_parity` results break, one line each (empty: the int8 model passes).

    The int8 model is judged on what its outputs are used for: masks on ``mask_dice_int8_vs_fp32``, class
    logits on ``agreement`` and, where labels were given, ``qwk_delta`` (a drop beyond ``max_qwk_drop``). A
    logit difference says little about a thresholded mask or an argmax (a drifted logit far from the
    threshold changes nothing), so it is judged only where ``max_mean_abs_logit_diff`` is set.
    """
    problems = []
    dice = parity.get("mask_dice_int8_vs_fp32")
    if dice is not None and dice < min_mask_dice:
        problems.append(f"Dice of int8 vs fp32 masks {dice:.4f} < min_mask_dice={min_mask_dice}")
    agreement = parity.get("agreement")
    if agreement is not None and agreement < min_agreement:
        problems.append(f"top-1 agreement of int8 and fp32 {agreement:.4f} < min_agreement={min_agreement}")
    qwk_delta = parity.get("qwk_delta")
    if qwk_delta is not None and qwk_delta < -max_qwk_drop:
        problems.append(f"QWK drops by {-qwk_delta:.4f} from fp32 to int8 > max_qwk_drop={max_qwk_drop}")
    if max_mean_abs_logit_diff is not None and parity["mean_abs_logit_diff"] > max_mean_abs_logit_diff:
        problems.append(f"mean |logit difference| {parity['mean_abs_logit_diff']:.4f} > "
                        f"max_mean_abs_logit_diff={max_mean_abs_logit_diff}")
    return problems


def quadratic_weighted_kappa(labels: Tensor, predicted: Tensor, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights over the grades 0..num_classes-1 (the class list is passed so that a
    grade absent from both labels and predictions still counts in the weights)."""
    return float(cohen_kappa_score(labels.cpu().long().numpy(), predicted.cpu().long().numpy(),
                                   labels=list(range(num_classes)), weights="quadratic"))


def measure_int8_parity(
    model: nn.Module,
    int8_path: str | os.PathLike,
    batches: Iterable[Mapping[str, Tensor]],
    input_names: Sequence[str],
    target_key: str | None = "mask",
    threshold: float = 0.5,
    max_batches: int | None = None,
    threads: int = 1,
) -> dict[str, float]:
    """:func:`int8_parity` of ``model`` (eval mode) against the int8 model file over dict batches (e.g. a
    validation loader); the targets are ``batch[target_key]`` when present. Adds ``images``. An ONNX file runs
    on ONNX Runtime, an OpenVINO IR ``.xml`` on OpenVINO (``compression.runtimes.open_runner``)."""
    run, _ = open_runner(int8_path, threads=threads)
    reference_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    references, quantized, targets = [], [], []
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = tuple(batch[name] for name in input_names)
                references.append(model(*(t.to(reference_device) for t in inputs)).float().cpu())
                quantized.append(torch.from_numpy(run(inputs)[0]))
                if target_key is not None and target_key in batch:
                    targets.append(batch[target_key])
    finally:
        model.train(was_training)
    if not references:
        raise ValueError("int8 parity needs at least one batch: the validation loader is empty")
    target = torch.cat(targets) if len(targets) == len(references) else None
    results = int8_parity(torch.cat(references), torch.cat(quantized), target, threshold)
    results["images"] = float(sum(len(r) for r in references))
    return results


def _pooled_dice(prediction: Tensor, target: Tensor) -> float:
    tp, fp, _, fn, _ = binary_stat_scores(prediction.long().flatten(), target.long().flatten(),
                                          validate_args=False).tolist()
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator
