"""The fundus-photograph check shared by training and prediction (datamodules/photograph.py)."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from datamodules.fundus import read_rgb
from datamodules.photograph import (
    NotAFundusError,
    PhotographCheck,
    UnreadableImageError,
    fundus_problem,
    jpeg_decoder_warning,
    read_photograph,
)
from tests.compression.deploy_helpers import fundus_photo, twelve_bit, write_photo, write_stored
from tests.datamodules.photo_helpers import damaged_jpeg, scanned_page


# ------------------------------------------------------------------------------------------ fundus_problem
def test_synthetic_fundus_photographs_are_usable():
    for seed in range(10):
        assert fundus_problem(fundus_photo(seed)) is None
    assert fundus_problem(fundus_photo(1, size=64)) is None


@pytest.mark.parametrize(("image", "reason"), [
    (np.zeros((120, 160, 3), np.uint8), "almost black"),
    (np.full((120, 160, 3), 128, np.uint8), "greyscale"),
    (np.zeros((120, 160), np.uint8), "1 channel(s) (greyscale)"),
    (np.zeros((120, 160, 4), np.uint8), "has an alpha channel"),
    (np.full((120, 160, 3), (200, 90, 40), np.uint8), "uniform"),
    (np.zeros((120, 160, 3), np.float32), "uint8"),
])
def test_fundus_problem_names_what_is_wrong(image: np.ndarray, reason: str):
    assert reason in fundus_problem(image)


def test_fundus_problem_tells_too_small_black_and_retina_less_frames_apart():
    assert "too small (48x48 px)" in fundus_problem(cv2.resize(fundus_photo(2), (48, 48)))
    # 30x30 bright px of 200x200: 2.25% of the frame is brighter than the surround threshold
    speck = np.zeros((200, 200, 3), np.uint8)
    speck[10:40, 10:40] = (180, 80, 30)
    assert "almost black: 2.2%" in fundus_problem(speck)
    # a retina of 90x90 px in a 400x400 frame: 5.06% bright (not black), but it spans 22.5% < 25% of the side
    retina = cv2.resize(fundus_photo(3), (90, 90))
    retina[retina.max(axis=2) <= 10] = (120, 60, 20)  # no dark corners: every pixel of the 90x90 is bright
    frame = np.zeros((400, 400, 3), np.uint8)
    frame[100:190, 100:190] = retina
    assert "no retina found: the bright region is only 90x90 px" in fundus_problem(frame)


def test_too_small_is_relative_to_the_networks_input_size():
    photo = fundus_photo(4, size=100)
    assert fundus_problem(photo, PhotographCheck.for_image_size(128)) is None  # 100 >= 128 / 2
    problem = fundus_problem(photo, PhotographCheck.for_image_size(256))
    assert "too small (100x100 px): this model needs at least 128 px a side" in problem
    assert PhotographCheck.for_image_size(32).min_side == 64  # never below the absolute floor


@pytest.mark.parametrize(("name", "image", "reason"), [
    ("uniform noise", np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8),
     "neighbouring pixels are unrelated"),
    ("reddish noise", np.clip(np.random.default_rng(1).normal((150, 60, 30), 40, (300, 300, 3)), 0, 255)
     .astype(np.uint8), "neighbouring pixels are unrelated"),
    ("scanned page", scanned_page(), "near-white, as in a document or a scan"),
    ("portrait", skimage.data.astronaut(), "frame corners are dark"),
    ("cat", skimage.data.chelsea(), "frame corners are dark"),
    ("cup of coffee", skimage.data.coffee(), "frame corners are dark"),
])
def test_images_that_are_not_fundus_photographs_are_refused(name: str, image: np.ndarray, reason: str):
    problem = fundus_problem(image)
    assert problem is not None and reason in problem, f"{name}: {problem}"


def test_field_of_view_test_can_be_turned_off_for_crops_around_the_disc():
    # the central half of a fundus photograph: retina everywhere, no camera surround in any corner
    photo = fundus_photo(5, size=400)
    crop = np.ascontiguousarray(photo[100:300, 100:300])
    assert "frame corners are dark" in fundus_problem(crop)
    assert fundus_problem(crop, PhotographCheck(require_field_of_view=False)) is None
    # the other tests still hold without it
    noise = np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert "unrelated" in fundus_problem(noise, PhotographCheck(require_field_of_view=False))


def test_the_check_round_trips_through_a_bundle_spec():
    check = PhotographCheck.for_image_size(256, require_field_of_view=False)
    assert PhotographCheck.from_spec({"image_size": 256, "require_field_of_view": False}) == check
    # a spec written before the key existed: its model was trained on photographs with a field of view
    assert PhotographCheck.from_spec({"image_size": 256}).require_field_of_view
    assert check.key != PhotographCheck.for_image_size(256).key


# ----------------------------------------------------------------------------------------- read_photograph
def test_a_jpeg_with_an_intact_header_and_garbled_data_is_unreadable(tmp_path: Path):
    path = damaged_jpeg(tmp_path / "garbled.jpg")
    assert cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV takes it
    assert jpeg_decoder_warning(path.read_bytes()) is not None
    with pytest.raises(UnreadableImageError, match=r"garbled.jpg: the JPEG data is damaged and decodes only partly"):
        read_photograph(path)


def test_an_intact_jpeg_has_no_decoder_warning(tmp_path: Path):
    path = write_photo(tmp_path / "fine.jpg", fundus_photo(6, size=256))
    assert jpeg_decoder_warning(path.read_bytes()) is None
    assert read_photograph(path).shape == (256, 256, 3)


def test_read_photograph_names_missing_empty_and_non_image_files(tmp_path: Path):
    with pytest.raises(UnreadableImageError, match="missing.png: file does not exist"):
        read_photograph(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match="empty.jpg: file is empty"):
        read_photograph(tmp_path / "empty.jpg")
    (tmp_path / "notes.png").write_bytes(b"\x89PNG\r\n not really")
    with pytest.raises(UnreadableImageError, match="notes.png: not a readable image"):
        read_photograph(tmp_path / "notes.png")


def test_read_photograph_names_transparent_greyscale_and_float_files(tmp_path: Path):
    bgr = cv2.cvtColor(fundus_photo(0), cv2.COLOR_RGB2BGR)
    opaque_alpha = np.full(bgr.shape[:2], 255, np.uint8)  # even fully opaque: the file has transparency
    with pytest.raises(NotAFundusError, match=r"has an alpha channel \(transparent parts\): save it as an opaque"):
        read_photograph(write_stored(tmp_path / "rgba.png", np.dstack([bgr, opaque_alpha])))
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    for name in ("grey.png", "grey.jpg"):
        with pytest.raises(NotAFundusError, match=r"1 channel\(s\) \(greyscale\)"):
            read_photograph(write_stored(tmp_path / name, grey))
    with pytest.raises(NotAFundusError, match="pixel type float32"):
        read_photograph(write_stored(tmp_path / "float.tiff", bgr.astype(np.float32) / 255))


def test_a_16_bit_photograph_is_rescaled_by_its_own_maximum(tmp_path: Path, caplog):
    photo = fundus_photo(0)
    assert photo.max() == 255
    path = write_stored(tmp_path / "12bit.png", twelve_bit(photo))  # 0-4095 in a 16-bit PNG
    with caplog.at_level(logging.INFO, logger="datamodules.photograph"):
        decoded = read_photograph(path)
    # scaled by 255/4095 back: round(round(v * 4095/255) * 255/4095) == v for every 8-bit v
    np.testing.assert_array_equal(decoded, photo)
    assert "16-bit image, rescaled to 8 bits by its own maximum (4095 -> 255)" in caplog.text
    # what IMREAD_COLOR would have given: the top 8 of 16 bits, 4095 >> 8 = 15, an almost black frame
    assert read_rgb(path).max() == 15


def test_a_jpeg_is_turned_by_its_exif_orientation(tmp_path: Path):
    frame = np.zeros((80, 120, 3), np.uint8)
    frame[4:76, 24:96] = fundus_photo(1, size=72)
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    # an APP1 Exif segment right after the JPEG's start marker: a little-endian TIFF header and one IFD entry,
    # Orientation (0x0112, SHORT) = 6, "rotate 90 degrees clockwise to display"
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    path = tmp_path / "turned.jpg"
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:])
    decoded = read_photograph(path)
    assert decoded.shape == (120, 80, 3)  # displayed upright: 80 wide, 120 high
    np.testing.assert_array_equal(decoded, read_rgb(path))


def test_the_folder_check_lists_refused_files_and_exits_1(tmp_path: Path, capsys):
    from datamodules.photograph import main

    write_photo(tmp_path / "set" / "a.png", fundus_photo(7))
    write_photo(tmp_path / "set" / "sub" / "b.png", scanned_page())
    assert main([str(tmp_path / "set"), "--image-size", "64"]) == 1
    printed = capsys.readouterr().out
    assert "refused: " in printed and "b.png: not a fundus photograph" in printed
    assert f"{tmp_path / 'set'}: 2 image(s), 1 refused" in printed
    (tmp_path / "set" / "sub" / "b.png").unlink()
    assert main([str(tmp_path / "set"), "--image-size", "64"]) == 0
