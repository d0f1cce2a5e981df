"""Coarse-to-fine optic-disc segmentation: find the disc on the whole photograph, then segment a crop around it.

At 96-128 px a whole photograph's disc is 15-25 px wide and its outline a few pixels. The first pass finds
the disc on the downscaled photograph; the second segments a square crop around it (``crop_scale`` times the
found disc's size) at the same network input size, so the disc spans most of the input, and its mask is
pasted back onto the photograph at full resolution. One network serves both passes: it is trained on whole
photographs and on disc-centred crops with jittered position and scale, mixed in every epoch.

Everything here is plain geometry on numpy arrays (no network), shared by training (``DiscDataModule``), test
scoring (``DiscSegmenter``) and deployment (``compression.deploy.Predictor``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from datamodules.fundus import SquareCrop, resize_square

#: what the first pass found (``DiscSearch.status``)
FOUND, NO_DISC, SEVERAL = "found", "no disc found", "several disc candidates"
_EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)


@dataclass(frozen=True)
class CoarseToFine:
    """The two-pass settings (``data.coarse_to_fine.*``; recorded in the deployment bundle).

    Attributes:
        enabled: two passes at test and prediction time, and disc-centred crops in training.
        crop_scale: the second pass's square side as a multiple of the found disc's diameter.
        crop_fraction: the share of training samples that are disc-centred crops (the rest whole photographs).
        scale_jitter: training crops' side is ``crop_scale`` times a factor drawn log-uniformly from
            ``[1 / (1 + scale_jitter), 1 + scale_jitter]``.
        shift_jitter: training crops' centre moves by up to this fraction of the disc's diameter, each axis.
        min_blob_fraction: first-pass blobs smaller than this fraction of the largest are ignored; more than
            one blob left is "several candidates", and the whole-photograph mask is kept.
    """

    enabled: bool = False
    crop_scale: float = 3.0
    crop_fraction: float = 0.5
    scale_jitter: float = 0.25
    shift_jitter: float = 0.25
    min_blob_fraction: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if not self.crop_scale >= 1.2:
            problems.append(f"data.coarse_to_fine.crop_scale={self.crop_scale} must be >= 1.2 (the crop must hold "
                            "the disc with a margin)")
        if not 0.0 <= self.crop_fraction <= 1.0:
            problems.append(f"data.coarse_to_fine.crop_fraction={self.crop_fraction} must lie in [0, 1]")
        if not 0.0 <= self.scale_jitter <= 1.0 or not 0.0 <= self.shift_jitter <= 1.0:
            problems.append(f"data.coarse_to_fine.scale_jitter={self.scale_jitter} and shift_jitter="
                            f"{self.shift_jitter} must lie in [0, 1]")
        if not 0.0 < self.min_blob_fraction <= 1.0:
            problems.append(f"data.coarse_to_fine.min_blob_fraction={self.min_blob_fraction} must lie in (0, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    def spec(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, values: Any) -> CoarseToFine:
        """``data.coarse_to_fine`` (a mapping; None: off), unknown keys named with the known ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"data.coarse_to_fine has no key {', '.join(unknown)}: its keys are "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**values)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> CoarseToFine:
        """The settings a bundle or checkpoint recorded; None or an empty spec (older bundles): one pass."""
        return cls(**spec) if spec else cls()

    @property
    def largest_crop_scale(self) -> float:
        """The widest training crop, as a multiple of the disc's diameter."""
        return self.crop_scale * (1.0 + self.scale_jitter) + 2.0 * self.shift_jitter


@dataclass(frozen=True)
class DiscSearch:
    """The first pass's answer: ``status`` (FOUND, NO_DISC, SEVERAL) and, when found, the disc's centre (x, y)
    and diameter in photograph pixels."""

    status: str
    centre_x: float = math.nan
    centre_y: float = math.nan
    diameter: float = math.nan

    @property
    def found(self) -> bool:
        return self.status == FOUND


def find_disc(probability: np.ndarray, crop: SquareCrop, threshold: float = 0.5,
              min_blob_fraction: float = 0.2) -> DiscSearch:
    """Where the first pass's square probability map (any resolution, cut from the photograph with ``crop``)
    puts the disc, in photograph pixels: the bounding box of its one blob (8-connected, after dropping blobs
    smaller than ``min_blob_fraction`` of the largest). No blob: NO_DISC; several: SEVERAL."""
    mask = np.asarray(probability) > threshold
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return DiscSearch(NO_DISC)
    areas = np.bincount(labels.ravel())[1:]
    kept = np.flatnonzero(areas >= min_blob_fraction * areas.max())
    if len(kept) > 1:
        return DiscSearch(SEVERAL)
    rows, cols = np.nonzero(labels == kept[0] + 1)
    # network pixels -> photograph pixels: the square's side spans crop.side photograph pixels, shifted by the
    # padding that made the crop square
    scale = crop.side / mask.shape[0]
    pad_top, _, pad_left, _ = crop.padding
    top, bottom = rows.min() * scale, (rows.max() + 1) * scale
    left, right = cols.min() * scale, (cols.max() + 1) * scale
    return DiscSearch(FOUND, centre_x=crop.left - pad_left + (left + right) / 2,
                      centre_y=crop.top - pad_top + (top + bottom) / 2,
                      diameter=max(bottom - top, right - left))


def disc_box(centre_x: float, centre_y: float, side: float, source_shape: tuple[int, ...]) -> SquareCrop:
    """The square of ``side`` photograph pixels centred on (x, y), clipped to the photograph (``SquareCrop``
    pads the clipped box back to a square, so the geometry stays exact; the disc is then off-centre)."""
    height, width = source_shape[:2]
    side = max(2.0, side)
    top, left = round(centre_y - side / 2), round(centre_x - side / 2)
    bottom, right = top + round(side), left + round(side)
    top, left = max(0, min(top, height - 1)), max(0, min(left, width - 1))
    bottom, right = max(top + 1, min(bottom, height)), max(left + 1, min(right, width))
    return SquareCrop(top, bottom, left, right, height, width)


def second_pass_box(search: DiscSearch, settings: CoarseToFine, source_shape: tuple[int, ...]) -> SquareCrop:
    """The crop the second pass segments: ``crop_scale`` times the found disc, centred on it."""
    if not search.found:
        raise ValueError(f"no second pass without a disc: the first pass says {search.status!r}")
    return disc_box(search.centre_x, search.centre_y, settings.crop_scale * search.diameter, source_shape)


def mask_disc(mask: np.ndarray) -> DiscSearch:
    """A reference mask's disc (bounding box centre and larger side), as the first pass would report it."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return DiscSearch(NO_DISC)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return DiscSearch(FOUND, centre_x=(left + right) / 2, centre_y=(top + bottom) / 2,
                      diameter=float(max(bottom - top, right - left)))


def jittered_crop(image: np.ndarray, mask: np.ndarray, disc: DiscSearch, settings: CoarseToFine, size: int,
                  rng: np.random.Generator, jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` px square crop of (image, mask) around ``disc`` (in their pixels), its side ``crop_scale`` times
    the disc's diameter and, with ``jitter``, its scale and centre drawn as ``settings`` says; what falls outside
    the image is black. The image is resampled bilinearly (area when shrinking), the mask with nearest neighbour."""
    factor, shift_x, shift_y = 1.0, 0.0, 0.0
    if jitter:
        bound = math.log1p(settings.scale_jitter)
        factor = math.exp(rng.uniform(-bound, bound))
        shift_x, shift_y = rng.uniform(-settings.shift_jitter, settings.shift_jitter, size=2) * disc.diameter
    side = settings.crop_scale * factor * disc.diameter
    scale = size / side
    # the affine map that sends the crop's top-left corner to (0, 0) and its side to ``size`` pixels
    origin_x, origin_y = disc.centre_x + shift_x - side / 2, disc.centre_y + shift_y - side / 2
    matrix = np.array([[scale, 0.0, -origin_x * scale], [0.0, scale, -origin_y * scale]], dtype=np.float64)
    shrinking = scale < 1.0
    # warpAffine has no area interpolation: blur first when shrinking by more than 2x, to avoid aliasing
    source = cv2.GaussianBlur(image, (0, 0), sigmaX=0.5 / scale) if shrinking and scale < 0.5 else image
    crop_image = cv2.warpAffine(source, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    crop_mask = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop_image, crop_mask


def disc_region(image: np.ndarray, mask: np.ndarray, context: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The square around the reference disc that every training crop of this photograph is cut from: ``context``
    disc diameters wide (clipped to the photograph, padded black), resized to ``size`` px (the mask with nearest
    neighbour). Cached once per pair, so jittered crops cost a warp of a small image, not a decode."""
    disc = mask_disc(mask)
    if not disc.found:
        raise ValueError("a disc region needs a mask with a disc")
    box = disc_box(disc.centre_x, disc.centre_y, context * disc.diameter, image.shape)
    region = resize_square(box.apply(image), size)
    region_mask = cv2.resize(box.apply(mask), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    return np.ascontiguousarray(region), np.ascontiguousarray(region_mask)
