"""prune_channels: real channel removal 64 -> 32 -> 16 -> 8 that lands exactly on smaller fresh networks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression.pruning import prune_channels, recalibrate_batchnorm, refit_output_layer
from lightning_modules.nets.vgg_unet import VGGUNet, load_network, save_network


def layer_shapes(net: nn.Module) -> list[tuple[str, int, int]]:
    """(module name, in, out) of every conv / up-conv and (name, features, features) of every BN."""
    shapes = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            shapes.append((name, module.in_channels, module.out_channels))
        elif isinstance(module, nn.BatchNorm2d):
            shapes.append((name, module.num_features, module.weight.numel()))
    return shapes


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def pruning_chain() -> dict[int, dict]:
    """Prune one base-64 network three times by half; record what each stage looks like, keep the last."""
    torch.manual_seed(0)
    net = VGGUNet(base=64)
    stages = {}
    for base in (32, 16, 8):
        prune_channels(net, ratio=0.5)
        stages[base] = {"shapes": layer_shapes(net), "params": parameter_count(net), "spec": net.spec(),
                        "state_keys": list(net.state_dict())}
    stages["net"] = net
    return stages


@pytest.mark.parametrize("base", [32, 16, 8])
def test_each_halving_matches_a_fresh_network_of_half_the_base(pruning_chain: dict, base: int):
    fresh = VGGUNet(base=base)
    stage = pruning_chain[base]
    assert stage["shapes"] == layer_shapes(fresh)
    assert stage["params"] == parameter_count(fresh)
    assert stage["spec"] == fresh.spec()
    assert stage["state_keys"] == list(fresh.state_dict())


def test_pruned_network_keeps_its_output_shape_and_trains(pruning_chain: dict):
    net = copy.deepcopy(pruning_chain["net"])
    image, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()

    net.train()
    logits = net(image)
    assert logits.shape == (2, 1, 32, 32)
    F.binary_cross_entropy_with_logits(logits, mask).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())

    # In train mode BN cancels the bias of the conv before it (zero gradient by construction), so "every
    # parameter gets a gradient" is checked in eval mode, where BN is a fixed affine map.
    net.zero_grad(set_to_none=True)
    net.eval()
    F.binary_cross_entropy_with_logits(net(image), mask).backward()
    no_gradient = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_gradient == []


def test_pruned_network_saved_whole_reloads_with_identical_outputs(tmp_path: Path, pruning_chain: dict):
    net = pruning_chain["net"].eval()
    path = save_network(net, tmp_path / "pruned_base8.pt")
    loaded = load_network(path).eval()
    assert loaded.widths == net.widths
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(image), net(image))


def test_pruning_keeps_the_strongest_channels():
    torch.manual_seed(3)
    net = VGGUNet(base=8, dropout=0.0)
    first, bn, second = net.encoder[0][0], net.encoder[0][1], net.encoder[0][4]
    strong = [1, 4, 6, 7]  # 4 of 8 output channels of the first conv made 10x larger: these must survive
    with torch.no_grad():
        first.weight[strong] *= 10
        bn.weight.copy_(torch.arange(1.0, 9.0))  # distinct BN scales, to check they follow their channels
    first_weight, bn_weight, second_weight = first.weight.clone(), bn.weight.clone(), second.weight.clone()

    prune_channels(net, ratio=0.5)

    assert torch.equal(first.weight, first_weight[strong])
    assert torch.equal(bn.weight, bn_weight[strong])
    # the next conv lost the inputs of the removed channels: each surviving filter is an old one, restricted
    # to the `strong` inputs
    assert second.in_channels == len(strong)
    sources = [[row for row in range(8) if torch.equal(second.weight[i], second_weight[row, strong])]
               for i in range(second.out_channels)]
    assert all(len(rows) == 1 for rows in sources) and second.out_channels == 4


def test_tracing_leaves_mode_and_bn_statistics_alone():
    torch.manual_seed(4)
    net = VGGUNet(base=8).train()
    prune_channels(net)
    assert net.training
    running_means = [m.running_mean for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    # never updated by the tracing forward pass
    assert all(torch.equal(mean, torch.zeros_like(mean)) for mean in running_means)
    prune_channels(net.eval())
    assert not net.training and net.base == 2


def test_channels_last_weights_stay_channels_last():
    net = VGGUNet(base=4).to(memory_format=torch.channels_last)
    prune_channels(net, example_input=torch.zeros(1, 3, 32, 32))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    # not trivially true: a fresh net's weights are NCHW
    assert not VGGUNet(base=4).encoder[0][4].weight.is_contiguous(memory_format=torch.channels_last)


def test_custom_example_input_and_bad_arguments():
    net = VGGUNet(base=4)
    prune_channels(net, ratio=0.25, example_input=torch.randn(1, 3, 64, 64))
    assert net.base == 3  # int(4 * 0.75) = 3, int(8 * 0.75) = 6, ... every width keeps three quarters
    for ratio in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            prune_channels(net, ratio=ratio)
    with pytest.raises(ValueError, match=r"every channel of encoder\.0\.0 \(3 channels\)"):
        prune_channels(net, ratio=0.7)  # int(3 * 0.3) = 0
    with pytest.raises(ValueError, match="divisible by 16"):
        prune_channels(net, ratio=0.5, example_input=torch.randn(1, 3, 24, 24))


def test_batchnorm_recalibration_measures_the_statistics_without_dropout_and_keeps_the_weights():
    net = VGGUNet(base=2, dropout=0.5)
    first_bn = net.encoder[0][1]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    images = [torch.randn(4, 3, 16, 16) * 3 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(net, iter(images)) == 3
    with torch.no_grad():
        pre_bn = torch.cat([net.encoder[0][0](x) for x in images])  # the first conv's output feeds the first BN
    assert torch.allclose(first_bn.running_mean, pre_bn.mean(dim=(0, 2, 3)), atol=1e-4)
    assert net.dropout_enabled and net.training
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())


def test_head_refit_recovers_the_unpruned_logits_better_than_the_pruned_head():
    torch.manual_seed(0)
    reference = VGGUNet(base=4, dropout=0.0)
    images = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    recalibrate_batchnorm(reference, iter(images))
    pruned = prune_channels(copy.deepcopy(reference), 0.5)
    recalibrate_batchnorm(pruned, iter(images))
    reference.eval()
    pruned.eval()

    def rms_error() -> float:
        with torch.no_grad():
            return float(torch.cat([(pruned(x) - reference(x)).flatten() for x in images]).pow(2).mean().sqrt())

    before = rms_error()
    reported = refit_output_layer(pruned, reference, iter(images))
    assert rms_error() == pytest.approx(reported, rel=1e-3)
    assert reported < before
    # it is the least-squares optimum: nudging the head in any direction makes the error worse
    weight = pruned.head.weight.clone()
    for _ in range(3):
        with torch.no_grad():
            pruned.head.weight.copy_(weight + 0.05 * torch.randn_like(weight))
        assert rms_error() > reported
    with torch.no_grad():
        pruned.head.weight.copy_(weight)
    refit_output_layer(pruned, reference, iter(images))  # refitting an optimal head leaves it in place
    assert torch.allclose(pruned.head.weight, weight, atol=1e-4)
    with pytest.raises(ValueError, match="at least one batch"):
        refit_output_layer(pruned, reference, iter([]))
