from pathlib import Path

import pandas as pd
import pytest

from datamodules.dr_index import patient_of_eye, read_aptos_index, read_eyepacs_index
from datamodules.errors import DataValidationError


def test_aptos_index(aptos_root: Path):
    index = read_aptos_index(aptos_root)
    assert len(index) == 40 and set(index["label"]) == {0, 1, 2, 3, 4}
    assert all(Path(p).is_file() for p in index["path"])
    assert index["patient"].nunique() == 40  # APTOS has no patient ids: every image its own group


def test_eyepacs_index_groups_eyes_by_patient(eyepacs_root: Path):
    index = read_eyepacs_index(eyepacs_root)
    assert len(index) == 80 and index["patient"].nunique() == 40
    assert patient_of_eye("123_left") == "123" and patient_of_eye("odd-name") == "odd-name"


def test_eyepacs_images_directly_in_root(eyepacs_root: Path):
    for image in (eyepacs_root / "images").iterdir():
        image.rename(eyepacs_root / image.name)
    assert len(read_eyepacs_index(eyepacs_root)) == 80


def _rewrite(csv: Path, edit) -> None:
    table = pd.read_csv(csv, dtype=str)
    edit(table)
    table.to_csv(csv, index=False)


def test_bad_rows_are_all_reported_with_file_and_line(aptos_root: Path):
    csv = aptos_root / "train.csv"

    def edit(table):
        table.loc[0, "diagnosis"] = "7"
        table.loc[1, "diagnosis"] = "severe"
        table.loc[2, "id_code"] = "does_not_exist"
        table.loc[3, "id_code"] = table.loc[4, "id_code"]

    _rewrite(csv, edit)
    with pytest.raises(DataValidationError) as raised:
        read_aptos_index(aptos_root)
    message = str(raised.value)
    assert f"{csv}:2 (img000): label 7 is outside the grades 0-4" in message
    assert "label 'severe' is not a number" in message
    assert "no image for 'does_not_exist'" in message
    assert "id 'img004' appears on lines [5, 6]" in message
    assert "Fix:" in message


def test_missing_csv_wrong_columns_and_empty(tmp_path: Path, aptos_root: Path):
    with pytest.raises(DataValidationError, match="train.csv does not exist"):
        read_aptos_index(tmp_path)
    with pytest.raises(DataValidationError, match="is not a folder"):
        read_aptos_index(tmp_path / "nowhere")
    (aptos_root / "train.csv").write_text("image,grade\nimg000,1\n")
    with pytest.raises(DataValidationError, match=r"lacks column\(s\) \['id_code', 'diagnosis'\]"):
        read_aptos_index(aptos_root)
    (aptos_root / "train.csv").write_text("id_code,diagnosis\n")
    with pytest.raises(DataValidationError, match="no rows"):
        read_aptos_index(aptos_root)
