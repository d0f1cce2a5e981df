"""Is this file a usable colour fundus photograph? One check for training (DR and disc), ``make predict`` and
``make evaluate``, so that nothing is trained on that prediction would refuse, and the reverse.

:func:`read_photograph` decodes a file as stored and names what makes it unusable:

* **unreadable**: missing, empty, not an image, or only partly decodable: a JPEG whose entropy-coded data is
  damaged decodes in libjpeg with a warning ("Corrupt JPEG data") and grey or smeared blocks, which OpenCV
  prints to stderr without naming the file and returns as a normal image. simplejpeg's ``strict`` mode turns
  those warnings into errors (:func:`jpeg_decoder_warning`);
* **not what the models saw**: transparency, greyscale (red-free, angiograms), not 8-bit, too small for the
  network's input size;
* **not a fundus photograph** (:func:`fundus_problem`): almost black, no retina, flat, noise, mostly white
  (a document or a scan), or no camera field of view.

The "not a fundus photograph" tests are cheap statistics, each far from what a fundus camera produces, so that
a real photograph is never refused. Measured on every image of the three real development sets (1,935
EyePACS images, contrast-enhanced by their uploader; 2,379 APTOS 2019 images, many cropped inside the retina
circle; 109 DRIONS-DB images, some with a grey rather than black surround) and on the synthetic generator,
against scikit-image's sample photographs (a portrait, a cat, a cup of coffee, a rocket), a scanned page and
uniform noise:

===============================  ===============================  =========================================
test                             every fundus photograph          the non-fundus images
===============================  ===============================  =========================================
dark frame corners (of 4)        >= 2 (4 in 4,412 of 4,423)       <= 1 (portrait 0, cat 1, coffee 1)
neighbour roughness              <= 0.17                          noise 0.86-0.92
near-white share of the retina   <= 0.51 (enhanced EyePACS)       scanned page 0.80
===============================  ===============================  =========================================

The field-of-view test assumes the camera's black (or dark grey) surround beyond the round field of view, which
every fundus camera leaves in at least two corners of the frame. Sets of crops around the optic disc (RIM-ONE,
REFUGE's disc crops) have none: ``data.require_field_of_view=false`` turns that one test off, and a deployment
bundle records the choice so that prediction checks its photographs as training did.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

log = logging.getLogger(__name__)

# Pixels darker than this (0-255 grey) are treated as the black surround of the retina. Camera
# borders are rarely pure 0 after JPEG compression, hence a small positive value.
RETINA_THRESHOLD = 10

#: Changes whenever the checks change what they accept: part of the preprocessing caches' keys, so that images
#: cached before a check existed are read, and checked, again.
PHOTOGRAPH_CHECK_VERSION = 2

#: shorter side in px below which no network input size is served: vessels and lesions are sub-pixel
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
#: median |difference| of horizontally neighbouring grey levels over the retina, as a share of the retina's grey
#: standard deviation (at 256 px on the shorter side): photographs are smooth at the pixel scale (<= 0.17 on
#: every development image), uniform noise is not (0.86-0.92)
MAX_ROUGHNESS = 0.4
#: share of retina pixels whose three channels all exceed 200: a page or a scan is mostly white (0.80); the
#: brightest fundus photographs, EyePACS images contrast-enhanced by their uploader, reach 0.51
MAX_WHITE_FRACTION = 0.65
#: corners of the frame darker than this share of the central region's median grey level are outside the
#: camera's round field of view; a fundus photograph has at least MIN_DARK_CORNERS of its 4
DARK_CORNER_RATIO = 0.4
MIN_DARK_CORNERS = 2
#: the statistics above are computed on the photograph resized to this shorter side, so that they do not
#: depend on the camera's resolution (and cost ~1 ms)
_STATISTICS_SIDE = 256
#: the first bytes of every JPEG file (SOI marker and the next marker's 0xFF)
_JPEG_SIGNATURE = b"\xff\xd8\xff"


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (missing, empty, truncated, damaged, not an image)."""


class NotAFundusError(ValueError):
    """A decoded image that is not a usable fundus photograph (see :func:`fundus_problem`)."""


#: what makes one file unusable for training or prediction: unreadable, or no usable fundus photograph
UNUSABLE_PHOTOGRAPH_ERRORS = (UnreadableImageError, NotAFundusError)


@dataclass(frozen=True)
class PhotographCheck:
    """The settings of :func:`fundus_problem` that depend on the run: ``min_side`` (px) and whether the camera's
    field of view must show (``data.require_field_of_view``)."""

    min_side: int = MIN_IMAGE_SIDE
    require_field_of_view: bool = True

    @classmethod
    def for_image_size(cls, image_size: int, require_field_of_view: bool = True) -> PhotographCheck:
        """The check of a network fed ``image_size`` px squares: a photograph upsampled more than twice to that
        size shows the network only blur."""
        return cls(max(MIN_IMAGE_SIDE, -(-int(image_size) // 2)), bool(require_field_of_view))

    @classmethod
    def from_spec(cls, spec: dict) -> PhotographCheck:
        """The check of a deployment bundle's preprocessing spec (``image_size``, ``require_field_of_view``; a
        spec written before the key existed was trained on photographs with a field of view)."""
        return cls.for_image_size(int(spec["image_size"]), bool(spec.get("require_field_of_view", True)))

    @property
    def key(self) -> str:
        """Part of a cache key: an image cached under one check is not taken as checked by another."""
        return f"chk{PHOTOGRAPH_CHECK_VERSION}-m{self.min_side}-fov{int(self.require_field_of_view)}"


def read_bytes(path: Path) -> np.ndarray:
    """The file's bytes for ``cv2.imdecode``, naming a missing or empty file."""
    # np.fromfile + imdecode rather than cv2.imread: imread returns None without saying why, and
    # cannot open non-ASCII paths on Windows.
    if not path.is_file():
        raise UnreadableImageError(f"{path}: file does not exist")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise UnreadableImageError(f"{path}: file is empty")
    return data


def retina_bounding_box(image: np.ndarray, threshold: int = RETINA_THRESHOLD) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels brighter than ``threshold``; the whole image if none."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    rows = np.flatnonzero((grey > threshold).any(axis=1))
    cols = np.flatnonzero((grey > threshold).any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return 0, image.shape[0], 0, image.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


#: the check of a photograph for no particular network (prediction of an old bundle, tests)
DEFAULT_CHECK = PhotographCheck()


def _statistics_image(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = _STATISTICS_SIDE / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def dark_corner_count(grey: np.ndarray) -> int:
    """How many of the frame's 4 corners (squares of 4% of the shorter side) are darker than
    ``DARK_CORNER_RATIO`` times the median of the frame's central half."""
    height, width = grey.shape
    side = max(2, round(0.04 * min(height, width)))
    centre = float(np.median(grey[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4]))
    corners = (grey[:side, :side], grey[:side, -side:], grey[-side:, :side], grey[-side:, -side:])
    return sum(float(np.median(corner)) < DARK_CORNER_RATIO * centre for corner in corners)


def roughness(grey: np.ndarray, retina: np.ndarray) -> float:
    """Median |difference| of horizontal neighbours inside ``retina``, over the retina's grey-level spread."""
    both = retina[:, 1:] & retina[:, :-1]
    steps = np.abs(np.diff(grey.astype(np.float32), axis=1))[both]
    spread = float(grey[retina].std())
    return float(np.median(steps)) / spread if steps.size and spread > 0 else 0.0


def fundus_problem(image: np.ndarray, check: PhotographCheck = DEFAULT_CHECK) -> str | None:
    """Why a decoded image (as :func:`read_photograph` decodes it: channels as stored, 16-bit already rescaled)
    is not a usable colour fundus photograph, or None when it is.

    In order: no alpha channel, 3 channels (1: greyscale), uint8 (e.g. not a float TIFF), a shorter side of at
    least ``check.min_side`` px, not almost black, a retina found (the bright region spans a good part of the
    frame), colour (three channels that differ), some contrast, not noise, not mostly white, and (unless
    ``check.require_field_of_view`` is off) the camera's dark surround in at least two corners.
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
    if min(height, width) < check.min_side:
        return (f"too small ({width}x{height} px): this model needs at least {check.min_side} px a side (half "
                "its input size; smaller photographs would be upsampled into blur)")
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
    small = _statistics_image(image)
    small_grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    small_retina = small_grey > RETINA_THRESHOLD
    rough = roughness(small_grey, small_retina)
    if rough > MAX_ROUGHNESS:
        return (f"not a photograph: neighbouring pixels are unrelated (roughness {rough:.2f} > {MAX_ROUGHNESS}), "
                "as in noise or a damaged file")
    white = float((small[small_retina].min(axis=1) > 200).mean())
    if white > MAX_WHITE_FRACTION:
        return (f"not a fundus photograph: {white:.0%} of it is near-white, as in a document or a scan (a "
                "retina is red to orange)")
    if check.require_field_of_view:
        corners = dark_corner_count(small_grey)
        if corners < MIN_DARK_CORNERS:
            return (f"not a fundus photograph: {corners} of the 4 frame corners are dark, but a fundus camera's "
                    f"round field of view leaves at least {MIN_DARK_CORNERS} dark. For crops around the optic "
                    "disc without that surround, set data.require_field_of_view=false")
    return None


def jpeg_decoder_warning(data: np.ndarray | bytes) -> str | None:
    """libjpeg's warning for a JPEG stream that decodes only with damage (e.g. "Corrupt JPEG data: premature
    end of data segment"), or None for an intact stream.

    OpenCV decodes such a file, prints libjpeg's warning to stderr without the file's name, and returns the
    damaged pixels. simplejpeg's ``strict`` decoding raises on warnings; a stream that also fails lenient decoding
    is left to OpenCV to judge (e.g. a CMYK JPEG, which TurboJPEG cannot turn into RGB but OpenCV can).
    """
    buffer = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        simplejpeg.decode_jpeg(buffer, colorspace="RGB", strict=True)
    except ValueError as strict_error:
        try:
            simplejpeg.decode_jpeg(buffer, colorspace="RGB", strict=False)
        except ValueError:
            return None
        return str(strict_error)
    return None


def read_photograph(path: str | os.PathLike, check: PhotographCheck = DEFAULT_CHECK) -> np.ndarray:
    """The photograph in ``path`` as RGB uint8, decoded as stored so that what the models never saw is named
    rather than silently converted (OpenCV's ``IMREAD_COLOR`` drops alpha, shifts 16-bit pixels right by 8 and
    replicates greyscale into three channels).

    16-bit images are rescaled by their own maximum (a 12-bit camera's 4095 becomes 255; dividing by 65535
    would leave it almost black) and logged. JPEG files, which cannot hold alpha, are decoded with their EXIF
    orientation applied (``IMREAD_UNCHANGED`` would ignore it).

    Raises:
        UnreadableImageError: missing, empty, not decodable, or decodable only with damage.
        NotAFundusError: decoded, but :func:`fundus_problem` names what makes it unusable.
    """
    path = Path(path)
    data = read_bytes(path)
    jpeg = data[:len(_JPEG_SIGNATURE)].tobytes() == _JPEG_SIGNATURE
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH if jpeg else cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image (corrupt, truncated or not an image format)")
    if jpeg:
        warning = jpeg_decoder_warning(data)
        if warning is not None:
            raise UnreadableImageError(f"{path}: the JPEG data is damaged and decodes only partly ({warning}); "
                                       "copy the file again from its source")
    if image.dtype == np.uint16:
        peak = int(image.max())
        # convertScaleAbs saturates to uint8; an all-zero image stays zero (and is refused as almost black)
        image = cv2.convertScaleAbs(image, alpha=255.0 / peak if peak else 0.0)
        log.info("%s: 16-bit image, rescaled to 8 bits by its own maximum (%d -> 255)", path, peak)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    problem = fundus_problem(image, check)
    if problem is not None:
        raise NotAFundusError(f"{path}: {problem}")
    return image


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.photograph FOLDER... [--image-size N] [--no-field-of-view]``: every image file
    under the folders through the check training applies; prints each refused file with its reason and a count
    per folder. Exit code 1 when any file is refused."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m datamodules.photograph", description=main.__doc__)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--image-size", type=int, default=224, help="the network's input size (data.image_size)")
    parser.add_argument("--no-field-of-view", action="store_true", help="data.require_field_of_view=false")
    arguments = parser.parse_args(argv)
    check = PhotographCheck.for_image_size(arguments.image_size, not arguments.no_field_of_view)
    suffixes = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
    refused_anywhere = False
    for folder in arguments.folders:
        files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in suffixes)
        started, refused = time.perf_counter(), 0
        for path in files:
            try:
                read_photograph(path, check)
            except UNUSABLE_PHOTOGRAPH_ERRORS as error:
                refused += 1
                print(f"refused: {error}")
        elapsed_ms = (time.perf_counter() - started) * 1e3 / max(1, len(files))
        print(f"{folder}: {len(files)} image(s), {refused} refused ({elapsed_ms:.1f} ms per image)")
        refused_anywhere |= refused > 0
    return 1 if refused_anywhere else 0


if __name__ == "__main__":
    raise SystemExit(main())
