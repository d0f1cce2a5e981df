"""Per-set test metrics of a data=multi run (callbacks.classification_diagnostics)."""

from __future__ import annotations

import numpy as np
import pytest

from callbacks.classification_diagnostics import per_source_metrics, predictions_table


def test_per_source_metrics_score_each_labelled_set_alone():
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    predicted = np.array([0, 1, 2, 3, 4, 1, 2, 3, 4, 3])  # right on set a, one grade off on set b
    table = predictions_table([f"{i}.png" for i in range(10)], labels, np.eye(5)[predicted])
    metrics = per_source_metrics(table, np.array(["a"] * 5 + ["b"] * 5), 5)
    assert metrics["test/a/qwk"] == pytest.approx(1.0) and metrics["test/a/acc"] == 1.0
    assert metrics["test/b/acc"] == 0.0 and 0 < metrics["test/b/qwk"] < 1 and metrics["test/b/images"] == 5
