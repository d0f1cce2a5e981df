"""The deployment bundle of a trained stage, and the predictor that runs it on one photograph at a time.

A bundle is one folder (``<run>/<stage>/deploy/`` when the ``DeploymentBundle`` callback writes it):

* ``bundle.json``: ``"format": 1``, the task (``grading`` or ``disc``), the network's input names, the class
  names (grading) or the mask threshold (disc), the preprocessing spec (``DRDataModule.inference_spec()`` /
  ``DiscDataModule.inference_spec()``: image size, crop, CLAHE, and for a DR student with topological features
  the fitted persistence imager), which files exist, the fp32 ONNX parity and the int8 model's provenance and
  parity numbers;
* ``model.onnx``: the fp32 network (dynamic batch; the disc network's height and width are dynamic too);
* ``model_int8.onnx`` (when int8 was produced): ONNX Runtime static int8, post-training or from
  quantization-aware training;
* ``network.pt``: the whole torch network (``torch.save``), for GradCAM on request.

The bundle needs no Lightning, no dataset and no config: ``load_bundle`` + ``Predictor`` rebuild the
evaluation path of training (``datamodules.dr.grading_network_inputs`` /
``datamodules.optic_disc.disc_network_input``, the same functions the datamodules' ``inference_inputs`` use)
from the spec and run ONNX Runtime on the CPU.
"""

from __future__ import annotations

import copy
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
import torch
from scipy.special import softmax
from torch import Tensor, nn

from compression.export import Exporter, export_onnx, onnx_parity, ort_session, run_session
from compression.quantization import (
    DEFAULT_CALIBRATION_IMAGES,
    calibration_feeds,
    measure_int8_parity,
    quantize_onnx_static,
)
from datamodules.dr import GRADING_TASK, grading_network_inputs, grading_preprocessing_from_spec
from datamodules.fundus import RETINA_THRESHOLD, UnreadableImageError, _read_bytes, retina_bounding_box
from datamodules.optic_disc import DISC_TASK, disc_network_input, disc_preprocessing_from_spec

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
#: the bundle's folder inside a stage folder, and its artifact path in the stage's MLflow run
DEPLOY_FOLDER = "deploy"
#: MLflow tag of a stage's run: the absolute path of its bundle folder
DEPLOY_DIR_TAG = "deploy_dir"
MANIFEST_FILE = "bundle.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
NETWORK_FILE = "network.pt"
TASKS = (GRADING_TASK, DISC_TASK)
PRECISIONS = ("int8", "fp32")
DEFAULT_THRESHOLD = 0.5
#: bundle.json keys written by write_bundle itself; ``extra`` may not replace them
_RESERVED_KEYS = frozenset({"format", "task", "input_names", "output_names", "preprocessing", "files", "int8",
                            "fp32_max_abs_diff", "versions", "created"})

# ---------------------------------------------------------------------------------- usable photographs
# Thresholds of fundus_problem. Each is far from what any fundus camera produces, so that a real photograph is
# never refused; they catch files that are images but not fundus photographs.
#: shorter side in px: below it vessels and lesions are sub-pixel (cameras give >= 1000 px; the models see
#: 224-256 px resized from them)
MIN_IMAGE_SIDE = 64
#: share of pixels brighter than RETINA_THRESHOLD: the retina covers about half a camera frame (a circle in a
#: 3:2 frame: 52%, more when cropped); under 5% the frame is essentially black (lens cap, failed flash)
MIN_BRIGHT_FRACTION = 0.05
#: the bright region's extent as a share of the frame's shorter side: a retina spans most of it in every
#: camera; a region under a quarter of it is a label or a reflection, not a retina
MIN_RETINA_SPAN = 0.25
#: mean |difference| between colour channels over the retina, grey levels: a colour fundus is red (R - B is
#: tens of levels); under 2 the image is greyscale (red-free, angiogram, scan), which the models never saw
MIN_CHANNEL_DIFFERENCE = 2.0
#: grey-level standard deviation over the retina: vessels, disc and illumination fall-off give tens of levels;
#: under 2 the image is flat (blank or uniform)
MIN_RETINA_CONTRAST = 2.0
#: the first bytes of every JPEG file (SOI marker and the next marker's 0xFF)
_JPEG_SIGNATURE = b"\xff\xd8\xff"


class BundleError(ValueError):
    """A deployment bundle folder that cannot be used (missing, incomplete, damaged or of another format)."""


class NotAFundusError(ValueError):
    """A decoded image that is not a usable fundus photograph (see :func:`fundus_problem`)."""


def fundus_problem(image: np.ndarray) -> str | None:
    """Why a decoded image (as :func:`read_photograph` decodes it: channels as stored, 16-bit already rescaled)
    is not a usable colour fundus photograph, or None when it is.

    Checks, in order: no alpha channel, 3 channels (1: greyscale), uint8 (e.g. not a float TIFF), a shorter
    side of at least ``MIN_IMAGE_SIDE`` px, not almost black, a retina found (the bright region spans a good part
    of the frame), colour (three channels that differ), some contrast.
    """
    channels = image.shape[2] if image.ndim == 3 else 1
    if channels == 4:
        return "has an alpha channel (transparent parts): save it as an opaque JPEG/PNG"
    if channels != 3:
        greyscale = " (greyscale)" if channels == 1 else ""
        return (f"{channels} channel(s){greyscale} after decoding, shape {image.shape}: a colour (RGB) "
                "photograph has 3")
    if image.dtype != np.uint8:
        return f"pixel type {image.dtype}: expected 8-bit colour (uint8)"
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        return (f"far too small ({width}x{height} px): a fundus photograph has at least {MIN_IMAGE_SIDE} px "
                "a side")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    bright = grey > RETINA_THRESHOLD
    if bright.mean() < MIN_BRIGHT_FRACTION:
        return (f"almost black: {bright.mean():.1%} of the pixels are brighter than {RETINA_THRESHOLD}/255 "
                f"(a retina covers about half the frame)")
    top, bottom, left, right = retina_bounding_box(image)
    span = max(bottom - top, right - left) / min(height, width)
    if span < MIN_RETINA_SPAN:
        return (f"no retina found: the bright region is only {right - left}x{bottom - top} px of a "
                f"{width}x{height} px frame")
    retina = image[bright].astype(np.float32)
    channel_difference = float(np.mean([np.abs(retina[:, a] - retina[:, b]).mean()
                                        for a, b in ((0, 1), (1, 2), (0, 2))]))
    if channel_difference < MIN_CHANNEL_DIFFERENCE:
        return "greyscale (the three colour channels are equal): the models grade colour fundus photographs"
    if float(grey[bright].std()) < MIN_RETINA_CONTRAST:
        return "a uniform image without structure (no vessels, no optic disc)"
    return None


def read_photograph(path: str | os.PathLike) -> np.ndarray:
    """The photograph in ``path`` as RGB uint8, decoded as stored so that what training never saw is named
    rather than silently converted (``datamodules.fundus.read_rgb``'s ``IMREAD_COLOR`` drops alpha, shifts
    16-bit pixels right by 8 and replicates greyscale into three channels).

    16-bit images are rescaled by their own maximum (a 12-bit camera's 4095 becomes 255; dividing by 65535
    would leave it almost black) and logged. JPEG files, which cannot hold alpha, are decoded with their EXIF
    orientation applied, as ``read_rgb`` did in training (``IMREAD_UNCHANGED`` would ignore it).

    Raises:
        datamodules.fundus.UnreadableImageError: missing, empty, or not decodable.
        NotAFundusError: decoded, but :func:`fundus_problem` names what makes it unusable.
    """
    path = Path(path)
    data = _read_bytes(path)
    jpeg = data[:len(_JPEG_SIGNATURE)].tobytes() == _JPEG_SIGNATURE
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if jpeg else cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt, truncated or not an image format)")
    if image.dtype == np.uint16:
        peak = int(image.max())
        # convertScaleAbs saturates to uint8; an all-zero image stays zero (and is refused as almost black)
        image = cv2.convertScaleAbs(image, alpha=255.0 / peak if peak else 0.0)
        log.info("%s: 16-bit image, rescaled to 8 bits by its own maximum (%d -> 255)", path, peak)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    problem = fundus_problem(image)
    if problem is not None:
        raise NotAFundusError(f"{path}: {problem}")
    return image


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
        if precision == "int8" and self.int8_path is not None:
            return self.int8_path, "int8"
        return self.fp32_path, "fp32"

    def load_network(self) -> nn.Module:
        """The whole torch network (eval mode, CPU). It is unpickled: load bundles you trust only."""
        if self.network_path is None:
            raise BundleError(f"bundle {self.folder} has no {NETWORK_FILE} (the network could not be saved "
                              "when it was written): GradCAM needs it; run without gradcam=true")
        net = torch.load(self.network_path, map_location="cpu", weights_only=False)
        if not isinstance(net, nn.Module):
            raise BundleError(f"{self.network_path} holds a {type(net).__name__}, not a torch network")
        return net.eval()


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
) -> Bundle:
    """Write the bundle of ``net`` into ``folder`` (created; earlier bundle files replaced); return it loaded.

    The fp32 ONNX model is exported with a dynamic batch (and, for ``task="disc"``, dynamic height and width)
    and checked against ``net`` on ``example_inputs``. Int8: ``int8_onnx`` (e.g. the int8 file a
    quantization-aware training stage wrote) is copied; otherwise, with ``calibration_batches`` (tensors or
    tuples of tensors in ``input_names`` order), up to ``calibration_images`` images calibrate a post-training
    static int8 model. Either way its parity with ``net`` on those calibration images goes into bundle.json.
    A failing int8 step is logged as a warning and recorded as ``int8.error``: the fp32 bundle stays usable.
    ``extra`` adds keys to bundle.json (``stage``, ``class_names`` for grading, ``threshold`` for disc, run
    ids).
    bundle.json is written last, so a folder without it is an interrupted write.

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
    for name in (MANIFEST_FILE, FP32_FILE, INT8_FILE, NETWORK_FILE):
        (folder / name).unlink(missing_ok=True)
    network = copy.deepcopy(net).cpu().eval().to(memory_format=torch.contiguous_format)
    inputs = tuple(tensor[:1].detach().cpu().contiguous() for tensor in example_inputs)
    fp32_path = export_onnx(network, inputs, folder / FP32_FILE, input_names, ("logits",), dynamic_batch=True,
                            exporter=exporter, dynamic_spatial=task == DISC_TASK)
    fp32_difference = onnx_parity(network, fp32_path, inputs, threads=threads)
    network_file = _save_network(network, folder / NETWORK_FILE)
    int8: dict[str, Any] | None = None
    if int8_onnx is not None or calibration_batches is not None:
        try:
            threshold = float(extra.get("threshold", DEFAULT_THRESHOLD))
            int8 = _int8_model(network, fp32_path, folder / INT8_FILE, input_names, calibration_batches,
                               int8_onnx, calibration_images, threshold, threads)
        except Exception as error:  # any int8 failure leaves the fp32 bundle usable
            (folder / INT8_FILE).unlink(missing_ok=True)
            log.warning("Int8 model for the bundle in %s failed (%s: %s); the bundle keeps the fp32 model "
                        "only", folder, type(error).__name__, error)
            int8 = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
    class_names = list(extra.get("class_names", []))
    if task == GRADING_TASK and not class_names:
        with torch.no_grad():
            class_names = [str(index) for index in range(int(network(*inputs).shape[1]))]
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "task": task,
        "input_names": list(input_names),
        "output_names": ["logits"],
        "preprocessing": preprocessing,
        "files": {"fp32": FP32_FILE, "int8": INT8_FILE if int8 and "error" not in int8 else None,
                  "network": network_file.name if network_file else None},
        "fp32_max_abs_diff": fp32_difference,
        "int8": int8,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
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


def _save_network(network: nn.Module, path: Path) -> Path | None:
    try:
        torch.save(network, path)
    except Exception as error:  # pickling; the ONNX models do not need this file
        path.unlink(missing_ok=True)
        log.warning("The bundle has no %s: the network cannot be pickled (%s); GradCAM will be unavailable",
                    path.name, error)
        return None
    return path


def _int8_model(network: nn.Module, fp32_path: Path, int8_path: Path, input_names: Sequence[str],
                calibration_batches: Iterable[Tensor | Sequence[Tensor]] | None, int8_onnx: Path | None,
                calibration_images: int, threshold: float, threads: int) -> dict[str, Any]:
    feeds = ([] if calibration_batches is None
             else calibration_feeds(calibration_batches, input_names, calibration_images))
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
        batches = ({name: torch.from_numpy(feed[name]) for name in input_names} for feed in feeds)
        int8["parity"] = measure_int8_parity(network, int8_path, batches, input_names, target_key=None,
                                             threshold=threshold, threads=threads)
    return int8


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


def load_bundle(folder: str | os.PathLike) -> Bundle:
    """The bundle in ``folder``, checked: bundle.json readable and of format 1, a known task, every file it
    lists present.

    Raises:
        BundleError: naming the folder or the missing file and what to do.
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
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
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
    for kind, name in files.items():
        if name and not (folder / name).is_file():
            raise BundleError(f"bundle {str(folder)!r} lists {name} ({kind}) but the file is missing: copy "
                              "the whole deploy/ folder")
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

    @property
    def area_fraction(self) -> float:
        """Share of the photograph's pixels that are disc."""
        return float((self.mask > 0).mean())


class Predictor:
    """Runs a bundle on image files: decode, check, preprocess exactly as training's evaluation, ONNX Runtime.

    ``precision="int8"`` uses the bundle's int8 model when it has one (else fp32, see ``self.precision``).
    """

    def __init__(self, bundle: Bundle, precision: str = "int8", threads: int = 1):
        self.bundle = bundle
        self.onnx_path, self.precision = bundle.onnx_path(precision)
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
        except (KeyError, TypeError, ValueError) as error:
            message = f"bundle {str(bundle.folder)!r}: its preprocessing spec cannot be used ({error})"
            raise BundleError(message) from error
        self.session = ort_session(self.onnx_path, threads)

    def predict_file(self, path: str | os.PathLike) -> GradingPrediction | DiscPrediction:
        """The prediction for one file.

        Raises:
            datamodules.fundus.UnreadableImageError: the file cannot be decoded.
            NotAFundusError: it decodes, but is no usable fundus photograph (:func:`read_photograph`).
        """
        started = time.perf_counter()
        image = read_photograph(path)
        if self.bundle.task == GRADING_TASK:
            return self._grade(image, started)
        return self._segment(image, started)

    def _run(self, inputs: Sequence[Tensor]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        (logits,) = run_session(self.session, inputs)[:1]
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
        threshold = self.bundle.threshold
        # sigmoid(x) > t  <=>  x > logit(t): no sigmoid over every pixel
        square = (logits[0, 0] > np.log(threshold / (1.0 - threshold))).astype(np.uint8)
        mask = crop.to_source(square) * np.uint8(255)
        latency_ms = (time.perf_counter() - started) * 1e3
        return DiscPrediction(mask, disc_overlay(image, mask), (tensor,), latency_ms, model_ms)


def disc_overlay(image_rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
                 alpha: float = 0.3) -> np.ndarray:
    """The photograph with the disc tinted and its contour drawn (line width grows with the image)."""
    overlay = image_rgb.copy()
    inside = mask > 0
    overlay[inside] = (overlay[inside] * (1 - alpha) + np.asarray(colour) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(overlay, contours, -1, colour, thickness=max(1, round(min(mask.shape) / 300)))
    return overlay
