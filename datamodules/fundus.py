"""Reading and preprocessing fundus photographs, with an on-disk cache.

Raw APTOS / EyePACS photographs are 1-12 megapixels with black borders; decoding one costs far
more than a training step on a 224 px crop. Every image is therefore decoded once, cropped to the
retina circle, resized and written to a cache keyed by the source file (path, size, mtime) and
the preprocessing parameters, so later epochs and later runs read a small ``.npy``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from datamodules.errors import DataValidationError

# decoding and the fundus-photograph check live in datamodules.photograph (imported from here too)
from datamodules.photograph import (
    RETINA_THRESHOLD,
    UNUSABLE_PHOTOGRAPH_ERRORS,
    PhotographCheck,
    UnreadableImageError,
    read_bytes,
    read_photograph,
    retina_bounding_box,
)

log = logging.getLogger(__name__)

# Bumped whenever the preprocessing code changes what it writes, so stale cache entries are ignored.
PREPROCESS_VERSION = 1

def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB uint8 array, or raise UnreadableImageError naming the file."""
    path = Path(path)
    data = read_bytes(path)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt, truncated or not an image format)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise UnreadableImageError(f"{path}: expected a colour image, got shape {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_grey(path: str | Path) -> np.ndarray:
    """Decode an image file to a single-channel uint8 array (colour is converted), naming the file on failure.

    Used for segmentation masks: OpenCV scales 16-bit files to 8 bits and maps palette PNGs through
    their palette, so every mask ends up on the same 0-255 scale.
    """
    path = Path(path)
    image = cv2.imdecode(read_bytes(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt, truncated or not an image format)")
    return image


def crop_to_retina(image: np.ndarray, threshold: int = RETINA_THRESHOLD) -> np.ndarray:
    """Crop the black surround and pad to a square centred on the retina.

    EyePACS photographs often cut the circle at the top and bottom; padding (not stretching)
    keeps the disc round, which the CNN and the topology of lesions both rely on.
    """
    return retina_square_crop(image, threshold).apply(image)


@dataclass(frozen=True)
class SquareCrop:
    """A box of a source image (rows ``top:bottom``, columns ``left:right``) padded with black to a square.

    One box computed from a photograph is applied to its mask too, so both stay aligned; ``to_source``
    maps a mask predicted on the (resized) square back onto the original photograph.
    """

    top: int
    bottom: int
    left: int
    right: int
    source_height: int
    source_width: int

    @classmethod
    def whole(cls, shape: tuple[int, ...]) -> SquareCrop:
        """The whole image, only padded to a square."""
        return cls(0, shape[0], 0, shape[1], shape[0], shape[1])

    @property
    def side(self) -> int:
        return max(self.bottom - self.top, self.right - self.left)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """Black rows/columns added (top, bottom, left, right): the box is centred in the square."""
        pad_y = self.side - (self.bottom - self.top)
        pad_x = self.side - (self.right - self.left)
        return pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Crop and pad an image (HxWxC) or mask (HxW) of the source's size."""
        if image.shape[:2] != (self.source_height, self.source_width):
            raise ValueError(f"SquareCrop of a {self.source_height}x{self.source_width} image applied to one of "
                             f"shape {image.shape}")
        cropped = image[self.top : self.bottom, self.left : self.right]
        return cv2.copyMakeBorder(cropped, *self.padding, cv2.BORDER_CONSTANT, value=0)

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        """(top, bottom, left, right, source_height, source_width): ``SquareCrop(*box.as_tuple())`` rebuilds it,
        so a box can travel in a batch as six integers."""
        return self.top, self.bottom, self.left, self.right, self.source_height, self.source_width

    def to_source(self, mask: np.ndarray, *, smooth: bool = False) -> np.ndarray:
        """A square map (any resolution) mapped back onto the source image (0 outside the box).

        ``smooth=False`` resizes with nearest neighbour, for a 0/1 mask. ``smooth=True`` interpolates
        bilinearly, for a float probability map that is thresholded afterwards: a mask predicted at 128 px
        and scaled to a 2000 px photograph then has a smooth boundary instead of 16-pixel stairs.
        """
        if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"to_source expects a square 2-D mask, got shape {mask.shape}")
        interpolation = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST_EXACT
        square = cv2.resize(mask, (self.side, self.side), interpolation=interpolation)
        pad_top, _, pad_left, _ = self.padding
        height, width = self.bottom - self.top, self.right - self.left
        source = np.zeros((self.source_height, self.source_width), dtype=mask.dtype)
        source[self.top : self.bottom, self.left : self.right] = square[
            pad_top : pad_top + height, pad_left : pad_left + width
        ]
        return source


def mask_on_source(probability: np.ndarray, crop: SquareCrop, threshold: float) -> np.ndarray:
    """A square probability map (any resolution) as a bool mask of the photograph ``crop`` was cut from.

    The probabilities are interpolated bilinearly to the photograph's scale and thresholded there (strictly
    greater, as ``lightning_modules.seg_metrics.binarize``), which is how the clinic's mask is drawn.
    """
    return crop.to_source(np.asarray(probability, dtype=np.float32), smooth=True) > threshold


def retina_square_crop(image: np.ndarray, threshold: int = RETINA_THRESHOLD) -> SquareCrop:
    """The crop ``crop_to_retina`` applies: the retina's bounding box, padded to a centred square."""
    top, bottom, left, right = retina_bounding_box(image, threshold)
    return SquareCrop(top, bottom, left, right, image.shape[0], image.shape[1])


def clahe_lab(
    image_rgb: np.ndarray, clip_limit: float | None = 2.0, tile_grid: int = 8, equalize_hist: bool = False
) -> np.ndarray:
    """Contrast enhancement of the lightness only: optional global histogram equalisation, then CLAHE.

    Working on L of CIE LAB (not on each RGB channel) raises the contrast of the disc rim and vessels
    without shifting hues. ``clip_limit=None`` skips CLAHE (global equalisation alone). Returns RGB uint8
    of the input's shape.
    """
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"clahe_lab expects an HxWx3 uint8 RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    if tile_grid < 1 or (clip_limit is not None and clip_limit <= 0):
        raise ValueError(f"clahe_lab: clip_limit={clip_limit} must be > 0 (or None), tile_grid={tile_grid} >= 1")
    lab = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2LAB)
    lightness = lab[..., 0]
    if equalize_hist:
        lightness = cv2.equalizeHist(lightness)
    if clip_limit is not None:
        lightness = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid)).apply(lightness)
    lab[..., 0] = lightness
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def circular_mask(size: int, margin: float = 0.0) -> np.ndarray:
    """Boolean mask of the inscribed circle of a square image (used after Ben Graham filtering)."""
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2 * (1 - margin)) ** 2


def ben_graham(image: np.ndarray, sigma_fraction: float = 1 / 30) -> np.ndarray:
    """Subtract the local average colour (Ben Graham, Kaggle DR 2015 winner) and re-blacken the surround.

    Removes the illumination and pigmentation differences between cameras and patients that
    otherwise dominate what a CNN sees, leaving lesions and vessels.
    """
    size = image.shape[0]
    blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=max(size * sigma_fraction, 1.0))
    enhanced = cv2.addWeighted(image, 4, blurred, -4, 128)
    enhanced[~circular_mask(size, margin=0.05)] = 0
    return enhanced


def resize_square(square: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a square image to ``image_size`` px: area interpolation when shrinking (no aliasing), else cubic."""
    interpolation = cv2.INTER_AREA if square.shape[0] > image_size else cv2.INTER_CUBIC
    return cv2.resize(square, (image_size, image_size), interpolation=interpolation)


def preprocess_fundus(image: np.ndarray, image_size: int, use_ben_graham: bool = False) -> np.ndarray:
    """Crop to the retina, resize to ``image_size`` squared (area interpolation), optionally Ben Graham."""
    resized = resize_square(crop_to_retina(image), image_size)
    if use_ben_graham:
        resized = ben_graham(resized)
    return np.ascontiguousarray(resized)


@dataclass(frozen=True)
class FundusPreprocessing:
    """Preprocessing parameters; part of every cache key."""

    image_size: int = 224
    ben_graham: bool = False

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return preprocess_fundus(image, self.image_size, self.ben_graham)

    @property
    def key(self) -> str:
        return f"v{PREPROCESS_VERSION}-s{self.image_size}-bg{int(self.ben_graham)}"


def check_preprocessing_spec(spec: Mapping[str, Any], task: str, version: int) -> None:
    """Check that a preprocessing spec (a deployment bundle's, see ``datamodules.dr.grading_spec`` /
    ``datamodules.optic_disc.disc_spec``) is one of ``task`` written by preprocessing ``version``.

    Raises:
        ValueError: the spec is of another task, or of another preprocessing version (its model saw
            differently prepared images).
    """
    if spec.get("task") != task:
        raise ValueError(f"preprocessing spec of task {spec.get('task')!r} is not a {task!r} spec")
    if spec.get("preprocess_version") != version:
        raise ValueError(f"preprocessing spec version {spec.get('preprocess_version')!r} differs from this "
                         f"code's {version}: the model saw differently prepared images; re-export it with this "
                         "code version")


def source_key(path: str | Path, *parts: str) -> str:
    """Cache key of a source file: absolute path, size and mtime (so an edited file is re-read) + params."""
    path = Path(path).resolve()
    stat = path.stat()
    text = "|".join([str(path), str(stat.st_size), str(stat.st_mtime_ns), *parts])
    return hashlib.sha1(text.encode()).hexdigest()


def data_fingerprint(records: Iterable[str]) -> str:
    """Short hash of one line per sample (id, label, file sizes ...): changes whenever the data does."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record}\n".encode())
    return digest.hexdigest()[:16]


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write via a temporary file + rename, so a killed run never leaves a half-written cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        np.save(handle, array, allow_pickle=False)
        tmp_name = handle.name
    os.replace(tmp_name, path)


def _shape_matches(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(e is None or e == a for a, e in zip(actual, expected))


def load_npy_checked(path: Path, shape: tuple[int | None, ...], dtype: np.dtype) -> np.ndarray | None:
    """Load a cache entry, or None if it is missing or not what it should be (then it is rebuilt).

    ``None`` in ``shape`` matches any length (e.g. a diagram's number of points).
    """
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        log.warning("Cache entry %s is corrupt (%s): rebuilding it", path, error)
        return None
    if not _shape_matches(array.shape, shape) or array.dtype != dtype:
        log.warning("Cache entry %s has shape %s %s, expected %s %s: rebuilding it",
                    path, array.shape, array.dtype, shape, np.dtype(dtype))
        return None
    return array


def failures_in_threads(
    load: Callable[..., object],
    items: Sequence[object],
    num_threads: int = 2,
    errors: tuple[type[Exception], ...] = UNUSABLE_PHOTOGRAPH_ERRORS,
) -> list[tuple[int, str]]:
    """Call ``load`` on every item in a thread pool; (position, message) of the calls that raised one of
    ``errors``.

    The warm-up of the caches: every file is tried, so all bad ones are reported together.
    """
    from concurrent.futures import ThreadPoolExecutor

    def load_one(item: object) -> str | None:
        try:
            load(item)
        except errors as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return [(position, problem) for position, problem in enumerate(pool.map(load_one, items))
                if problem is not None]


#: the columns of the table of files ``data.skip_unusable=true`` left out
SKIPPED_COLUMNS = ["sample_id", "path", "reason"]


def drop_unusable(index: pd.DataFrame, paths: Sequence[str], problems: Sequence[tuple[int, str]], skip: bool,
                  what: str, fix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows of ``index`` whose file is usable, sample_id/path/reason of those left out), from the
    ``problems`` of a cache warm-up (``failures_in_threads``: positions into ``index`` and ``paths``).

    Raises:
        DataValidationError: there are problems and not ``skip`` (``data.skip_unusable``): every file with its
            reason, ``fix``, and the way out.
    """
    if not problems:
        return index, pd.DataFrame(columns=SKIPPED_COLUMNS)
    if not skip:
        raise DataValidationError(
            f"{len(problems)} of {len(paths)} {what} cannot be used; nothing was trained",
            [problem for _, problem in problems],
            fix=f"{fix} Or set data.skip_unusable=true to train without them: they are then listed in the run's "
                "skipped_files.csv (an MLflow artifact) and counted as data/skipped_files.",
        )
    positions = [position for position, _ in problems]
    skipped = pd.DataFrame({"sample_id": [index["sample_id"].iloc[position] for position in positions],
                            "path": [paths[position] for position in positions],
                            "reason": [problem.removeprefix(f"{paths[position]}: ") for position, problem in problems]},
                           columns=SKIPPED_COLUMNS)
    log.warning("data.skip_unusable=true: training without %d unusable %s of %d:\n%s", len(problems), what,
                len(paths), "\n".join(f"  - {message}" for _, message in problems[:20]))
    return index.drop(index.index[positions]).reset_index(drop=True), skipped


class PreprocessedImageCache:
    """Preprocessed fundus images on disk, one ``.npy`` per (source file, preprocessing, photograph check).

    Only photographs that pass ``check`` are cached, so an entry is a checked photograph.
    """

    def __init__(self, cache_dir: str | Path, preprocessing: FundusPreprocessing,
                 check: PhotographCheck | None = None):
        self.check = check or PhotographCheck.for_image_size(preprocessing.image_size)
        self.root = Path(cache_dir) / "preprocessed" / f"{preprocessing.key}-{self.check.key}"
        self.preprocessing = preprocessing

    def _entry(self, source: Path) -> Path:
        key = source_key(source, self.preprocessing.key)
        return self.root / key[:2] / f"{key}.npy"

    def load(self, source: str | Path) -> np.ndarray:
        """The preprocessed image, decoding, checking and caching the source on a miss or a corrupt entry."""
        source = Path(source)
        if not source.is_file():
            raise UnreadableImageError(f"{source}: file does not exist")
        entry = self._entry(source)
        size = self.preprocessing.image_size
        cached = load_npy_checked(entry, (size, size, 3), np.dtype(np.uint8))
        if cached is not None:
            return cached
        image = self.preprocessing(read_photograph(source, self.check))
        atomic_save_npy(entry, image)
        return image

    def warm(self, sources: list[Path], num_threads: int = 2) -> list[tuple[int, str]]:
        """Decode, check and cache every source; (position, message) of every unusable one.

        Runs before training so a truncated JPEG found at epoch 7 cannot crash a night's run.
        OpenCV releases the GIL while decoding, so threads give a real speed-up.
        """
        return failures_in_threads(self.load, sources, num_threads)
