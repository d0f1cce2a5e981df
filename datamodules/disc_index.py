"""Optic-disc segmentation sets on disk: the ``images/`` + ``masks/`` folder reader and the synthetic writer.

Layout (Drishti-GS1, REFUGE, ORIGA, ODIR-5K exports alike, once renamed)::

    root/images/<stem>.<png|jpg|jpeg|tif|tiff|bmp>
    root/masks/<stem>.<any of those>        same stem; the suffix may differ from the image's
    root/hard_cases.txt                     optional: stems of hard cases, one per line

``read_disc_folder_index`` checks the layout (pairing, duplicates) without decoding anything; the
pixel checks (unreadable file, mask size, empty mask) happen in ``load_disc_pair``, which the
DataModule's cache warm-up runs on every pair before training and reports in one error.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from datamodules.dr_index import IMAGE_SUFFIXES as DR_IMAGE_SUFFIXES
from datamodules.errors import DataValidationError
from datamodules.fundus import read_grey
from datamodules.photograph import DEFAULT_CHECK, PhotographCheck, read_photograph

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (*DR_IMAGE_SUFFIXES, ".bmp")  # REFUGE ships its masks as BMP
INDEX_COLUMNS = ["sample_id", "image_path", "mask_path"]
HARD_CASES_FILE = "hard_cases.txt"
SYNTHETIC_PREFIX = "synthetic_disc_"


class InvalidMaskError(ValueError):
    """A mask that decodes but cannot be used: wrong size, or nothing left after thresholding."""


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            by_stem[path.stem].append(path)
    return by_stem


def _duplicate_problems(by_stem: dict[str, list[Path]], kind: str) -> list[tuple[list[Path], str]]:
    return [
        (paths, f"{len(paths)} {kind}s share the stem '{stem}' ({', '.join(p.name for p in paths)}); keep one of them")
        for stem, paths in by_stem.items()
        if len(paths) > 1
    ]


def read_disc_folder_index(root: str | Path) -> pd.DataFrame:
    """Pair ``root/images/*`` with ``root/masks/*`` by file stem: a table of sample_id, image_path, mask_path.

    Raises one DataValidationError listing every layout problem (missing folders, an image without a
    mask or a mask without an image, two files with one stem), so a large folder is fixed in one pass.
    """
    root = Path(root).expanduser()
    index, unpaired = disc_folder_pairs(root)
    if unpaired:
        raise DataValidationError(
            f"{len(unpaired)} problem(s) in the optic-disc folder {root}",
            [f"{path}: {reason}" for path, reason in unpaired],
            fix="every image in images/ needs exactly one mask with the same file stem in masks/, and vice versa.",
        )
    return index


def disc_folder_pairs(root: str | Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The pairs of ``root/images/*`` and ``root/masks/*`` that match one to one by stem, and (path, reason) of
    every file that does not (an image without a mask, a mask without an image, two files with one stem).

    Raises DataValidationError only when the folder is no disc folder at all (missing ``images/`` or
    ``masks/``, no image): ``make evaluate`` scores the pairs and lists the rest.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataValidationError(f"data.root={root} is not a folder",
                                  fix="pass data.root=<folder holding images/ and masks/> for data.format=disc_folder.")
    images_dir, masks_dir = root / "images", root / "masks"
    missing = [f"{folder} does not exist" for folder in (images_dir, masks_dir) if not folder.is_dir()]
    if missing:
        raise DataValidationError(
            f"{root} is not an optic-disc folder", missing,
            fix="put the photographs in images/ and the disc masks (same file stem) in masks/ under data.root.",
        )
    images, masks = _images_by_stem(images_dir), _images_by_stem(masks_dir)
    if not images:
        raise DataValidationError(f"{root} is not an optic-disc folder",
                                  [f"{images_dir} holds no image ({', '.join(IMAGE_SUFFIXES)})"],
                                  fix="put the photographs in images/ and their disc masks in masks/.")
    unpaired = [(str(paths[0].parent), problem) for paths, problem in
                _duplicate_problems(images, "image") + _duplicate_problems(masks, "mask")]
    unpaired += [(str(images[stem][0]), f"no mask '{stem}.*' in {masks_dir} (add it, or remove the image)")
                 for stem in sorted(images.keys() - masks.keys())]
    unpaired += [(str(masks[stem][0]), f"no image '{stem}.*' in {images_dir} (add it, or remove the mask)")
                 for stem in sorted(masks.keys() - images.keys())]
    ambiguous = {stem for by_stem in (images, masks) for stem, paths in by_stem.items() if len(paths) > 1}
    paired = sorted((images.keys() & masks.keys()) - ambiguous)
    rows = [(stem, str(images[stem][0]), str(masks[stem][0])) for stem in paired]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS), unpaired


def binarize_mask(grey: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``grey >= threshold * 255`` as uint8 0/1.

    Soft masks (expert-agreement maps) become a vote: Drishti-GS1's 0/64/128/191/255 levels (0-4 of
    four experts) at 0.5 keep the pixels that at least half of the experts marked.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"mask threshold {threshold} must lie in (0, 1]: a fraction of the 0-255 grey range")
    return (grey >= threshold * 255).astype(np.uint8)


def load_disc_pair(
    image_path: str | Path, mask_path: str | Path, mask_threshold: float = 0.5, resize_masks: bool = False,
    check: PhotographCheck = DEFAULT_CHECK,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one pair: (RGB uint8 image, uint8 0/1 mask of the image's size).

    Raises UnreadableImageError for a file that cannot be decoded, NotAFundusError for an image that is no
    usable fundus photograph (``datamodules.photograph``), and InvalidMaskError for a mask of another size
    (unless ``resize_masks``, then nearest-neighbour resized) or with no foreground.
    """
    image = read_photograph(image_path, check)
    return image, read_disc_mask(mask_path, image.shape[:2], mask_threshold, resize_masks, Path(image_path).name)


def read_disc_mask(mask_path: str | Path, image_shape: tuple[int, int], mask_threshold: float = 0.5,
                   resize_masks: bool = False, image_name: str = "its image") -> np.ndarray:
    """The uint8 0/1 disc mask of an image of ``image_shape`` (rows, columns), thresholded as in training.

    Raises UnreadableImageError for a file that cannot be decoded and InvalidMaskError for a mask of another size
    (unless ``resize_masks``, then nearest-neighbour resized) or with no foreground.
    """
    grey = read_grey(mask_path)
    height, width = image_shape
    if grey.shape != (height, width):
        if not resize_masks:
            raise InvalidMaskError(
                f"{mask_path}: mask is {grey.shape[1]}x{grey.shape[0]} px but its image {image_name} is "
                f"{width}x{height} (export the mask at the image's size, or set "
                f"data.resize_masks=true to resize it with nearest neighbour)"
            )
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    mask = binarize_mask(grey, mask_threshold)
    if not mask.any():
        hint = " (its values are 0-1: save it as 0/255)" if grey.max() == 1 else ""
        raise InvalidMaskError(
            f"{mask_path}: no disc pixel >= {mask_threshold} x 255 (max value {int(grey.max())}){hint}; "
            f"fix or remove the mask, or lower data.mask_threshold"
        )
    return mask


def read_stems(path: str | Path) -> list[str]:
    """Stems listed in a text file, one per line; blank lines and ``#`` comments are skipped.

    A listed file name (``1234_left.jpg``) counts as its stem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataValidationError(f"hard-case list {path} does not exist",
                                  fix="pass data.hard_cases=<text file with one image stem per line> or a list.")
    stems = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            stems.append(Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name)
    return stems


def write_synthetic_disc_dataset(root: str | Path, num_images: int, raw_size: int, seed: int) -> Path:
    """Render a synthetic optic-disc set in the ``images/`` + ``masks/`` layout (once; reused while unchanged).

    PNG photographs with black borders and 0/255 masks go through the same read -> crop -> resize ->
    cache path as a user's data; ``hard_cases.txt`` lists the stems the generator made hard (faint,
    small or rim-cut discs). Grades (lesion load) are drawn at random from ``seed``.
    """
    from datamodules.synthetic import render_fundus

    if num_images < 1:
        raise ValueError(f"num_images={num_images}: the synthetic set needs at least one image")
    root = Path(root)
    params = {"num_images": num_images, "raw_size": raw_size, "seed": seed, "version": 1}
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    # Invalidate first: a run killed half-way must not leave an old marker over a mixed set of files.
    marker.unlink(missing_ok=True)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{SYNTHETIC_PREFIX}*.png"):  # from a set with other parameters
            stale.unlink()
    grades = np.random.default_rng(seed).integers(0, 5, size=num_images)
    hard = []
    for index, grade in enumerate(grades):
        stem = f"{SYNTHETIC_PREFIX}{index:05d}"
        fundus = render_fundus(int(grade), size=raw_size, seed=seed * 100_003 + index)
        cv2.imwrite(str(images_dir / f"{stem}.png"), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(masks_dir / f"{stem}.png"), fundus.disc_mask)
        if fundus.hard_case:
            hard.append(stem)
    (root / HARD_CASES_FILE).write_text("".join(f"{stem}\n" for stem in hard))
    marker.write_text(json.dumps(params))
    log.info("Wrote %d synthetic optic-disc pairs (%d hard cases) to %s", num_images, len(hard), root)
    return root
