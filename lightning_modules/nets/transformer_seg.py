"""A small transformer segmenter for the optic disc: a timm hierarchical encoder, a SegFormer all-MLP decoder.

Encoder: any timm model that can be built with ``features_only=True``; the default ``pvt_v2_b0`` is
SegFormer's MiT-B0 design (overlapping patch embeddings, efficient self-attention with spatial reduction,
Mix-FFN; 3.4 M parameters) with features at strides 4, 8, 16 and 32 of 32, 64, 160 and 256 channels. It has no
fixed position embedding (the depth-wise conv of its Mix-FFN carries the position), so it takes any input size
that its largest stride divides. Models with a fixed input size (plain ViTs such as ``vit_tiny_patch16_224``,
MLP-Mixers, LeViT) build, but run only at that size: timm's own error says so at the first forward.

Decoder (Xie et al., "SegFormer", NeurIPS 2021, its all-MLP head): every stage's features projected to
``decoder_dim`` channels by a 1x1 conv (SegFormer's per-pixel Linear), bilinearly upsampled to the finest
stage's resolution (stride 4), concatenated, fused by a 1x1 conv + BatchNorm + ReLU, dropout, and a 1x1 conv
to one logit channel, bilinearly upsampled to the input size. ``forward`` returns (B, 1, H, W) logits like
``VGGUNet``.

No library ships this decoder as a plain module (segmentation_models_pytorch is not a dependency and its
SegFormer decoder is tied to its own encoders), hence the few layers here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.backbones import PretrainedWeightsError, load_exactly, read_state_dict
from lightning_modules.nets.vgg_unet import FOREGROUND_PRIOR

#: ``spec()["architecture"]`` of this network (``lightning_modules.nets.networks`` dispatches on it)
ARCHITECTURE = "transformer"
DEFAULT_ENCODER = "pvt_v2_b0"
#: SegFormer-B0's decoder uses 256 channels; 128 halves the decoder's cost at stride 4, where it is dearest
DEFAULT_DECODER_DIM = 128
#: SegFormer's dropout before the classifier
DEFAULT_DROPOUT = 0.1

_SPEC_KEYS = ("architecture", "encoder", "decoder_dim", "dropout", "in_channels")


class TransformerSegNet(nn.Module):
    """timm hierarchical encoder + SegFormer all-MLP decoder for binary segmentation: (B, 1, H, W) logits.

    Args:
        encoder: a timm model name that supports ``features_only=True`` (e.g. ``pvt_v2_b0``, ``pvt_v2_b1``,
            ``convnext_atto``); all of its feature stages feed the decoder.
        decoder_dim: channels every stage is projected to, and of the fused map.
        dropout: ``nn.Dropout2d`` probability before the logits conv (whole channels, as in SegFormer).
        in_channels: image channels.
        pretrained_path: a local timm state dict of the *whole* encoder model (timm key names, its classifier
            may be there or not); loaded exactly or not at all (``PretrainedWeightsError``). Never downloaded.
            None: the encoder starts from scratch.
    """

    def __init__(self, encoder: str = DEFAULT_ENCODER, decoder_dim: int = DEFAULT_DECODER_DIM,
                 dropout: float = DEFAULT_DROPOUT, in_channels: int = 3,
                 pretrained_path: str | Path | None = None):
        super().__init__()
        if isinstance(decoder_dim, bool) or not isinstance(decoder_dim, int) or decoder_dim < 1:
            raise ValueError(f"decoder_dim must be a positive int (e.g. {DEFAULT_DECODER_DIM}), "
                             f"got {decoder_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.encoder_name = encoder
        self._in_channels = in_channels
        self.decoder_dim = decoder_dim
        self.dropout = float(dropout)
        self.encoder, self.pretrained_report = _feature_encoder(encoder, in_channels, pretrained_path)
        channels = self.encoder.feature_info.channels()
        reductions = self.encoder.feature_info.reduction()
        #: input sides must be multiples of the coarsest stage's stride, so every stage's map is exact
        self.input_multiple = max(reductions)

        self.projections = nn.ModuleList(nn.Conv2d(width, decoder_dim, kernel_size=1) for width in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_dim * len(channels), decoder_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(decoder_dim),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout2d(self.dropout)
        self.head = nn.Conv2d(decoder_dim, 1, kernel_size=1)
        # Start the logits at the disc's prior, as VGGUNet does (see its comment for the measurements).
        nn.init.constant_(self.head.bias, math.log(FOREGROUND_PRIOR / (1.0 - FOREGROUND_PRIOR)))
        self._dropout_enabled = True

    def forward(self, image: Tensor) -> Tensor:
        self._check_input(image)
        features = self.encoder(image)
        finest = features[0].shape[-2:]
        projected = [
            F.interpolate(projection(feature), size=finest, mode="bilinear", align_corners=False)
            if feature.shape[-2:] != finest else projection(feature)
            for projection, feature in zip(self.projections, features, strict=True)
        ]
        fused = self.drop(self.fuse(torch.cat(projected, dim=1)))
        return F.interpolate(self.head(fused), size=image.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def in_channels(self) -> int:
        return self._in_channels

    def spec(self) -> dict[str, Any]:
        """Plain, JSON-able description that ``from_spec`` rebuilds this architecture from (weights aside)."""
        return {
            "architecture": ARCHITECTURE,
            "encoder": self.encoder_name,
            "decoder_dim": self.decoder_dim,
            "dropout": self.dropout,
            "in_channels": self.in_channels,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> TransformerSegNet:
        """A fresh (randomly initialised) network with the architecture ``spec`` describes."""
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"unknown TransformerSegNet spec keys {unknown}: allowed are {list(_SPEC_KEYS)}")
        if spec.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"a TransformerSegNet spec has architecture {ARCHITECTURE!r}, got "
                             f"{spec['architecture']!r}")
        return cls(**{key: value for key, value in spec.items() if key != "architecture"})

    @property
    def dropout_enabled(self) -> bool:
        return self._dropout_enabled

    def set_dropout(self, enabled: bool) -> None:
        """Switch the decoder's dropout on (p = ``self.dropout``) or off (p = 0), as VGGUNet's does.

        Only the decoder's: the timm encoder's own attention / projection dropouts keep what timm built.
        """
        self._dropout_enabled = bool(enabled)
        self.drop.p = self.dropout if enabled else 0.0

    def _check_input(self, image: Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"TransformerSegNet expects a (B, {self.in_channels}, H, W) batch, got shape "
                             f"{tuple(image.shape)}")
        height, width = image.shape[-2:]
        multiple = self.input_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"TransformerSegNet ({self.encoder_name}) input sides must be divisible by {multiple} (its "
                f"coarsest feature stride), got {height}x{width}: resize or pad the images, e.g. to "
                f"{-(-height // multiple) * multiple}x{-(-width // multiple) * multiple}"
            )


def _feature_encoder(name: str, in_channels: int,
                     pretrained_path: str | Path | None) -> tuple[nn.Module, str]:
    """``timm.create_model(name, features_only=True)``, filled from ``pretrained_path`` when given, and a
    one-line report of where its weights came from.

    timm's own file loading (``pretrained_cfg_overlay={"file": ...}``) loads a features-only model with
    ``strict=False``: a file missing half the encoder would load silently (tried: a file without
    ``stages.0.norm.weight`` loaded with an info line). So the file is first loaded exactly
    (``backbones.load_exactly``) into the whole timm model, and that model's complete state dict is then
    handed to timm's loader, which maps it onto the features-only wrapper (whose module names differ, e.g.
    ``stages_0`` for ``stages.0``).
    """
    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10] if isinstance(name, str) and name else []
        hint = f"; close ones: {close}" if close else " (e.g. pvt_v2_b0, pvt_v2_b1, convnext_atto)"
        raise ValueError(f"encoder={name!r} is not a timm model name{hint}")
    overlay: dict[str, Any] = {}
    report = "random init (no pretrained_path)"
    if pretrained_path is not None:
        reference = timm.create_model(name, pretrained=False, in_chans=in_channels)
        report = load_exactly(reference, read_state_dict(pretrained_path), pretrained_path)
        overlay = {"pretrained_cfg_overlay": {"state_dict": reference.state_dict()}}
    try:
        encoder = timm.create_model(name, features_only=True, pretrained=pretrained_path is not None,
                                    in_chans=in_channels, **overlay)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        if pretrained_path is not None and "state_dict" in str(err):
            raise PretrainedWeightsError(f"weights in {str(pretrained_path)!r} do not fit the {name} feature "
                                         f"encoder: {err}") from err
        raise ValueError(f"encoder={name!r}: timm cannot build it with features_only=True "
                         f"({type(err).__name__}: {err}); choose a hierarchical timm encoder such as "
                         "pvt_v2_b0") from err
    if len(encoder.feature_info.channels()) < 1:
        raise ValueError(f"encoder={name!r} exposes no feature stages: choose a hierarchical timm encoder")
    return encoder, report
