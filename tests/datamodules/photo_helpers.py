"""Generated files that are not usable fundus photographs, for the photograph check's tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.compression.deploy_helpers import fundus_photo


def scanned_page() -> np.ndarray:
    """A colour scan of a typed page: off-white paper, dark lines of text."""
    page = np.full((600, 450, 3), (245, 240, 225), np.uint8)
    for y in range(40, 560, 18):
        cv2.putText(page, "Lorem ipsum dolor sit amet, consectetur", (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (20, 20, 20), 1)
    return page


def damaged_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG of a fundus photograph whose header is intact but whose entropy-coded data is garbled."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(fundus_photo(seed, size=256), cv2.COLOR_RGB2BGR))
    assert ok
    data = bytearray(encoded.tobytes())
    rng = np.random.default_rng(seed)
    for position in rng.integers(len(data) // 2, len(data) - 4, 64):
        data[position] = int(rng.integers(0, 256))
    path.write_bytes(bytes(data))
    return path
