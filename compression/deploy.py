"""The deployment bundle of a trained stage, and the predictor that runs it on one photograph at a time.

A bundle is one folder (``<run>/<stage>/deploy/`` when the ``DeploymentBundle`` callback writes it):

* ``bundle.json``: ``"format": 2``, the task (``grading`` or ``disc``), the network's input names, the class
  names (grading) or the mask threshold (disc), the preprocessing spec (``DRDataModule.inference_spec()`` /
  ``DiscDataModule.inference_spec()``: image size, crop, CLAHE, and for a DR student with topological features
  the fitted persistence imager), which files exist (``files``), the SHA-256 of each (``sha256``: file name ->
  hex digest), the fp32 ONNX parity and the int8 model's provenance and parity numbers;
* ``model.onnx``: the fp32 network (dynamic batch; the disc network's height and width are dynamic too);
* ``model_int8.onnx`` (when int8 was produced): ONNX Runtime static int8, post-training or from
  quantization-aware training;
* ``model.xml`` + ``model.bin`` and ``model_int8.xml`` + ``model_int8.bin`` (OpenVINO IR, fp32 weights kept
  fp32): the same fp32 network for OpenVINO, and its int8 model — NNCF's post-training int8 calibrated on the
  same images, or the quantization-aware training's int8 file read by OpenVINO. ``runtime`` in bundle.json
  records each runtime's batch-1 latency on the CPU that wrote the bundle and the faster one per precision
  (``Predictor``'s default, ``runtime=ort|openvino`` overrides it);
* ``network.safetensors`` (when the network can be described): the torch network for GradCAM on request, as
  its state dict plus, in the file's metadata, its architecture entry
  (``compression.packed_format.describe_network``: a segmentation network's ``spec()``, the DR student's or a
  timm classifier's build arguments). It is rebuilt by ``build_network`` and filled with the weights: nothing
  in a bundle is ever unpickled, so a bundle from a shared MLflow server cannot run code.

``load_bundle`` checks every listed file against its SHA-256 and refuses format-1 bundles (no hashes, and a
``network.pt`` that only unpickling could read): ``retest=true`` writes them again without training
(:func:`rebundle_advice`).

The bundle needs no Lightning, no dataset and no config: ``load_bundle`` + ``Predictor`` rebuild the
evaluation path of training (``datamodules.dr.grading_network_inputs`` /
``datamodules.optic_disc.disc_network_input``, the same functions the datamodules' ``inference_inputs`` use)
from the spec and run ONNX Runtime or OpenVINO on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.special import expit, softmax
from torch import Tensor, nn

from compression.export import Exporter, export_onnx, onnx_parity, ort_session
from compression.openvino_runtime import cpu_capabilities, quantize_openvino, save_ir
from compression.openvino_runtime import read_model as read_openvino_model
from compression.packed_format import build_network, describe_network
from compression.quantization import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_feeds,
    measure_int8_parity,
    quantize_onnx_static,
)
from compression.runtimes import OPENVINO, ORT, RUNTIMES, open_runner
from datamodules.dr import GRADING_TASK, grading_network_inputs, grading_preprocessing_from_spec
from datamodules.fundus import mask_on_source
from datamodules.optic_disc import (
    DISC_TASK,
    coarse_to_fine_from_spec,
    coarse_to_fine_mask,
    disc_network_input,
    disc_preprocessing_from_spec,
)
from datamodules.photograph import PhotographCheck, read_photograph
from lightning_modules.profiling import measure_latency

log = logging.getLogger(__name__)

#: 2: files hashed (``sha256``), the network as safetensors + architecture; 1 (refused): pickled network.pt
BUNDLE_FORMAT = 2
#: the bundle's folder inside a stage folder, and its artifact path in the stage's MLflow run
DEPLOY_FOLDER = "deploy"
#: MLflow tag of a stage's run: the absolute path of its bundle folder
DEPLOY_DIR_TAG = "deploy_dir"
MANIFEST_FILE = "bundle.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
#: OpenVINO IR: the .xml graph, its weights in the .bin of the same name
OPENVINO_FP32_FILE = "model.xml"
OPENVINO_INT8_FILE = "model_int8.xml"
NETWORK_FILE = "network.safetensors"
#: format 1's pickled whole network: removed when a folder is written again, never read
LEGACY_NETWORK_FILE = "network.pt"
#: the network file's ``format`` metadata entry
NETWORK_FORMAT = "retina-compress/network"
#: bundle.json's map of file name -> SHA-256 hex digest
HASHES_KEY = "sha256"
TASKS = (GRADING_TASK, DISC_TASK)
PRECISIONS = ("int8", "fp32")
#: ``runtime=auto``: the runtime bundle.json recorded as the faster one for the precision
AUTO_RUNTIME = "auto"
RUNTIME_CHOICES = (AUTO_RUNTIME, *RUNTIMES)
#: the runtimes' names in messages
RUNTIME_NAMES = {ORT: "ONNX Runtime", OPENVINO: "OpenVINO"}
DEFAULT_THRESHOLD = 0.5
#: bundle.json keys written by write_bundle itself; ``extra`` may not replace them
_RESERVED_KEYS = frozenset({"format", "task", "input_names", "output_names", "preprocessing", "files", HASHES_KEY,
                            "int8", "fp32_max_abs_diff", "versions", "created", "openvino", "runtime"})


class BundleError(ValueError):
    """A deployment bundle folder that cannot be used (missing, incomplete, damaged or of another format)."""


# ---------------------------------------------------------------------------------------------- bundle
@dataclass(frozen=True)
class Bundle:
    """A validated bundle folder (:func:`load_bundle`); ``manifest`` is its bundle.json."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def stage(self) -> str | None:
        return self.manifest.get("stage")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["input_names"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.manifest["preprocessing"]

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in self.manifest.get("class_names", [])]

    @property
    def threshold(self) -> float:
        return float(self.manifest.get("threshold", DEFAULT_THRESHOLD))

    def _file(self, kind: str) -> Path | None:
        name = self.manifest["files"].get(kind)
        return self.folder / name if name else None

    @property
    def fp32_path(self) -> Path:
        return self._file("fp32")

    @property
    def int8_path(self) -> Path | None:
        return self._file("int8")

    @property
    def network_path(self) -> Path | None:
        return self._file("network")

    def onnx_path(self, precision: str = "int8") -> tuple[Path, str]:
        """(ONNX file, its precision): ``int8`` gives the int8 model when the bundle has one, else fp32."""
        return _choose_precision(self.fp32_path, self.int8_path, precision)

    def model_path(self, runtime: str = ORT, precision: str = "int8") -> tuple[Path, str]:
        """(model file, its precision) for ``runtime``: the ONNX files for ONNX Runtime, the IR for OpenVINO;
        ``int8`` gives the int8 model when the bundle has one for that runtime, else fp32.

        Raises:
            BundleError: OpenVINO asked of a bundle without its IR (written before it had one, or OpenVINO
                failed then: bundle.json's ``openvino.error`` says why).
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: choose one of {RUNTIMES}")
        if runtime == ORT:
            return self.onnx_path(precision)
        fp32 = self._file("openvino_fp32")
        if fp32 is None:
            reason = (self.manifest.get("openvino") or {}).get("error", "it was written without one")
            raise BundleError(f"bundle {str(self.folder)!r} has no OpenVINO model ({reason}): run it with "
                              f"runtime=ort, or {rebundle_advice(self.folder, self.task)}")
        return _choose_precision(fp32, self._file("openvino_int8"), precision)

    def default_runtime(self, precision: str = "int8") -> str:
        """The runtime bundle.json measured faster for ``precision`` on the CPU that wrote it; for int8 asked of
        a bundle without an int8 model, fp32's (what then runs); ONNX Runtime for a bundle without that
        measurement."""
        measured = (self.manifest.get("runtime") or {}).get("default", {})
        chosen = measured.get(precision) or measured.get("fp32")
        return chosen if chosen in RUNTIMES else ORT

    def load_network(self) -> nn.Module:
        """The torch network (eval mode, CPU), rebuilt from its architecture and filled with its weights
        (:func:`read_network_file`): nothing is unpickled."""
        if self.network_path is None:
            raise BundleError(f"bundle {self.folder} has no {NETWORK_FILE} (the network could not be described "
                              "when it was written): GradCAM needs it; run without gradcam=true")
        return read_network_file(self.network_path, self.task)


def _choose_precision(fp32: Path, int8: Path | None, precision: str) -> tuple[Path, str]:
    """(model file, its precision) of one runtime's pair: the int8 file for ``int8`` when there is one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if precision == "int8" and int8 is not None:
        return int8, "int8"
    return fp32, "fp32"


def write_bundle(
    folder: str | os.PathLike,
    net: nn.Module,
    example_inputs: tuple[Tensor, ...],
    input_names: Sequence[str],
    task: str,
    preprocessing: dict[str, Any],
    extra: Mapping[str, Any],
    calibration_batches: Iterable[Tensor | Sequence[Tensor]] | None = None,
    int8_onnx: Path | None = None,
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    exporter: Exporter = "auto",
    threads: int = 1,
    architecture: Mapping[str, Any] | None = None,
    openvino: bool = True,
) -> Bundle:
    """Write the bundle of ``net`` into ``folder`` (created; earlier bundle files replaced); return it loaded.

    The fp32 ONNX model is exported with a dynamic batch (and, for ``task="disc"``, dynamic height and width)
    and checked against ``net`` on ``example_inputs``. Int8: ``int8_onnx`` (e.g. the int8 file a
    quantization-aware training stage wrote) is copied; otherwise, with ``calibration_batches`` (tensors or
    tuples of tensors in ``input_names`` order), up to ``calibration_images`` images calibrate a post-training
    static int8 model. Either way its parity with ``net`` on those calibration images goes into bundle.json.
    A failing int8 step is logged as a warning and recorded as ``int8.error``: the fp32 bundle stays usable.
    With ``openvino`` the same models are also written as OpenVINO IR (the int8 one by NNCF from the same
    calibration images, or read from ``int8_onnx``), with their parity, and both runtimes are timed at batch 1
    on ``threads`` threads to record the faster per precision (``runtime`` in bundle.json); a failing
    OpenVINO step is recorded as ``openvino.error`` and leaves the ONNX files usable.
    ``extra`` adds keys to bundle.json (``stage``, ``class_names`` for grading, ``threshold`` for disc, run
    ids).
    The network file (for GradCAM) holds ``net``'s weights and ``architecture``
    (``compression.packed_format.describe_network(net, module hparams)``; None: ``net`` must describe itself, as
    the segmentation networks do). It is read back and must give ``net``'s outputs on ``example_inputs``; a
    network that cannot be described or rebuilt gets no network file (a warning; the ONNX models do not need
    it), and is never pickled instead.
    bundle.json, with the SHA-256 of every file, is written last, so a folder without it is an interrupted write.

    Raises:
        ValueError: unknown task, a spec of another task, or ``extra`` replacing a key of the bundle itself.
        compression.export.ExportParityError: the fp32 ONNX model differs from ``net``.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose one of {TASKS}")
    if preprocessing.get("task", task) != task:
        raise ValueError(f"a {preprocessing.get('task')!r} preprocessing spec for a {task!r} bundle: pass "
                         "the spec of the datamodule the network was trained with")
    clashes = sorted(_RESERVED_KEYS & set(extra))
    if clashes:
        raise ValueError(f"extra keys {clashes} would replace the bundle's own entries: rename them")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the manifest first: an interrupted write never leaves a bundle that mixes old and new files
    for name in (MANIFEST_FILE, FP32_FILE, INT8_FILE, NETWORK_FILE, LEGACY_NETWORK_FILE,
                 *_ir_files(OPENVINO_FP32_FILE), *_ir_files(OPENVINO_INT8_FILE)):
        (folder / name).unlink(missing_ok=True)
    network = copy.deepcopy(net).cpu().eval().to(memory_format=torch.contiguous_format)
    inputs = tuple(tensor[:1].detach().cpu().contiguous() for tensor in example_inputs)
    fp32_path = export_onnx(network, inputs, folder / FP32_FILE, input_names, ("logits",), dynamic_batch=True,
                            exporter=exporter, dynamic_spatial=task == DISC_TASK)
    fp32_difference = onnx_parity(network, fp32_path, inputs, threads=threads)
    network_file = _save_network(network, architecture, folder / NETWORK_FILE, inputs)
    int8: dict[str, Any] | None = None
    threshold = float(extra.get("threshold", DEFAULT_THRESHOLD))
    feeds = ([] if calibration_batches is None
             else calibration_feeds(calibration_batches, input_names, calibration_images))
    if int8_onnx is not None or calibration_batches is not None:
        try:
            int8 = _int8_model(network, fp32_path, folder / INT8_FILE, input_names, feeds, int8_onnx, threshold,
                               threads)
        except Exception as error:  # any int8 failure leaves the fp32 bundle usable
            (folder / INT8_FILE).unlink(missing_ok=True)
            log.warning("Int8 model for the bundle in %s failed (%s: %s); the bundle keeps the fp32 model "
                        "only", folder, type(error).__name__, error)
            int8 = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    class_names = list(extra.get("class_names", []))
    if task == GRADING_TASK and not class_names:
        with torch.no_grad():
            class_names = [str(index) for index in range(int(network(*inputs).shape[1]))]
    files = {"fp32": FP32_FILE, "int8": INT8_FILE if int8 and "error" not in int8 else None,
             "network": network_file.name if network_file else None}
    openvino_models: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    if openvino:
        qat_int8 = folder / INT8_FILE if int8_onnx is not None and files["int8"] else None
        openvino_models, ir_files = _openvino_models(network, folder, fp32_path, qat_int8, feeds, inputs,
                                                     input_names, threshold, threads)
        files |= ir_files
        runtime = _fastest_runtimes(folder, files, inputs, threads)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "task": task,
        "input_names": list(input_names),
        "output_names": ["logits"],
        "preprocessing": preprocessing,
        "files": files,
        HASHES_KEY: {name: file_sha256(folder / name) for name in files.values() if name},
        "fp32_max_abs_diff": fp32_difference,
        "int8": int8,
        "openvino": openvino_models,
        "runtime": runtime,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": ov.__version__,
                     "nncf": _nncf_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(extra),
    }
    if task == GRADING_TASK:
        manifest["class_names"] = class_names
    else:
        manifest.setdefault("threshold", DEFAULT_THRESHOLD)
    write_atomically(folder / MANIFEST_FILE, lambda path: path.write_text(json.dumps(manifest, indent=2)))
    log.info("Deployment bundle in %s: %s", folder, ", ".join(n for n in manifest["files"].values() if n))
    return load_bundle(folder)


def _save_network(network: nn.Module, architecture: Mapping[str, Any] | None, path: Path,
                  inputs: tuple[Tensor, ...]) -> Path | None:
    """``path`` written by :func:`save_network_file` and checked by reading it back, or None (a warning)."""
    try:
        description = dict(architecture) if architecture is not None else describe_network(network)
        save_network_file(network, description, path)
        # a description that builds another network (a wrong hyperparameter) fails here, not at predict time
        with torch.no_grad():
            torch.testing.assert_close(read_network_file(path)(*inputs), network(*inputs))
    except Exception as error:  # the ONNX models do not need this file: the bundle stays usable without it
        path.unlink(missing_ok=True)
        log.warning("The bundle has no %s (%s: %s); GradCAM will be unavailable for it. A network is saved only "
                    "as weights + an architecture the suite rebuilds (compression.packed_format."
                    "describe_network), never pickled", path.name, type(error).__name__, error)
        return None
    return path


def save_network_file(net: nn.Module, architecture: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``net``'s state dict as safetensors, with ``architecture`` (plain JSON, see
    ``compression.packed_format.describe_network``) in the file's metadata; returns the path.

    Safetensors rather than ``torch.save``: the file holds tensors and a JSON header only, so reading it cannot
    run code, even with a planted file (``torch.load(weights_only=True)`` is a restricted unpickler, still a
    pickle reader).
    """
    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, str(path), metadata={"format": NETWORK_FORMAT, "architecture": json.dumps(dict(architecture))})
    return path


def read_network_file(path: str | os.PathLike, task: str | None = None) -> nn.Module:
    """The network of a :func:`save_network_file` file, rebuilt from its architecture by
    ``compression.packed_format.build_network`` (nothing downloaded), weights loaded strictly, eval mode, CPU.
    ``task`` (the bundle's) names the command that writes the file again in the messages.

    Raises:
        BundleError: not such a file (e.g. a pickled ``network.pt``), an architecture the suite cannot build, or
            weights that do not fit it; the message names the file.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            state = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as error:  # safetensors' own error, OSError: not a safetensors file, or a truncated one
        raise BundleError(f"{path} is not a safetensors network file ({type(error).__name__}: {error}); a "
                          "pickled network is never read: " + rebundle_advice(path.parent, task)) from error
    if metadata.get("format") != NETWORK_FORMAT or "architecture" not in metadata:
        raise BundleError(f"{path} is a safetensors file but not a network file of this suite (metadata "
                          f"format {metadata.get('format')!r}, expected {NETWORK_FORMAT!r} with an architecture)")
    try:
        architecture = json.loads(metadata["architecture"])
        net = build_network(architecture)
    except Exception as error:  # JSON, a builder's refusal, timm's unknown model: all "cannot be rebuilt"
        raise BundleError(f"{path}: its network cannot be rebuilt ({type(error).__name__}: {error})") from error
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise BundleError(f"weights in {path} do not fit the {architecture.get('kind')!r} network its "
                          f"architecture describes: {error}") from error
    return net.eval()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _int8_model(network: nn.Module, fp32_path: Path, int8_path: Path, input_names: Sequence[str],
                feeds: Sequence[Mapping[str, np.ndarray]], int8_onnx: Path | None, threshold: float,
                threads: int) -> dict[str, Any]:
    if int8_onnx is not None:
        if not Path(int8_onnx).is_file():
            raise FileNotFoundError(f"int8 model {str(int8_onnx)!r} does not exist")
        shutil.copyfile(int8_onnx, int8_path)
        int8 = {"source": "quantization-aware training", "copied_from": str(Path(int8_onnx).resolve())}
    else:
        quantize_onnx_static(fp32_path, int8_path, feeds)
        int8 = {"source": "post-training static quantization", "calibration_images": len(feeds)}
    ort_session(int8_path, threads)  # checks that ONNX Runtime loads the file, calibration images or not
    if feeds:
        int8["parity"] = _feeds_parity(network, int8_path, feeds, input_names, threshold, threads)
    return int8


def _feeds_parity(network: nn.Module, model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                  input_names: Sequence[str], threshold: float, threads: int) -> dict[str, float]:
    batches = ({name: torch.from_numpy(feed[name]) for name in input_names} for feed in feeds)
    return measure_int8_parity(network, model_path, batches, input_names, target_key=None, threshold=threshold,
                               threads=threads)


def _ir_files(xml_name: str) -> tuple[str, str]:
    return xml_name, str(Path(xml_name).with_suffix(".bin"))


def _nncf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nncf")
    except PackageNotFoundError:
        return ""


def _openvino_models(network: nn.Module, folder: Path, fp32_path: Path, qat_int8: Path | None,
                     feeds: Sequence[Mapping[str, np.ndarray]], inputs: tuple[Tensor, ...],
                     input_names: Sequence[str], threshold: float,
                     threads: int) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The bundle's OpenVINO IR files: (bundle.json's ``openvino`` entry, the ``files`` entries). The fp32 IR
    is checked against ``network`` on ``inputs``; the int8 IR (QAT's file when ``qat_int8``, else NNCF on
    ``feeds``) gets the same parity numbers as the ONNX int8 model. A failure is recorded, never raised."""
    files: dict[str, str | None] = dict.fromkeys(("openvino_fp32", "openvino_fp32_weights", "openvino_int8",
                                                  "openvino_int8_weights"))
    try:
        xml, weights = save_ir(read_openvino_model(fp32_path), folder / OPENVINO_FP32_FILE)
        run, executed = open_runner(xml, OPENVINO, threads)
        with torch.no_grad():
            expected = network(*inputs).float().numpy()
        entry: dict[str, Any] = {"fp32": {"max_abs_diff": float(np.abs(run(inputs)[0] - expected).max()),
                                          "executed_precision": executed}}
        files |= {"openvino_fp32": xml.name, "openvino_fp32_weights": weights.name}
    except Exception as error:  # an operation OpenVINO lacks must not lose the ONNX bundle
        for name in _ir_files(OPENVINO_FP32_FILE):
            (folder / name).unlink(missing_ok=True)
        log.warning("OpenVINO model for the bundle in %s failed (%s: %s); the bundle keeps its ONNX models",
                    folder, type(error).__name__, error)
        return {"error": f"{type(error).__name__}: {str(error)[:500]}"}, files
    if qat_int8 is None and not feeds:
        return entry, files
    try:
        if qat_int8 is not None:
            xml, weights = save_ir(read_openvino_model(qat_int8), folder / OPENVINO_INT8_FILE)
            int8: dict[str, Any] = {"source": "quantization-aware training (its int8 ONNX file)"}
        else:
            xml, weights = quantize_openvino(fp32_path, feeds, folder / OPENVINO_INT8_FILE)
            int8 = {"source": "NNCF post-training quantization", "calibration_images": len(feeds)}
        int8["executed_precision"] = open_runner(xml, OPENVINO, threads)[1]
        if feeds:
            int8["parity"] = _feeds_parity(network, xml, feeds, input_names, threshold, threads)
        files |= {"openvino_int8": xml.name, "openvino_int8_weights": weights.name}
    except Exception as error:
        for name in _ir_files(OPENVINO_INT8_FILE):
            (folder / name).unlink(missing_ok=True)
        log.warning("OpenVINO int8 model for the bundle in %s failed (%s: %s)", folder, type(error).__name__, error)
        int8 = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    entry["int8"] = int8
    return entry, files


#: timed calls per (runtime, precision) when a bundle records its faster runtime: enough for a stable median
#: of a batch-1 call, few enough that writing a bundle stays a matter of seconds
_RUNTIME_TIMING_RUNS = 15


def _fastest_runtimes(folder: Path, files: Mapping[str, str | None], inputs: tuple[Tensor, ...],
                      threads: int) -> dict[str, Any]:
    """Batch-1 median latency of every model file of the bundle on its runtime, and the faster runtime per
    precision: what ``runtime=auto`` runs."""
    models = {(ORT, "fp32"): files.get("fp32"), (ORT, "int8"): files.get("int8"),
              (OPENVINO, "fp32"): files.get("openvino_fp32"), (OPENVINO, "int8"): files.get("openvino_int8")}
    latency: dict[str, float] = {}
    for (runtime, precision), name in models.items():
        if not name:
            continue
        try:
            run, _ = open_runner(folder / name, runtime, threads)
            latency[f"{runtime}_{precision}"] = measure_latency(lambda run=run: run(inputs), _RUNTIME_TIMING_RUNS,
                                                                warmup=3).median_ms
        except Exception as error:  # a runtime that cannot run its file is simply not a candidate
            log.warning("Timing %s on %s failed: %s", name, runtime, error)
    default = {}
    for precision in PRECISIONS:
        candidates = {runtime: latency[f"{runtime}_{precision}"] for runtime in RUNTIMES
                      if f"{runtime}_{precision}" in latency}
        if candidates:
            default[precision] = min(candidates, key=candidates.get)
    return {"latency_ms": latency, "default": default, "threads": threads, "cpu_capabilities": cpu_capabilities()}


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` into ``.<name>.tmp`` beside ``path``, then rename it to ``path``: a crash never
    leaves a half-written file nor a half-replaced earlier one. The file gets the usual permissions (0666 less
    the umask, as any file ``open`` creates), not ``tempfile.mkstemp``'s private 0600."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def rebundle_advice(folder: str | os.PathLike, task: object = None) -> str:
    """How to write the bundle in ``folder`` again without training (``retest=true``), for the messages that
    refuse a bundle: the make target of ``task``, and the run folder when ``folder`` is ``<run>/<stage>/deploy``."""
    folder = Path(folder)
    run = folder.parent.parent
    run_folder = (str(run) if folder.name == DEPLOY_FOLDER and (run / "run_state.json").is_file()
                  else "<its run folder under outputs/>")
    targets = {GRADING_TASK: "dr-distill", DISC_TASK: "glaucoma-iterations"}
    target = targets[task] if task in TASKS else "|".join(targets.values())
    command = rebundle_command(f"make {target}", "<the run's overrides>", run_folder)
    return (f"write it again without training: {command} (finisher stages - student_qat, qat-*, share-* - "
            "cannot be tested again: use another stage of the run)")


def rebundle_command(target: str, overrides: str, run_folder: str) -> str:
    """The command that writes the bundles of a run's finished stages again without training (``retest=true``):
    ``target`` (``make dr-distill`` ...) with the run's ``overrides`` and its folder."""
    arguments = " ".join(part for part in (overrides, "retest=true", f"resume={run_folder}") if part)
    return f'{target} ARGS="{arguments}"'


def load_bundle(folder: str | os.PathLike) -> Bundle:
    """The bundle in ``folder``, checked: bundle.json readable and of format 2, a known task, every file it
    lists present and matching its SHA-256 in bundle.json. Format-1 bundles (no hashes; a pickled network.pt)
    are refused with the command that writes them again.

    Raises:
        BundleError: naming the folder or the file and what to do.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder {str(folder)!r} does not exist")
    if not manifest_path.is_file():
        raise BundleError(f"{str(folder)!r} has no {MANIFEST_FILE}: not a deployment bundle, or an "
                          "interrupted write. Bundles are written at the end of a stage's test into "
                          "<run>/<stage>/deploy/")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{manifest_path} cannot be read ({error}): the bundle is damaged; copy it again "
                          "or train the stage again") from error
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found == 1:
        raise BundleError(f"{manifest_path} has format 1: its files carry no SHA-256 and its {LEGACY_NETWORK_FILE} "
                          "could only be read by unpickling, so it is not used; "
                          + rebundle_advice(folder, manifest.get("task")))
    if found != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path} has format {found!r}; this code reads format {BUNDLE_FORMAT}")
    missing = [key for key in ("task", "input_names", "preprocessing", "files") if key not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks {missing}: the bundle is damaged; copy it again or train "
                          "the stage again")
    if manifest["task"] not in TASKS:
        raise BundleError(f"{manifest_path} names task {manifest['task']!r}; known tasks: {TASKS}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files.get("fp32"):
        raise BundleError(f"{manifest_path} lists no fp32 ONNX model: the bundle is damaged")
    hashes = manifest.get(HASHES_KEY)
    if not isinstance(hashes, dict):
        # without hashes a file swapped on the way (a shared store, a copy) cannot be told from the real one
        raise BundleError(f"{manifest_path} has no {HASHES_KEY!r} entry, so its files cannot be verified: "
                          + rebundle_advice(folder, manifest["task"]))
    for kind, name in files.items():
        if not name:
            continue
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{manifest_path} lists {name!r} ({kind}), not a file name inside the bundle "
                              "folder: the bundle is damaged or forged; do not use it")
        if not (folder / name).is_file():
            raise BundleError(f"bundle {str(folder)!r} lists {name} ({kind}) but the file is missing: copy "
                              "the whole deploy/ folder")
        expected = hashes.get(name)
        if not isinstance(expected, str):
            raise BundleError(f"{manifest_path} lists {name} ({kind}) without its SHA-256, so it cannot be "
                              "verified: " + rebundle_advice(folder, manifest["task"]))
        if file_sha256(folder / name) != expected.lower():
            raise BundleError(f"{folder / name} does not match its SHA-256 in {MANIFEST_FILE}: it was changed or "
                              "damaged after the bundle was written, and is not used. Copy the whole deploy/ "
                              "folder again from where it was written (or its MLflow run's deploy/ artifacts); "
                              "if the copy there differs too, " + rebundle_advice(folder, manifest["task"]))
    return Bundle(folder, manifest)


# ------------------------------------------------------------------------------------------- predicting
@dataclass(frozen=True)
class GradingPrediction:
    """One photograph's grade: ``probabilities`` over ``Bundle.class_names``; ``inputs`` are the network's
    inputs (for GradCAM); times in ms from reading the file to the result and of the ONNX model alone."""

    grade: int
    probabilities: np.ndarray
    inputs: tuple[Tensor, ...]
    latency_ms: float
    model_ms: float


@dataclass(frozen=True)
class DiscPrediction:
    """One photograph's optic disc: ``mask`` (uint8 0/255) and ``overlay`` (RGB) in the photograph's geometry;
    ``inputs`` is the network's input (for GradCAM)."""

    mask: np.ndarray
    overlay: np.ndarray
    inputs: tuple[Tensor, ...]
    latency_ms: float
    model_ms: float
    #: with a two-pass bundle: what the first pass found (``datamodules.disc_crops``: "found", or "no disc
    #: found" / "several disc candidates", when the whole-photograph mask was kept); "" for one pass
    first_pass: str = ""

    @property
    def area_fraction(self) -> float:
        """Share of the photograph's pixels that are disc."""
        return float((self.mask > 0).mean())


class Predictor:
    """Runs a bundle on image files: decode, check, preprocess exactly as training's evaluation, then the model
    on ONNX Runtime or OpenVINO.

    ``precision="int8"`` uses the bundle's int8 model when it has one (else fp32, see ``self.precision``);
    ``runtime="auto"`` the runtime the bundle measured faster for that precision (``self.runtime``), ``ort``
    or ``openvino`` that one.
    """

    def __init__(self, bundle: Bundle, precision: str = "int8", threads: int = 1, runtime: str = AUTO_RUNTIME):
        if runtime not in RUNTIME_CHOICES:
            raise ValueError(f"runtime={runtime!r}: choose one of {RUNTIME_CHOICES}")
        self.bundle = bundle
        self.runtime = bundle.default_runtime(precision) if runtime == AUTO_RUNTIME else runtime
        self.model_path, self.precision = bundle.model_path(self.runtime, precision)
        spec = bundle.preprocessing
        try:
            if bundle.task == GRADING_TASK:
                self._grading, imager = grading_preprocessing_from_spec(spec)
                if "topo" in bundle.input_names and imager is None:
                    raise ValueError("the network takes topological features but the spec has no fitted "
                                     "persistence imager")
                self._imager = imager if "topo" in bundle.input_names else None
            else:
                self._disc = disc_preprocessing_from_spec(spec)
                self._coarse_to_fine = coarse_to_fine_from_spec(spec)
            self.photograph_check = PhotographCheck.from_spec(spec)
        except (KeyError, TypeError, ValueError) as error:
            message = f"bundle {str(bundle.folder)!r}: its preprocessing spec cannot be used ({error})"
            raise BundleError(message) from error
        self._model, self.executed_precision = open_runner(self.model_path, self.runtime, threads)

    def predict_file(self, path: str | os.PathLike) -> GradingPrediction | DiscPrediction:
        """The prediction for one file.

        Raises:
            datamodules.photograph.UnreadableImageError: the file cannot be decoded, or only with damage.
            datamodules.photograph.NotAFundusError: it decodes, but is no usable fundus photograph, checked as
                training checked its photographs (``datamodules.photograph.read_photograph``).
        """
        started = time.perf_counter()
        image = read_photograph(path, self.photograph_check)
        if self.bundle.task == GRADING_TASK:
            return self._grade(image, started)
        return self._segment(image, started)

    def _run(self, inputs: Sequence[Tensor]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        (logits,) = self._model(inputs)[:1]
        return logits, (time.perf_counter() - started) * 1e3

    def _grade(self, image: np.ndarray, started: float) -> GradingPrediction:
        tensor, topo, _ = grading_network_inputs(image, self._grading, self._imager)
        inputs = (tensor, topo)[:len(self.bundle.input_names)]
        logits, model_ms = self._run(inputs)
        probabilities = softmax(logits[0].astype(np.float64))
        return GradingPrediction(int(np.argmax(probabilities)), probabilities, inputs,
                                 (time.perf_counter() - started) * 1e3, model_ms)

    def _segment(self, image: np.ndarray, started: float) -> DiscPrediction:
        tensor, _, crop = disc_network_input(image, self._disc)
        logits, model_ms = self._run((tensor,))
        # the probabilities are scaled to the photograph and thresholded there: a smooth boundary at any size
        probability = expit(logits[0, 0].astype(np.float32))
        threshold, first_pass = self.bundle.threshold, ""
        if self._coarse_to_fine.enabled:
            second_ms = []

            def second_pass(crop_tensor: Tensor) -> np.ndarray:
                crop_logits, milliseconds = self._run((crop_tensor,))
                second_ms.append(milliseconds)
                return expit(crop_logits[0, 0].astype(np.float32))

            found, search = coarse_to_fine_mask(image, probability, crop, self._disc, self._coarse_to_fine,
                                                threshold, second_pass)
            model_ms += sum(second_ms)
            first_pass = search.status
        else:
            found = mask_on_source(probability, crop, threshold)
        mask = found.astype(np.uint8) * np.uint8(255)
        latency_ms = (time.perf_counter() - started) * 1e3
        return DiscPrediction(mask, disc_overlay(image, mask), (tensor,), latency_ms, model_ms, first_pass)


def describe_predictor(predictor: Predictor) -> str:
    """What a predictor runs, for a log line: ``int8 model model_int8.xml on OpenVINO (runs in int8)``."""
    running = f" (runs in {predictor.executed_precision})" if predictor.executed_precision else ""
    return (f"{predictor.precision} model {predictor.model_path.name} on {RUNTIME_NAMES[predictor.runtime]}"
            f"{running}")


def disc_overlay(image_rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
                 alpha: float = 0.3) -> np.ndarray:
    """The photograph with the disc tinted and its contour drawn (line width grows with the image)."""
    overlay = image_rgb.copy()
    inside = mask > 0
    overlay[inside] = (overlay[inside] * (1 - alpha) + np.asarray(colour) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, colour, thickness=max(1, round(min(mask.shape) / 300)))
    return overlay
