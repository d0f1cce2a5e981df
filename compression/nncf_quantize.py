"""NNCF's post-training int8 of an ONNX model for OpenVINO, as a process of its own:

    python -m compression.nncf_quantize <model.onnx> <feeds.npz> <model_int8.xml>

``feeds.npz`` holds the calibration inputs as ``<image index>/<input name>`` arrays (read without pickle); the
int8 model is written as IR with its weights in the ``.bin`` beside the ``.xml``.

Why a process of its own (``compression.openvino_runtime.quantize_openvino`` runs this): a process in which
``nncf.quantize`` has run was measured to crash with SIGSEGV when it later forks PyTorch DataLoader workers
(openvino 2026.4.1, nncf 3.4.0: the test suite's worker test after any bundle with NNCF int8, reproducible;
the parent dies in ``poll`` while joining its workers). In a child process the quantizer leaves nothing behind.
It imports only numpy, OpenVINO and NNCF, so it starts in about two seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def read_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    """The calibration feeds written by ``write_feeds``, in their order."""
    with np.load(path, allow_pickle=False) as archive:
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for key in archive.files:
            index, name = key.split("/", 1)
            feeds.setdefault(int(index), {})[name] = archive[key]
    return [feeds[index] for index in sorted(feeds)]


def write_feeds(feeds: list[dict[str, np.ndarray]], path: str | Path) -> None:
    np.savez(path, **{f"{index}/{name}": value for index, feed in enumerate(feeds) for name, value in feed.items()})


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    import nncf
    import openvino as ov

    onnx_path, feeds_path, xml_path = argv
    feeds = read_feeds(feeds_path)
    quantized = nncf.quantize(ov.Core().read_model(onnx_path), nncf.Dataset(feeds), subset_size=len(feeds))
    ov.save_model(quantized, xml_path, compress_to_fp16=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
