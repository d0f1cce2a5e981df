"""k-means weight sharing during a fine-tuning stage, ending in a packed weight file whose size is reported."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from compression.packed_format import CODECS, describe_network, save_shared
from compression.weight_sharing import (
    DEFAULT_MIN_WEIGHTS,
    MAX_CLUSTERS,
    MIN_CLUSTERS,
    is_shared,
    plain_state_dict,
    recluster,
    restore_sharing,
    share_weights,
    shared_layers,
    sharing_state,
    unshare,
)

log = logging.getLogger(__name__)

#: checkpoint entry holding the exact sharing state (codebooks, indices, latent weights)
CHECKPOINT_KEY = "weight_sharing"
PACKED_FILENAME = "model.rcws"


class WeightSharing(Callback):
    """Share ``pl_module.net``'s conv / linear weights by k-means while it fine-tunes; save it packed at the end.

    * ``setup("fit")``, before the optimiser is built: ``share_weights`` (each weight becomes
      ``codebook[indices]``; the optimiser trains the codebooks by tied gradients and the latent weights by
      the straight-through gradient; see ``compression.weight_sharing``).
    * ``on_train_epoch_start`` of every epoch after ``recluster_every`` completed ones: ``recluster``. That
      is "every N epochs, between epoch N-1 and N"; it is done at the start of the next epoch rather than
      at the end of the last one so that it runs after that epoch's checkpoint is written (a resumed run
      reclusters exactly where the uninterrupted one did) and never after the final epoch, where the
      weights would change without being validated or fine-tuned again.
    * ``on_train_end``: the packed file ``<output_dir>/model.rcws`` (``compression.packed_format``) is
      written from the last epoch's weights, the network is unshared (plain weights equal to the shared
      values, no parametrization, so testing and latency measurement see an ordinary network), and
      ``sharing/k``, ``sharing/size_bytes`` (the file), ``sharing/fp32_state_dict_bytes`` (``torch.save`` of
      the plain float32 state dict) and ``sharing/ratio`` (their quotient) go to ``self.report`` and the
      loggers.

    Checkpoints: a checkpoint written while the weights are shared holds the plain weights under their usual
    keys (``net.<layer>.weight``), so ``trainer.test(ckpt_path="best")`` after this stage and
    ``load_from_checkpoint`` load it into a plain network, plus the exact sharing state (codebooks, uint8
    indices, latent weights) under ``checkpoint["weight_sharing"]``. Resuming with this callback: the
    network shared in ``setup`` is unshared just before the plain weights are loaded (a load_state_dict
    pre-hook), then ``on_load_checkpoint`` restores the saved sharing exactly, before the optimiser is built,
    so the optimiser state (which includes codebooks and latent weights) loads too. A checkpoint without
    that entry (written before sharing started) is shared afresh from its weights. Resuming a shared
    checkpoint without this callback fails on the optimiser state: its parameter groups hold the codebooks.
    Strategies that restore checkpoints after building the optimiser (DeepSpeed, FSDP) are not supported,
    nor is ``ModelCheckpoint(save_weights_only=True)``: Lightning then skips the callbacks'
    ``on_save_checkpoint``, and the checkpoint keeps the parametrized keys, which a plain network rejects.

    Put it after any structural pruning callback: sharing must see the final widths.

    Args:
        k: clusters per layer, in [2, 256]; indices take ``ceil(log2 k)`` bits.
        recluster_every: epochs between reclusterings; 0 never reclusters.
        output_dir: folder of the packed file; default the trainer's ``default_root_dir`` (the stage folder
            in ``experiments.runner``).
        min_weights, exclude, seed: passed to ``share_weights`` (e.g. ``exclude=["head"]`` keeps the DR
            student's classifier in float).
        compression: ``"lzma"``, ``"zlib"`` or ``"none"``: the packed file's codec.
        architecture: how ``load_shared`` rebuilds the network; default derived from the network
            (``VGGUNet``: its spec) or the module's hyperparameters (the DR student's ``build_student_net``
            arguments).
    """

    def __init__(self, k: int = 16, recluster_every: int = 2, output_dir: str | None = None,
                 min_weights: int = DEFAULT_MIN_WEIGHTS, exclude: Sequence[str] = (), seed: int = 0,
                 compression: str = "lzma", architecture: Mapping[str, Any] | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or not MIN_CLUSTERS <= k <= MAX_CLUSTERS:
            raise ValueError(f"k={k!r}: the number of clusters per layer must be an int in "
                             f"[{MIN_CLUSTERS}, {MAX_CLUSTERS}]")
        if recluster_every < 0:
            raise ValueError(f"recluster_every={recluster_every}: epochs between reclusterings, >= 0 (0: never)")
        if compression not in CODECS:
            raise ValueError(f"compression={compression!r}: choose one of {sorted(CODECS)}")
        self.k = k
        self.recluster_every = recluster_every
        self.output_dir = output_dir
        self.min_weights = min_weights
        self.exclude = list(exclude)
        self.seed = seed
        self.compression = compression
        self.architecture = dict(architecture) if architecture is not None else None
        self.packed_path: Path | None = None
        self.report: dict[str, float] = {}
        self._plain_load_hook = None

    # ------------------------------------------------------------------------------------------ sharing
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or is_shared(pl_module.net):
            return
        self._share(pl_module.net)
        self._plain_load_hook = pl_module.register_load_state_dict_pre_hook(self._unshare_before_plain_load)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_load_hook()
        if not is_shared(pl_module.net):
            raise RuntimeError("WeightSharing: the network is not shared at the start of training (was it "
                               "replaced after setup?); the optimiser holds no codebooks")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.recluster_every and epoch > 0 and epoch % self.recluster_every == 0:
            moved = recluster(pl_module.net, seed=self.seed)
            for logger in trainer.loggers:
                logger.log_metrics({"sharing/reclustered_weights": float(moved)}, step=trainer.global_step)
            log.info("Reclustered the shared weights before epoch %d: %d weights changed cluster", epoch, moved)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:  # under DDP only rank 0 writes the file (and tests the stage)
            return
        net = pl_module.net
        architecture = self.architecture or network_architecture(pl_module)
        folder = Path(self.output_dir or trainer.default_root_dir)
        self.packed_path = save_shared(net, folder / PACKED_FILENAME, architecture, self.compression)
        layers = unshare(net)
        fp32_bytes = _serialized_size({key: value.float() if value.is_floating_point() else value
                                       for key, value in net.state_dict().items()})
        size = self.packed_path.stat().st_size
        self.report = {"sharing/k": float(self.k), "sharing/size_bytes": float(size),
                       "sharing/fp32_state_dict_bytes": float(fp32_bytes), "sharing/ratio": fp32_bytes / size,
                       "sharing/layers": float(len(layers))}
        for logger in trainer.loggers:
            logger.log_metrics(self.report, step=trainer.global_step)
        log.info("Weight sharing (k=%d, %d layers): %s is %d bytes, %.1fx smaller than the float32 state dict "
                 "(%d bytes)", self.k, len(layers), self.packed_path, size, fp32_bytes / size, fp32_bytes)

    # -------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        net = pl_module.net
        if not is_shared(net):
            return
        prefix = _prefix_of(pl_module, net)
        checkpoint["state_dict"] = plain_state_dict(net, checkpoint["state_dict"], prefix)
        checkpoint[CHECKPOINT_KEY] = {"k": self.k, "layers": sharing_state(net)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # runs after the model's weights are loaded and before the optimiser is built
        self._remove_load_hook()
        net = pl_module.net
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            if not is_shared(net):
                self._share(net)  # a checkpoint from before sharing began: share its weights now
            return
        if is_shared(net):
            unshare(net)
        device = next(net.parameters()).device
        restore_sharing(net, {name: {key: value.to(device) for key, value in entry.items()}
                              for name, entry in saved["layers"].items()})
        log.info("Restored the weight sharing of %d layers from the checkpoint", len(saved["layers"]))

    def _unshare_before_plain_load(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                                   *args: Any) -> None:
        """Before a checkpoint with plain weights loads into the shared network, drop the sharing (the
        checkpoint's own sharing state is restored by ``on_load_checkpoint``)."""
        net = module.net
        net_prefix = prefix + _prefix_of(module, net)
        if any(f"{net_prefix}{name}.weight" in state_dict for name in shared_layers(net)):
            unshare(net)

    def _share(self, net: nn.Module) -> None:
        names = share_weights(net, self.k, min_weights=self.min_weights, exclude=self.exclude, seed=self.seed)
        log.info("Shared the weights of %d layers by k-means (k=%d)", len(names), self.k)

    def _remove_load_hook(self) -> None:
        if self._plain_load_hook is not None:
            self._plain_load_hook.remove()
            self._plain_load_hook = None


def network_architecture(pl_module: LightningModule) -> dict[str, Any]:
    """The ``architecture`` entry of a packed file: ``compression.packed_format.describe_network`` of the
    module's network and hyperparameters (a ``VGGUNet`` describes itself, pruned widths included; the DR student
    is rebuilt from the ``build_student_net`` arguments among the hyperparameters)."""
    try:
        return describe_network(pl_module.net, getattr(pl_module, "hparams", None))
    except ValueError as error:
        raise ValueError(f"WeightSharing: {error}. Pass architecture={{'kind': ..., ...}} and give load_shared a "
                         "builder for that kind") from error


def _prefix_of(root: nn.Module, module: nn.Module) -> str:
    name = next(name for name, candidate in root.named_modules() if candidate is module)
    return f"{name}." if name else ""


def _serialized_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    return buffer.tell()
