"""Label-file readers for diabetic-retinopathy grading sets, with validation before training.

Each reader returns a table of ``sample_id, path, label, patient`` and raises one
DataValidationError listing every bad row (missing image, label outside 0-4, duplicate id).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from datamodules.errors import DataValidationError

log = logging.getLogger(__name__)

NUM_GRADES = 5
IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg", ".tif", ".tiff")
INDEX_COLUMNS = ["sample_id", "path", "label", "patient"]


def _read_csv(csv_path: Path, id_column: str, label_column: str, fmt: str) -> pd.DataFrame:
    if not csv_path.is_file():
        raise DataValidationError(
            f"No label file for data={fmt}: {csv_path} does not exist",
            fix=f"point data.root at the folder holding {csv_path.name} (columns {id_column},{label_column}).",
        )
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataValidationError(f"{csv_path} is not a readable CSV: {error}",
                                  fix="export it again as comma-separated UTF-8.") from error
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in (id_column, label_column) if c not in table.columns]
    if missing:
        raise DataValidationError(
            f"{csv_path} lacks column(s) {missing}; it has {list(table.columns)}",
            fix=f"data={fmt} expects the header '{id_column},{label_column}'.",
        )
    if table.empty:
        raise DataValidationError(f"{csv_path} has a header but no rows", fix="add labelled images.")
    return table.rename(columns={id_column: "sample_id", label_column: "label_text"})


def _parse_labels(table: pd.DataFrame, csv_path: Path) -> list[str]:
    problems = []
    labels = np.full(len(table), -1, dtype=np.int64)
    for position, (sample_id, text) in enumerate(zip(table["sample_id"], table["label_text"])):
        line = position + 2  # 1-based, after the header: what an editor shows
        try:
            value = float(text.strip())
        except ValueError:
            problems.append(f"{csv_path}:{line} ({sample_id}): label '{text}' is not a number")
            continue
        if value != int(value) or not 0 <= value < NUM_GRADES:
            problems.append(f"{csv_path}:{line} ({sample_id}): label {text} is outside the grades 0-4")
            continue
        labels[position] = int(value)
    table["label"] = labels
    return problems


def _duplicate_problems(table: pd.DataFrame, csv_path: Path) -> list[str]:
    duplicated = table[table["sample_id"].duplicated(keep=False)]
    return [
        f"{csv_path}: id '{sample_id}' appears on lines {[int(i) + 2 for i in rows.index]}"
        for sample_id, rows in duplicated.groupby("sample_id")
    ]


def _find_image(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        direct = folder / stem
        if direct.suffix.lower() in IMAGE_SUFFIXES and direct.is_file():
            return direct
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _index(
    root: Path, csv_name: str, id_column: str, label_column: str, image_folders: list[str], fmt: str,
    patient_of: callable, missing_images: list[str] | None = None,
) -> pd.DataFrame:
    """The validated index; with a ``missing_images`` list, rows whose image is missing are left out and
    described there instead of being errors (``make evaluate`` scores what is there)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataValidationError(f"data.root={root} is not a folder",
                                  fix=f"pass data.root=<folder with {csv_name}> for data={fmt}.")
    csv_path = root / csv_name
    table = _read_csv(csv_path, id_column, label_column, fmt)
    table["sample_id"] = table["sample_id"].str.strip()
    problems = _parse_labels(table, csv_path)
    problems += _duplicate_problems(table, csv_path)
    folders = [root / name for name in image_folders]
    paths = []
    for position, sample_id in enumerate(table["sample_id"]):
        if not sample_id:
            problems.append(f"{csv_path}:{position + 2}: empty image id")
            paths.append(None)
            continue
        path = _find_image(folders, sample_id)
        if path is None:
            expected = " or ".join(str(f / f"{sample_id}.*") for f in folders)
            problem = f"{csv_path}:{position + 2}: no image for '{sample_id}' (looked for {expected})"
            (missing_images if missing_images is not None else problems).append(problem)
        paths.append(path)
    if problems:
        raise DataValidationError(
            f"{len(problems)} problem(s) in the {fmt} label file {csv_path}",
            problems,
            fix="correct or delete these rows (labels are integers 0-4, one row per image, every row's image present).",
        )
    table["path"] = [str(p) if p is not None else None for p in paths]
    table = table[table["path"].notna()].copy()
    if table.empty:
        raise DataValidationError(f"none of the {len(paths)} images listed in {csv_path} exists", missing_images,
                                  fix=f"point data.root at the folder holding {csv_name} and its image folder.")
    table["patient"] = [patient_of(s) for s in table["sample_id"]]
    return table[INDEX_COLUMNS].reset_index(drop=True)


def unlabelled_images(root: str | Path, index: pd.DataFrame, image_folders: tuple[str, ...]) -> list[Path]:
    """Image files in ``root``'s image folders that no row of ``index`` names (they cannot be scored)."""
    listed = {Path(path).resolve() for path in index["path"]}
    found = []
    for name in image_folders:
        folder = Path(root) / name
        if folder.is_dir():
            found += [path for path in sorted(folder.iterdir()) if path.is_file()
                      and path.suffix.lower() in IMAGE_SUFFIXES and path.resolve() not in listed]
    return found


#: where each format's images may be, in the order they are looked for
IMAGE_FOLDERS = {"aptos": ("train_images", "."), "eyepacs": ("images", "train", ".")}


def read_aptos_index(root: str | Path, missing_images: list[str] | None = None) -> pd.DataFrame:
    """APTOS 2019: ``train.csv`` (id_code, diagnosis) and ``train_images/<id_code>.png``; no patient ids."""
    return _index(Path(root), "train.csv", "id_code", "diagnosis", list(IMAGE_FOLDERS["aptos"]), "aptos",
                  patient_of=lambda sample_id: sample_id, missing_images=missing_images)


def patient_of_eye(sample_id: str) -> str:
    """EyePACS and ODIR-5K name images ``<patient>_<left|right>``: both eyes belong to one patient."""
    stem, _, side = sample_id.rpartition("_")
    return stem if stem and side.lower() in {"left", "right"} else sample_id


def read_eyepacs_index(root: str | Path, missing_images: list[str] | None = None) -> pd.DataFrame:
    """EyePACS / Kaggle DR 2015: ``trainLabels.csv`` (image, level), images in ``images/``, ``train/`` or root."""
    return _index(Path(root), "trainLabels.csv", "image", "level", list(IMAGE_FOLDERS["eyepacs"]), "eyepacs",
                  patient_of=patient_of_eye, missing_images=missing_images)


def write_synthetic_dr_dataset(
    root: Path, num_images: int, raw_size: int, class_proportions: list[float], seed: int
) -> Path:
    """Render a synthetic set in APTOS layout (once; reused while the parameters are unchanged).

    Writing real PNG files (raw size, black border) means the synthetic default exercises the same
    read -> crop -> resize -> cache path as a user's photographs.
    """
    from datamodules.synthetic import render_fundus

    if len(class_proportions) != NUM_GRADES or min(class_proportions) <= 0:
        raise ValueError(f"class_proportions needs {NUM_GRADES} positive values, got {class_proportions}")
    params = {"num_images": num_images, "raw_size": raw_size, "class_proportions": list(class_proportions),
              "seed": seed, "version": 1}
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    proportions = np.asarray(class_proportions, dtype=np.float64) / np.sum(class_proportions)
    # Exact per-grade counts (largest remainder), so even small smoke sets hold every grade.
    counts = np.floor(proportions * num_images).astype(int)
    counts[np.argsort(-(proportions * num_images - counts))[: num_images - counts.sum()]] += 1
    grades = np.repeat(np.arange(NUM_GRADES), counts)
    np.random.default_rng(seed).shuffle(grades)
    rows = []
    for index, grade in enumerate(grades):
        sample_id = f"synthetic_{index:05d}"
        fundus = render_fundus(int(grade), size=raw_size, seed=seed * 100_003 + index)
        cv2.imwrite(str(root / "train_images" / f"{sample_id}.png"), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR))
        rows.append((sample_id, int(grade)))
    pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(root / "train.csv", index=False)
    marker.write_text(json.dumps(params))
    return root
