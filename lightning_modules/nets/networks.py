"""The optic-disc networks of the suite, rebuilt from their plain specs, and saved / loaded whole.

Two architectures, told apart by ``spec["architecture"]``: ``vgg_unet`` (``VGGUNet``, whose specs predate the
key and so carry none: a spec without it is a VGGUNet's, and old ``network.pt`` files still load) and
``transformer`` (``TransformerSegNet``). ``lightning_modules.nets.vgg_unet.save_network`` / ``load_network``
call these, for the callers that import them from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.nets.transformer_seg import ARCHITECTURE as TRANSFORMER
from lightning_modules.nets.transformer_seg import TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet

VGG_UNET = "vgg_unet"
#: ``spec["architecture"]`` -> the class whose ``from_spec`` rebuilds it
ARCHITECTURES: dict[str, type[VGGUNet] | type[TransformerSegNet]] = {
    VGG_UNET: VGGUNet,
    TRANSFORMER: TransformerSegNet,
}

SegmentationNet = VGGUNet | TransformerSegNet


def architecture_of(spec: Mapping[str, Any]) -> str:
    """The architecture a spec describes; VGGUNet specs have no ``architecture`` key."""
    architecture = spec.get("architecture", VGG_UNET)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {architecture!r} in spec {dict(spec)}: choose one of "
                         f"{list(ARCHITECTURES)}")
    return architecture


def network_from_spec(spec: Mapping[str, Any]) -> SegmentationNet:
    """A fresh (randomly initialised) network of the architecture ``spec`` describes (``net.spec()``)."""
    architecture = architecture_of(spec)
    if architecture == VGG_UNET:
        # VGGUNet.from_spec knows no architecture key: its specs never had one
        return VGGUNet.from_spec({key: value for key, value in spec.items() if key != "architecture"})
    return ARCHITECTURES[architecture].from_spec(spec)


def save_network(net: SegmentationNet, path: str | Path) -> Path:
    """Save architecture and weights in one file (``{"spec": ..., "state_dict": ...}``); returns the path.

    Needed for pruned networks, which ``VGGUNet(base=...)`` cannot rebuild; the file holds only plain values
    and tensors, so ``load_network`` reads it with ``weights_only=True`` (no pickled classes).
    """
    if not hasattr(net, "spec"):
        raise TypeError(f"save_network saves networks that describe themselves with spec() (VGGUNet, "
                        f"TransformerSegNet), got a {type(net).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": net.spec(), "state_dict": net.state_dict()}, path)
    return path


def load_network(path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationNet:
    """Rebuild a network written by ``save_network``, weights included (returned in train mode, as built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"network file {str(path)!r} does not exist: write it with save_network(net, path)"
        )
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated or pickled objects: all mean "not a save_network file"
        raise ValueError(f"could not read {str(path)!r} ({type(err).__name__}: {err}); "
                         "expected a file written by save_network") from err
    if not isinstance(saved, Mapping) or not {"spec", "state_dict"} <= set(saved):
        raise ValueError(
            f"{str(path)!r} holds no {{'spec', 'state_dict'}} dict: was it written by save_network? "
            "(a bare state dict needs VGGUNet(...) built by hand and load_state_dict)"
        )
    try:
        net: nn.Module = network_from_spec(saved["spec"])
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from err
    try:
        net.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"weights in {str(path)!r} do not match its own spec: {err}") from err
    return net
