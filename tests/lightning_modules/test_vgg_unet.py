"""VGGUNet: VGG16 + U-Net layout, dropout switch, spec / save round trips, ImageNet VGG16 init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from lightning_modules.nets.backbones import PretrainedWeightsError
from lightning_modules.nets.vgg_unet import (
    VGGUNet,
    default_widths,
    load_network,
    load_vgg16_encoder,
    save_network,
)

# torchvision's `features.N` index of the first ten convs (encoder blocks 1-4), written out by hand from its
# layer lists: vgg16 = conv, relu (, pool) ...; vgg16_bn = conv, bn, relu (, pool) ...
VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
VGG16_BN_CONV_INDICES = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30]


def expected_layers(b: int) -> list[tuple[str, int, int]]:
    """(kind, in, out) of every conv of VGGUNet(base=b) in module order, from the architecture description."""
    encoder = [(3, b), (b, b), (b, 2 * b), (2 * b, 2 * b), (2 * b, 4 * b), (4 * b, 4 * b), (4 * b, 4 * b),
               (4 * b, 8 * b), (8 * b, 8 * b), (8 * b, 8 * b), (8 * b, 8 * b), (8 * b, 8 * b), (8 * b, 8 * b)]
    layers = [("conv", cin, cout) for cin, cout in encoder]
    # each step: up-conv from the deeper width to the skip width s, then convs (2s -> s) and (s -> s)
    deeper = 8 * b
    for skip in (8 * b, 4 * b, 2 * b, b):
        layers += [("up", deeper, skip), ("conv", 2 * skip, skip), ("conv", skip, skip)]
        deeper = skip
    return layers + [("conv", b, 1)]


def conv_layers(net: nn.Module) -> list[tuple[str, int, int]]:
    return [("up" if isinstance(m, nn.ConvTranspose2d) else "conv", m.in_channels, m.out_channels)
            for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


def encoder_convs(net: VGGUNet, blocks: int) -> list[nn.Conv2d]:
    """The convs of the first ``blocks`` encoder blocks, by position: conv, BN, ReLU, Dropout repeat by 4."""
    depths = (2, 2, 3, 3, 3)
    return [net.encoder[block][4 * j] for block in range(blocks) for j in range(depths[block])]


def test_layers_follow_vgg16_and_the_decoder_mirrors_the_skips():
    net = VGGUNet(base=8)
    assert conv_layers(net) == expected_layers(8)
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in net.modules()
               if isinstance(m, nn.ConvTranspose2d))
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 1  # one pool module, applied four times
    assert default_widths(64) == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
                                  512, 512, 512, 256, 256, 256, 128, 128, 128, 64, 64, 64]
    assert net.widths == default_widths(8) and net.base == 8 and net.in_channels == 3
    # conv weights + biases, BN weights + biases (one BN per 3x3 conv), up-convs with 2x2 kernels, 1x1 head
    expected_params = sum(cin * cout * (4 if kind == "up" else 9) + cout + (0 if kind == "up" else 2 * cout)
                          for kind, cin, cout in expected_layers(8)[:-1]) + 8 + 1
    assert sum(p.numel() for p in net.parameters()) == expected_params


def test_output_is_one_channel_logits_at_input_resolution():
    net = VGGUNet(base=4, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 48)).shape == (2, 1, 32, 48)


@pytest.mark.parametrize("shape", [(1, 3, 40, 32), (1, 3, 32, 24)])
def test_sides_not_divisible_by_16_are_rejected(shape: tuple[int, ...]):
    with pytest.raises(ValueError, match="divisible by 16"):
        VGGUNet(base=4)(torch.randn(*shape))


def test_wrong_channel_count_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        VGGUNet(base=4)(torch.randn(1, 1, 32, 32))


def test_dropout_after_every_activation_except_in_the_last_block():
    net = VGGUNet(base=4, dropout=0.25)
    blocks = [*net.encoder, *(step.convs for step in net.decoder)]
    assert [sum(isinstance(m, nn.Dropout) for m in block) for block in blocks] == [2, 2, 3, 3, 3, 2, 2, 2, 0]
    for block in blocks[:-1]:
        for before, module in zip(block, list(block)[1:]):
            assert isinstance(module, nn.Dropout) == isinstance(before, nn.ReLU)
    assert all(m.p == 0.25 for m in net.modules() if isinstance(m, nn.Dropout))
    assert not any(isinstance(m, nn.Dropout) for m in net.decoder[-1].modules())


def test_batch_norm_can_be_left_out():
    net = VGGUNet(base=4, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert conv_layers(net) == expected_layers(4)


def test_set_dropout_switches_randomness_without_touching_the_state_dict():
    torch.manual_seed(0)
    net = VGGUNet(base=4, dropout=0.5).train()
    image = torch.randn(2, 3, 32, 32)
    keys = list(net.state_dict())
    assert net.dropout_enabled

    net.set_dropout(False)
    assert not net.dropout_enabled
    assert torch.equal(net(image), net(image))  # BN uses batch statistics: deterministic without dropout
    assert list(net.state_dict()) == keys

    net.set_dropout(True)
    assert net.dropout_enabled
    assert not torch.allclose(net(image), net(image))
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))
    assert list(net.state_dict()) == keys


def test_spec_is_plain_json_and_rebuilds_the_architecture():
    net = VGGUNet(base=16, in_channels=1, dropout=0.1, batch_norm=False)
    spec = json.loads(json.dumps(net.spec()))
    assert spec == {"widths": default_widths(16), "in_channels": 1, "dropout": 0.1, "batch_norm": False,
                    "base": 16}
    rebuilt = VGGUNet.from_spec(spec)
    assert conv_layers(rebuilt) == conv_layers(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules())
    assert VGGUNet.from_spec({"base": 4}).widths == default_widths(4)


def test_explicit_widths_build_a_non_uniform_network():
    widths = default_widths(8)
    widths[1] = 5  # second conv of block 1: the skip of the last decoder step
    widths[22] = 3  # up-conv of the last decoder step
    net = VGGUNet(widths=widths)
    assert net.widths == widths and net.base is None and net.spec()["base"] is None
    assert net.encoder[1][0].in_channels == 5
    assert net.decoder[-1].convs[0].in_channels == 3 + 5  # up-conv output concatenated with the skip
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("spec, match", [
    ({"widths": [8] * 24}, "25 positive ints"),
    ({"widths": default_widths(8), "base": 16}, "base=16"),
    ({"base": 8, "depth": 5}, "unknown"),
    ({"in_channels": 3}, "'widths' or 'base'"),
    ({"base": 0}, "positive int"),
    ({"base": 8, "dropout": 1.0}, r"\[0, 1\)"),
])
def test_bad_specs_are_rejected(spec: dict, match: str):
    with pytest.raises(ValueError, match=match):
        VGGUNet.from_spec(spec)


def test_save_and_load_network_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    widths = default_widths(4)
    widths[5] = 7
    net = VGGUNet(widths=widths, dropout=0.2)
    net(torch.randn(2, 3, 32, 32))  # a train-mode pass so that the BN running statistics are not the defaults
    path = save_network(net, tmp_path / "nets" / "pruned.pt")

    raw = torch.load(path, weights_only=True)  # plain values and tensors only: no pickled classes
    assert set(raw) == {"spec", "state_dict"} and raw["spec"]["widths"] == widths

    loaded = load_network(path)
    assert loaded.widths == widths and loaded.dropout == 0.2
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(image), net.eval()(image))


def test_load_network_explains_a_wrong_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save(VGGUNet(base=4).state_dict(), bare)
    with pytest.raises(ValueError, match="bare.pt.*save_network"):
        load_network(bare)


# --- ImageNet VGG16 initialisation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16_state() -> dict[str, Tensor]:
    """torchvision's vgg16 layout, random weights (no download). The classifier's big matrices are dropped to
    keep the temporary files small; one classifier tensor stays so that the loader has to skip it."""
    torch.manual_seed(1)
    state = torchvision.models.vgg16(weights=None).state_dict()
    return {key: value for key, value in state.items()
            if key.startswith("features.") or key == "classifier.6.bias"}


@pytest.fixture(scope="module")
def vgg16_bn_state() -> dict[str, Tensor]:
    """torchvision's vgg16_bn `features` layers (its own builder, minus the costly classifier)."""
    torch.manual_seed(2)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    return {f"features.{key}": value for key, value in features.state_dict().items()}


def test_load_vgg16_encoder_copies_blocks_1_to_4(tmp_path: Path, vgg16_state: dict[str, Tensor]):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg16_state, path)
    net = VGGUNet(base=64)
    block5_before = [conv.weight.clone() for conv in net.encoder[4] if isinstance(conv, nn.Conv2d)]

    report = load_vgg16_encoder(net, path)

    assert report == f"loaded 10 conv layers of encoder blocks 1-4 from {path}"
    for conv, index in zip(encoder_convs(net, 4), VGG16_CONV_INDICES, strict=True):
        assert torch.equal(conv.weight, vgg16_state[f"features.{index}.weight"])
        assert torch.equal(conv.bias, vgg16_state[f"features.{index}.bias"])
    block5_after = [conv.weight for conv in net.encoder[4] if isinstance(conv, nn.Conv2d)]
    assert all(torch.equal(before, after) for before, after in zip(block5_before, block5_after, strict=True))


def test_load_vgg16_encoder_reads_the_bn_layout_inside_a_checkpoint(tmp_path: Path,
                                                                     vgg16_bn_state: dict[str, Tensor]):
    path = tmp_path / "vgg16_bn.ckpt"
    torch.save({"state_dict": vgg16_bn_state, "epoch": 3}, path)
    net = VGGUNet(base=64)
    load_vgg16_encoder(net, path)
    for conv, index in zip(encoder_convs(net, 4), VGG16_BN_CONV_INDICES, strict=True):
        assert torch.equal(conv.weight, vgg16_bn_state[f"features.{index}.weight"])
        assert torch.equal(conv.bias, vgg16_bn_state[f"features.{index}.bias"])


@pytest.mark.parametrize("kwargs", [{"base": 32}, {"base": 64, "in_channels": 1}])
def test_load_vgg16_encoder_rejects_other_networks(tmp_path: Path, kwargs: dict):
    with pytest.raises(ValueError, match="base=64, in_channels=3"):
        load_vgg16_encoder(VGGUNet(**kwargs), tmp_path / "never-read.pth")


def test_load_vgg16_encoder_rejects_a_mismatched_file_and_changes_nothing(tmp_path: Path,
                                                                          vgg16_state: dict[str, Tensor]):
    path = tmp_path / "other.pth"
    torch.save({**vgg16_state, "features.5.weight": torch.zeros(64, 64, 3, 3)}, path)  # block 2's first conv
    net = VGGUNet(base=64)
    first_before = net.encoder[0][0].weight.clone()
    with pytest.raises(PretrainedWeightsError, match=r"other\.pth.*features\.5\.weight.*encoder\.1\.0"):
        load_vgg16_encoder(net, path)
    assert torch.equal(net.encoder[0][0].weight, first_before)  # all or nothing

    with pytest.raises(PretrainedWeightsError, match="absent.pth"):
        load_vgg16_encoder(net, tmp_path / "absent.pth")
