"""How fast the DR student and teacher train on this machine's CPU, and how much memory a training step holds.

    python -m experiments.bench_training                       # student and teacher, fp32 and bf16, 192 px
    python -m experiments.bench_training --models student --precisions 32-true bf16-mixed --batch-sizes 16 32

Each (model, precision, batch size) runs in its own process, so that its peak resident memory
(``getrusage``) is its own: a few warm-up steps, then timed optimiser steps of the module's real
``training_step`` (both views of the consistency loss, KD from the teacher for the student) on random images,
through a Lightning Trainer at the given ``trainer.precision`` (``bf16-mixed``: autocast to bfloat16 on the
CPU). Prints one line per setting and a table; nothing is logged to MLflow (timings are a benchmark, not a
run's result).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader

from callbacks.training_throughput import peak_rss_mb

PRECISIONS = ("32-true", "bf16-mixed")
MODELS = ("student", "teacher")


class _StepTimer(Callback):
    """Time from the first timed step's start to the last step's end."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.started = self.ended = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and not self.started:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ended = time.perf_counter()


def measure(model: str, precision: str, batch_size: int, image_size: int, steps: int, warmup: int) -> dict:
    """Images per second and peak RSS of ``steps`` optimiser steps (after ``warmup``) in this process, through a
    Lightning Trainer at ``precision`` on random images (the module's own training_step and optimiser)."""
    from lightning_modules.classifier import StudentDistiller, TeacherClassifier

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        if model == "student":
            teacher = TeacherClassifier(backbone="tf_efficientnet_lite2", pretrained="none")
            teacher_path = Path(folder) / "teacher.ckpt"
            torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                        "pytorch-lightning_version": lightning.__version__}, teacher_path)
            module = StudentDistiller(backbone="tf_efficientnet_lite0", pretrained="none", topo_features=2048,
                                      teacher_checkpoint=str(teacher_path))
        else:
            module = TeacherClassifier(backbone="tf_efficientnet_lite2", pretrained="none")
        samples = [{"image": torch.randn(3, image_size, image_size), "topo": torch.rand(2048),
                    "label": torch.tensor(i % 5), "index": torch.tensor(i)} for i in range(batch_size)]
        loader = DataLoader(samples, batch_size=batch_size)
        timer = _StepTimer(warmup)
        trainer = Trainer(max_steps=warmup + steps, max_epochs=-1, precision=precision, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[timer], default_root_dir=folder, accelerator="cpu", devices=1)
        trainer.fit(module, train_dataloaders=loader)
    return {"model": model, "precision": precision, "batch_size": batch_size, "image_size": image_size,
            "images_per_s": round(batch_size * steps / (timer.ended - timer.started), 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one setting
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.models[0], args.precisions[0], args.batch_sizes[0], args.image_size,
                                 args.steps, args.warmup)))
        return
    rows = []
    for model in args.models:
        for precision in args.precisions:
            for batch_size in args.batch_sizes:
                command = [sys.executable, "-m", "experiments.bench_training", "--one", "--models", model,
                           "--precisions", precision, "--batch-sizes", str(batch_size), "--image-size",
                           str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':8} {'precision':11} {'batch':>5} {'images/s':>9} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['model']:8} {row['precision']:11} {row['batch_size']:>5} {row['images_per_s']:>9} "
              f"{row['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
