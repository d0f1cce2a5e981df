"""The chain's callbacks on a real Trainer with a tiny segmenter and random data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from callbacks.distillation import Distillation
from callbacks.dropout_toggle import DropoutToggle, dropout_enabled_at
from callbacks.hard_example_replay import HardExampleReplay
from callbacks.structured_pruning import StructuredPruning
from callbacks.train_until_sufficient import TrainUntilSufficient
from lightning_modules.nets.vgg_unet import VGGUNet, save_network
from lightning_modules.segmenter import DiscSegmenter

SIZE = 16


class _Discs(Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, SIZE, SIZE, generator=generator)
        self.masks = torch.zeros(count, 1, SIZE, SIZE)
        self.masks[:, :, 5:11, 5:11] = 1
        self.paths = [f"img{i}.png" for i in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.masks[index], "index": torch.tensor(index),
                "hard": torch.tensor(index % 4 == 0)}


class _DiscData(LightningDataModule):
    image_size = SIZE
    fold_size = 3

    def __init__(self):
        super().__init__()
        self.datasets = {"train": _Discs(8), "val": _Discs(4)}
        self.hard_ids: list[str] = []

    @property
    def has_hard_cases(self) -> bool:
        return bool(self.hard_ids)

    def sample_id(self, path: str) -> str:
        return path.removesuffix(".png")

    def set_hard_cases(self, ids: list[str], source: str) -> None:
        self.hard_ids = list(ids)

    def train_dataloader(self):
        return DataLoader(self.datasets["train"], batch_size=2)

    def calibration_dataloader(self):
        return DataLoader(self.datasets["train"], batch_size=2)

    def val_dataloader(self):
        return DataLoader(self.datasets["val"], batch_size=2)


class _Recorder(DiscSegmenter):
    """Records what each training step saw."""

    seen: list

    def training_step(self, batch, batch_idx):
        self.seen.append({key: value.detach().clone() for key, value in batch.items()})
        return super().training_step(batch, batch_idx)


def _module(**kwargs) -> _Recorder:
    module = _Recorder(base=4, dropout=0.3, channels_last=False, **kwargs)
    module.seen = []
    return module


def _trainer(callbacks, epochs: int = 1, **kwargs) -> Trainer:
    return Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   accelerator="cpu", **kwargs)


def test_replay_appends_buffered_samples_from_the_second_step_and_defines_hard_cases():
    module, data = _module(), _DiscData()
    replay = HardExampleReplay(replay_batch_size=3, define_hard_cases=True)
    _trainer([replay]).fit(module, datamodule=data)
    sizes = [len(step["index"]) for step in module.seen]
    assert sizes == [2, 5, 5, 5]  # nothing to replay before the first losses are known
    replayed = module.seen[1]["index"][2:].tolist()
    assert set(replayed) <= {0, 1}  # drawn from what the buffer held: the first batch
    assert len(replay.buffer) == data.fold_size  # capacity: one fold
    assert data.hard_ids == [f"img{i}" for i in replay.buffer.hardest()]
    assert replay.report["replay/buffer_size"] == 3


def test_a_resumed_replay_starts_with_the_saved_buffer():
    replay = HardExampleReplay()
    _trainer([replay]).fit(_module(), datamodule=_DiscData())
    restored = HardExampleReplay()
    restored.load_state_dict(replay.state_dict())
    module = _module()
    _trainer([restored], limit_train_batches=1, limit_val_batches=1).fit(module, datamodule=_DiscData())
    assert len(module.seen[0]["index"]) == 4  # replays from the very first step


def test_dropout_is_off_in_the_first_epochs_after_a_prune_then_on():
    assert [dropout_enabled_at(e, 1) for e in range(3)] == [False, True, True]
    states = []

    class Probe(DropoutToggle):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            states.append(pl_module.net.dropout_enabled)

    module = _module()
    _trainer([Probe(off_epochs=2)], epochs=3, limit_train_batches=1, limit_val_batches=1).fit(
        module, datamodule=_DiscData())
    assert states == [False, False, True] and module.net.dropout_enabled


def test_pruning_happens_before_the_optimiser_and_only_once():
    module = DiscSegmenter(base=8, channels_last=False)
    pruning = StructuredPruning(ratio=0.5)
    trainer = _trainer([pruning], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=_DiscData())
    assert module.net.base == 4
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}
    pruning.setup(trainer, module, "fit")  # a second call (e.g. test after fit) must not prune again
    assert module.net.base == 4
    assert pruning.report["prune/params_after"] == sum(p.numel() for p in VGGUNet(base=4).parameters())
    with pytest.raises(ValueError, match="ratio"):
        StructuredPruning(ratio=1.0)


def test_distillation_puts_the_frozen_teachers_logits_into_every_batch(tmp_path):
    teacher = VGGUNet(base=8, dropout=0.3)
    path = save_network(teacher, tmp_path / "teacher.pt")
    module = _module(kd_alpha=0.7)
    _trainer([Distillation(str(path))], limit_train_batches=2, limit_val_batches=1).fit(
        module, datamodule=_DiscData())
    teacher.eval()
    with torch.no_grad():
        expected = teacher(module.seen[0]["image"])
    assert torch.allclose(module.seen[0]["teacher_logits"], expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="teacher"):
        Distillation(str(tmp_path / "missing.pt"))


def test_train_until_sufficient_stops_at_the_target_and_reports_epochs_and_time():
    until = TrainUntilSufficient(target=-1.0, monitor="val/loss", mode="min", patience=5)
    trainer = _trainer([until], epochs=5, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(_module(), datamodule=_DiscData())
    assert until.epochs_to_sufficient is None and until.report["chain/reached_target"] == 0.0

    until = TrainUntilSufficient(target=0.0, monitor="val/dice", patience=5)  # any Dice is >= 0
    trainer = _trainer([until], epochs=5, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(_module(), datamodule=_DiscData())
    assert until.epochs_to_sufficient == 1 and trainer.current_epoch == 1
    assert until.report["chain/epochs"] == 1.0 and until.report["chain/train_time_s"] > 0
    state = until.state_dict()
    resumed = TrainUntilSufficient(target=0.0)
    resumed.load_state_dict(state)
    assert resumed.epochs_to_sufficient == 1 and resumed.train_time_s == pytest.approx(state["train_time_s"])
    assert np.isfinite(state["train_time_s"])
