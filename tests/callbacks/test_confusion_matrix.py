from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from callbacks.confusion_matrix import plot_confusion_matrix


def test_confusion_matrix_plot_is_written_and_handles_empty_rows(tmp_path: Path):
    matrix = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # grade 1 absent: no division by zero
    path = plot_confusion_matrix(matrix, tmp_path / "cm.png")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.05
