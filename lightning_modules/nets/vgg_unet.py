"""The optic-disc segmenter: a VGG16 encoder with a U-Net decoder, rebuildable at any (pruned) width.

Encoder: VGG16's five blocks of 2, 2, 3, 3, 3 convolutions (3x3, padding 1; conv -> BN -> ReLU -> Dropout) at
widths base x (1, 2, 4, 8, 8), with a 2x2 max-pool between blocks. Decoder: four steps, each a stride-2
transposed conv up to the width of the encoder skip at that resolution, the skip concatenated on channels, and
two 3x3 convs at that width, so base x (8, 4, 2, 1). A 1x1 conv gives one-channel logits at input resolution.
The last (full-resolution) decoder step has no Dropout, so that the mask is not noisy right before the logits.

Every conv and up-conv has its own output width, listed in ``VGGUNet.widths`` in the order of
``width_layers()``: the 13 encoder convs block by block, then per decoder step its up-conv and its two convs
(25 in all). A structurally pruned network no longer matches ``VGGUNet(base=...)``, but its widths do
determine it, which is what ``spec`` / ``from_spec`` and ``save_network`` / ``load_network`` rely on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.nets.backbones import PretrainedWeightsError, read_state_dict

#: convolutions per VGG16 encoder block, and each block's width as a multiple of ``base``
ENCODER_DEPTHS = (2, 2, 3, 3, 3)
ENCODER_MULTIPLIERS = (1, 2, 4, 8, 8)
#: convolutions per decoder step after its up-conv; the step widths follow the skips (base x 8, 4, 2, 1)
DECODER_CONVS = 2
NUM_DECODER_STEPS = len(ENCODER_DEPTHS) - 1
NUM_ENCODER_CONVS = sum(ENCODER_DEPTHS)
NUM_WIDTHS = NUM_ENCODER_CONVS + NUM_DECODER_STEPS * (1 + DECODER_CONVS)
#: four 2x2 poolings: input sides must be multiples of 2^4 for the skips to line up with the up-sampled maps
INPUT_MULTIPLE = 2**NUM_DECODER_STEPS
#: the ImageNet VGG16 convs that ``load_vgg16_encoder`` copies: encoder blocks 1-4 (2 + 2 + 3 + 3)
PRETRAINED_ENCODER_CONVS = sum(ENCODER_DEPTHS[:4])
PRETRAINED_BASE = 64
#: share of disc pixels the logits start at (the disc covers about 2-5% of a fundus photograph)
FOREGROUND_PRIOR = 0.02

_SPEC_KEYS = ("widths", "in_channels", "dropout", "batch_norm", "base")


def default_widths(base: int) -> list[int]:
    """The 25 output widths of a freshly built ``VGGUNet(base=base)``, in ``width_layers()`` order."""
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ValueError(f"base must be a positive int (e.g. 64, 32, 16, 8), got {base!r}")
    encoder = [base * multiplier for depth, multiplier in zip(ENCODER_DEPTHS, ENCODER_MULTIPLIERS)
               for _ in range(depth)]
    skip_multipliers = reversed(ENCODER_MULTIPLIERS[:NUM_DECODER_STEPS])
    decoder = [base * multiplier for multiplier in skip_multipliers for _ in range(1 + DECODER_CONVS)]
    return encoder + decoder


def conv_stack(in_channels: int, widths: Sequence[int], batch_norm: bool,
               dropout: float | None) -> nn.Sequential:
    """3x3 convs (padding 1), each followed by BN (optional), ReLU and Dropout (unless ``dropout`` is None).

    The convs keep their bias even before BN, as torchvision's ``vgg16_bn`` does, so that ImageNet weights of
    either VGG16 layout load into the same layers.
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        in_channels = width
    return nn.Sequential(*layers)


class DecoderStep(nn.Module):
    """Up-sample the deeper map x2, concatenate the encoder skip of that resolution, refine with 3x3 convs."""

    def __init__(self, deeper_channels: int, skip_channels: int, up_width: int, conv_widths: Sequence[int],
                 batch_norm: bool, dropout: float | None):
        super().__init__()
        self.up = nn.ConvTranspose2d(deeper_channels, up_width, kernel_size=2, stride=2)
        self.convs = conv_stack(up_width + skip_channels, conv_widths, batch_norm, dropout)

    def forward(self, deeper: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([self.up(deeper), skip], dim=1))


class VGGUNet(nn.Module):
    """VGG16-style encoder-decoder for binary segmentation; ``forward`` returns (B, 1, H, W) logits.

    Args:
        base: width of the first encoder block; the others follow VGG16's x1, x2, x4, x8, x8.
        in_channels: image channels.
        dropout: nn.Dropout probability after every activation except in the last decoder step.
        batch_norm: BatchNorm2d after every 3x3 conv.
        widths: explicit output width of every conv and up-conv in ``width_layers()`` order (25 values);
            overrides ``base``. This is how a structurally pruned network is rebuilt.
    """

    def __init__(self, base: int = 64, in_channels: int = 3, dropout: float = 0.3, batch_norm: bool = True,
                 widths: Sequence[int] | None = None):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        widths = default_widths(base) if widths is None else _checked_widths(widths)
        self.dropout = float(dropout)
        self.batch_norm = bool(batch_norm)
        self._dropout_enabled = True

        self.encoder = nn.ModuleList()
        channels = in_channels
        start = 0
        for depth in ENCODER_DEPTHS:
            block_widths = widths[start:start + depth]
            self.encoder.append(conv_stack(channels, block_widths, self.batch_norm, self.dropout))
            channels = block_widths[-1]
            start += depth
        skip_channels = [block[_last_conv_index(block)].out_channels for block in self.encoder[:-1]]
        self.pool = nn.MaxPool2d(kernel_size=2)

        self.decoder = nn.ModuleList()
        for step in range(NUM_DECODER_STEPS):
            up_width, *conv_widths = widths[start:start + 1 + DECODER_CONVS]
            is_last = step == NUM_DECODER_STEPS - 1
            self.decoder.append(DecoderStep(channels, skip_channels[-1 - step], up_width, conv_widths,
                                            self.batch_norm, None if is_last else self.dropout))
            channels = conv_widths[-1]
            start += 1 + DECODER_CONVS
        self.head = nn.Conv2d(channels, 1, kernel_size=1)
        # Start the logits at the disc's prior (Lin et al., 2017): with the default zero bias every pixel
        # starts at p = 0.5, and on a mask that is ~2% disc the first hundreds of Adam steps only push the
        # background down (measured here: single-batch BCE 0.81 -> 0.41 in 60 steps, against 0.05 -> 0.009).
        nn.init.constant_(self.head.bias, math.log(FOREGROUND_PRIOR / (1.0 - FOREGROUND_PRIOR)))

    def forward(self, image: Tensor) -> Tensor:
        self._check_input(image)
        skips = []
        features = image
        for index, block in enumerate(self.encoder):
            if index > 0:
                features = self.pool(features)
            features = block(features)
            skips.append(features)
        skips.pop()  # the bottleneck's output is the decoder's input, not a skip
        for step, skip in zip(self.decoder, reversed(skips)):
            features = step(features, skip)
        return self.head(features)

    def width_layers(self) -> list[nn.Conv2d | nn.ConvTranspose2d]:
        """Every conv and up-conv whose output width is free (all but the 1x1 head), in ``widths`` order."""
        layers: list[nn.Conv2d | nn.ConvTranspose2d] = []
        for block in self.encoder:
            layers.extend(module for module in block if isinstance(module, nn.Conv2d))
        for step in self.decoder:
            layers.append(step.up)
            layers.extend(module for module in step.convs if isinstance(module, nn.Conv2d))
        return layers

    @property
    def widths(self) -> list[int]:
        """Output widths read off the layers themselves, so they stay true after structural pruning."""
        return [layer.out_channels for layer in self.width_layers()]

    @property
    def in_channels(self) -> int:
        return self.encoder[0][0].in_channels

    @property
    def base(self) -> int | None:
        """The ``base`` of a fresh network with exactly these widths, or None for non-uniform widths."""
        widths = self.widths
        return widths[0] if default_widths(widths[0]) == widths else None

    def spec(self) -> dict[str, Any]:
        """Plain, JSON-able description that ``from_spec`` rebuilds this architecture from."""
        return {
            "widths": self.widths,
            "in_channels": self.in_channels,
            "dropout": self.dropout,
            "batch_norm": self.batch_norm,
            "base": self.base,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> VGGUNet:
        """A fresh (randomly initialised) network with the architecture ``spec`` describes.

        ``spec`` holds ``widths`` or ``base`` (or both, which must agree) and optionally ``in_channels``,
        ``dropout`` and ``batch_norm``.
        """
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"unknown VGGUNet spec keys {unknown}: allowed are {list(_SPEC_KEYS)}")
        widths, base = spec.get("widths"), spec.get("base")
        if widths is None and base is None:
            raise ValueError("a VGGUNet spec needs 'widths' or 'base'")
        if widths is not None and base is not None and _checked_widths(widths) != default_widths(base):
            raise ValueError(
                f"spec says base={base} but its widths {list(widths)} are not those of base {base}: "
                "drop 'base' (or set it to null) for a pruned, non-uniform network"
            )
        options = {key: spec[key] for key in ("in_channels", "dropout", "batch_norm") if key in spec}
        if widths is not None:
            return cls(widths=widths, **options)
        return cls(base=base, **options)

    @property
    def dropout_enabled(self) -> bool:
        return self._dropout_enabled

    def set_dropout(self, enabled: bool) -> None:
        """Switch every Dropout on (p = ``self.dropout``) or off (p = 0), e.g. for deterministic training.

        Only ``p`` changes, so the module tree and the state_dict keys stay the same.
        """
        self._dropout_enabled = bool(enabled)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = self.dropout if enabled else 0.0

    def _check_input(self, image: Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"VGGUNet expects a (B, {self.in_channels}, H, W) batch, got shape {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(
                f"VGGUNet input sides must be divisible by {INPUT_MULTIPLE} (four 2x2 poolings), got "
                f"{height}x{width}: resize or pad the images, e.g. to {_round_up(height)}x{_round_up(width)}"
            )


def load_vgg16_encoder(net: VGGUNet, path: str | Path) -> str:
    """Initialise encoder blocks 1-4 (the first 10 convs) of ``net`` from ImageNet VGG16 weights.

    ``path`` holds a torchvision-layout state dict of ``vgg16`` or ``vgg16_bn`` (``features.N.weight`` /
    ``features.N.bias``), raw or wrapped in a checkpoint dict. Its 4-D weights under ``features.`` are taken
    in index order, which skips the BN, ReLU and pooling entries of either layout. Block 5 and the decoder
    keep their initialisation. Nothing is copied unless every layer fits.

    Returns:
        A one-line report of what was loaded.

    Raises:
        ValueError: ``net`` is not a base-64, 3-channel network (the only one ImageNet VGG16 fits).
        PretrainedWeightsError: the file is missing, unreadable, or its convs do not fit (the message names
            the file and the layer).
    """
    if net.base != PRETRAINED_BASE or net.in_channels != 3:
        raise ValueError(
            f"ImageNet VGG16 weights fit only VGGUNet(base={PRETRAINED_BASE}, in_channels=3), got "
            f"base={net.base} (widths {net.widths[:PRETRAINED_ENCODER_CONVS]}...) and "
            f"in_channels={net.in_channels}: load them before pruning, or train a smaller network from "
            "scratch / by distillation"
        )
    state = read_state_dict(path)
    conv_keys = sorted(
        (key for key, value in state.items() if _is_feature_key(key, "weight") and value.ndim == 4),
        key=lambda key: int(key.split(".")[1]),
    )
    if len(conv_keys) < PRETRAINED_ENCODER_CONVS:
        raise PretrainedWeightsError(
            f"{str(path)!r} has {len(conv_keys)} conv weights under 'features.' but VGG16 encoder blocks 1-4 "
            f"need {PRETRAINED_ENCODER_CONVS}: pass a torchvision vgg16 / vgg16_bn state dict"
        )

    layer_names = {module: name for name, module in net.named_modules()}
    pairs: list[tuple[nn.Conv2d, Tensor, Tensor]] = []
    for position, (key, layer) in enumerate(zip(conv_keys, net.width_layers()[:PRETRAINED_ENCODER_CONVS]), 1):
        bias_key = key.removesuffix("weight") + "bias"
        where = f"{str(path)!r}: {key} for encoder conv {position} ({layer_names[layer]})"
        if bias_key not in state:
            raise PretrainedWeightsError(
                f"{where} has no {bias_key}: pass a torchvision vgg16 / vgg16_bn state dict"
            )
        weight, bias = state[key], state[bias_key]
        if weight.shape != layer.weight.shape or bias.shape != layer.bias.shape:
            raise PretrainedWeightsError(
                f"{where}: file weight {tuple(weight.shape)} / bias {tuple(bias.shape)} vs model "
                f"{tuple(layer.weight.shape)} / {tuple(layer.bias.shape)}. Pass ImageNet VGG16 weights "
                "(torchvision vgg16 or vgg16_bn layout), not another VGG depth or a modified network"
            )
        pairs.append((layer, weight, bias))
    with torch.no_grad():
        for layer, weight, bias in pairs:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return f"loaded {PRETRAINED_ENCODER_CONVS} conv layers of encoder blocks 1-4 from {path}"


def save_network(net: nn.Module, path: str | Path) -> Path:
    """Save architecture and weights in one file (``{"spec": ..., "state_dict": ...}``); returns the path.

    Any of the suite's segmentation networks: ``lightning_modules.nets.networks.save_network`` does it.
    """
    # imported here: networks imports this module (and the transformer segmenter, which does too)
    from lightning_modules.nets.networks import save_network as save_any

    return save_any(net, path)


def load_network(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a network written by ``save_network``, weights included, of whichever architecture its spec
    names: ``lightning_modules.nets.networks.load_network``, which this calls (a spec without ``architecture``
    is a VGGUNet's)."""
    from lightning_modules.nets.networks import load_network as load_any

    return load_any(path, map_location)


def _checked_widths(widths: Sequence[int]) -> list[int]:
    values = list(widths)
    if len(values) != NUM_WIDTHS or not all(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in values
    ):
        raise ValueError(
            f"widths must be {NUM_WIDTHS} positive ints ({NUM_ENCODER_CONVS} encoder convs, then up-conv + "
            f"{DECODER_CONVS} convs per decoder step), got {values!r}; e.g. default_widths(64)"
        )
    return values


def _last_conv_index(block: nn.Sequential) -> int:
    return max(index for index, module in enumerate(block) if isinstance(module, nn.Conv2d))


def _is_feature_key(key: str, suffix: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and parts[2] == suffix


def _round_up(side: int) -> int:
    return -(-side // INPUT_MULTIPLE) * INPUT_MULTIPLE
