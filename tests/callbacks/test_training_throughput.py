"""train/images_per_s and sys/peak_rss_mb (callbacks/training_throughput.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.training_throughput import TrainingThroughput, images_in_batch, peak_rss_mb


def test_images_in_batch_reads_the_first_tensor_of_any_batch_shape():
    images = torch.zeros(6, 3, 8, 8)
    assert images_in_batch(images) == 6
    assert images_in_batch({"image": images, "label": torch.zeros(6)}) == 6
    assert images_in_batch((images, torch.zeros(6))) == 6
    assert images_in_batch({"meta": "x", "nested": [torch.zeros(3, 2)]}) == 3
    assert images_in_batch({"meta": "x"}) == 0


def test_peak_rss_grows_with_memory_the_process_touches():
    # in a fresh process, from its resident memory just before (its peak may lie above that: freed pages)
    script = ("import re, numpy as np; from callbacks.training_throughput import peak_rss_mb; "
              "now = int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024; "
              "block = np.ones(300 * 2**20, dtype=np.uint8); print(now, peak_rss_mb())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    resident, peak = map(float, done.stdout.split())
    assert resident > 0 and peak - resident >= 290  # 300 MiB written, so resident


def test_a_fit_logs_images_per_second_and_peak_memory(tmp_path):
    callback = TrainingThroughput()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert callback.report["train/images_per_s"] > 0  # BoringModel: batches of 2 random vectors
    assert callback.report["sys/peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.5)
    assert trainer.callback_metrics["train/images_per_s"] > 0
