"""k-means weight sharing: codebooks, tied gradients, reclustering, unsharing, and the Lightning callback."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from callbacks.weight_sharing import CHECKPOINT_KEY, PACKED_FILENAME, WeightSharing, network_architecture
from compression.packed_format import load_shared, standard_builders
from compression.weight_sharing import (
    HISTOGRAM_BINS,
    kmeans_codebook,
    plain_state_dict,
    recluster,
    restore_sharing,
    share_weights,
    shared_layers,
    sharing_state,
    unshare,
)
from lightning_modules.nets.student import build_student_net
from lightning_modules.nets.vgg_unet import VGGUNet
from lightning_modules.segmenter import DiscSegmenter
from tests.compression.helpers import DiscBatches

SIZE = 16  # the smallest side the VGGUNet's four poolings allow


def layer(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def line_of_weights(values: list[float]) -> nn.Linear:
    """A Linear(1, n) layer without bias whose n weights are ``values``."""
    linear = nn.Linear(1, len(values), bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(values).reshape(-1, 1))
    return linear


# ------------------------------------------------------------------------------------------ codebooks
def test_codebook_has_exactly_k_sorted_centroids_when_there_are_enough_distinct_weights():
    weights = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    codebook, indices = kmeans_codebook(weights, k=16)
    assert codebook.shape == (16,) and codebook.dtype == weights.dtype
    assert indices.shape == weights.shape and indices.dtype == torch.int64
    assert torch.all(codebook[1:] > codebook[:-1])
    assert set(indices.unique().tolist()) <= set(range(16))
    # each centroid is the mean of its weights, and each weight's centroid is its nearest one, up to the
    # width of one bin of the histogram k-means runs on
    for cluster in indices.unique():
        assert codebook[cluster].item() == pytest.approx(weights[indices == cluster].mean().item(), abs=1e-6)
    distances = (weights.reshape(-1, 1) - codebook).abs()
    excess = distances.gather(1, indices.reshape(-1, 1)).squeeze(1) - distances.min(dim=1).values
    assert excess.max() <= (weights.max() - weights.min()) / HISTOGRAM_BINS


def test_two_separated_groups_give_their_means_as_centroids():
    codebook, indices = kmeans_codebook(torch.tensor([0.0, 0.1, 0.2, 10.0, 10.1, 10.2]), k=2)
    torch.testing.assert_close(codebook, torch.tensor([0.1, 10.1]))
    assert indices.tolist() == [0, 0, 0, 1, 1, 1]


def test_fewer_distinct_values_than_k_are_encoded_exactly():
    weights = torch.tensor([[0.5, -1.0, 0.5], [0.25, -1.0, 0.5]])
    codebook, indices = kmeans_codebook(weights, k=16)
    assert codebook.tolist() == [-1.0, 0.25, 0.5]  # k' = 3 distinct values
    assert torch.equal(codebook[indices], weights)


@pytest.mark.parametrize("k", [1, 257, 2.5, True])
def test_k_outside_2_to_256_is_refused(k):
    with pytest.raises(ValueError, match=r"\[2, 256\]"):
        kmeans_codebook(torch.randn(100), k=k)


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_codebook(torch.tensor([0.0, float("nan"), 1.0]), k=2)


# ------------------------------------------------------------------------------------------- sharing
@pytest.fixture
def vgg() -> VGGUNet:
    torch.manual_seed(0)
    return VGGUNet(base=4)


def test_every_shared_weight_is_one_of_its_layers_centroids(vgg: VGGUNet):
    names = share_weights(vgg, k=16, min_weights=0)
    # 13 encoder convs, 4 decoder steps of an up-conv and 2 convs, and the 1x1 head
    assert len(names) == 13 + 4 * 3 + 1
    for name, shared in shared_layers(vgg).items():
        weight = layer(vgg, name).weight
        assert torch.isin(weight, shared.codebook).all(), name
        assert shared.codebook.numel() == min(16, weight.numel())
    # the head has 4 weights (4 channels -> 1): fewer than k, so its codebook is exactly its 4 weights
    head_weights = layer(vgg, "head").parametrizations.weight.original.flatten()
    assert head_weights.sort().values.tolist() == shared_layers(vgg)["head"].codebook.tolist()


def test_small_layers_biases_and_batchnorm_stay_float(vgg: VGGUNet):
    before = {key: value.clone() for key, value in vgg.state_dict().items()}
    names = share_weights(vgg, k=16)  # default min_weights=128
    # the first conv has 3 x 4 x 3 x 3 = 108 weights and the head 4: both below 128
    assert "encoder.0.0" not in names and "head" not in names and len(names) == 24
    after = vgg.state_dict()
    for key, value in before.items():
        if not key.endswith(".weight") or key.removesuffix(".weight") not in names:
            assert torch.equal(after[key], value), key


def test_a_model_without_conv_or_linear_weights_cannot_be_shared():
    with pytest.raises(ValueError, match="no layer of this Sequential can be shared"):
        share_weights(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))


def test_sharing_twice_is_refused(vgg: VGGUNet):
    share_weights(vgg, k=4)
    with pytest.raises(ValueError, match="call unshare"):
        share_weights(vgg, k=4)


def test_codebook_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    share_weights(model, k=4, min_weights=0)
    plain.load_state_dict(plain_state_dict(model))  # the same weight values, as ordinary Parameters
    inputs = torch.randn(5, 8, dtype=torch.float64)
    model(inputs).pow(2).sum().backward()
    plain(inputs).pow(2).sum().backward()
    for name, shared in shared_layers(model).items():
        weight_grad = layer(plain, name).weight.grad
        expected = torch.stack([weight_grad[shared.indices == c].sum() for c in range(shared.codebook.numel())])
        torch.testing.assert_close(shared.codebook.grad, expected)
        # the latent weights get the straight-through gradient: the plain weight's own
        torch.testing.assert_close(layer(model, name).parametrizations.weight.original.grad, weight_grad)


def test_unshare_leaves_plain_weights_equal_to_the_shared_values(vgg: VGGUNet):
    plain_keys = list(vgg.state_dict())
    share_weights(vgg, k=8, min_weights=0)
    shared_values = {name: shared.codebook[shared.indices].detach().clone()
                     for name, shared in shared_layers(vgg).items()}
    image = torch.randn(1, 3, SIZE, SIZE)
    vgg.eval()
    shared_output = vgg(image)
    unshare(vgg)
    assert not any(parametrize.is_parametrized(module) for module in vgg.modules())
    assert sorted(vgg.state_dict()) == sorted(plain_keys)
    for name, values in shared_values.items():
        assert type(layer(vgg, name).weight) is nn.Parameter
        assert torch.equal(layer(vgg, name).weight, values)
    assert torch.equal(vgg(image), shared_output)


def test_plain_state_dict_has_the_unshared_keys_and_values(vgg: VGGUNet):
    plain_keys = sorted(vgg.state_dict())
    share_weights(vgg, k=8, min_weights=0)
    state = plain_state_dict(vgg)
    assert sorted(state) == plain_keys
    shared = shared_layers(vgg)["decoder.0.up"]
    assert torch.equal(state["decoder.0.up.weight"], shared.codebook[shared.indices])


def test_a_channels_last_network_stays_channels_last():
    net = VGGUNet(base=4).to(memory_format=torch.channels_last)
    share_weights(net, k=4)
    assert net.encoder[1][0].weight.is_contiguous(memory_format=torch.channels_last)


# -------------------------------------------------------------------------------------- reclustering
def test_recluster_moves_a_weight_whose_latent_value_drifted_to_the_other_cluster():
    linear = line_of_weights([-1.0, -1.0, 1.0, 1.0, 9.0, 11.0])
    share_weights(linear, k=2, min_weights=0)
    shared = shared_layers(linear)[""]
    assert shared.codebook.tolist() == [0.0, 10.0]
    assert shared.indices.flatten().tolist() == [0, 0, 0, 0, 1, 1]

    with torch.no_grad():  # as if the straight-through gradient had pushed the 4th weight up from 1 to 7
        linear.parametrizations.weight.original[3] = 7.0
    moved = recluster(linear)
    # cluster 0's latent values (-1, -1, 1, 7) are shifted by centroid - mean = 0 - 1.5 to (-2.5, -2.5, -0.5,
    # 5.5); from the centroids (0, 10), 5.5 is nearer to 10; new means: -5.5 / 3 and (5.5 + 9 + 11) / 3
    assert moved == 1
    assert shared.indices.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(shared.codebook.detach(), torch.tensor([-5.5 / 3, 8.5]))
    assert torch.equal(linear.weight.detach().flatten(), torch.tensor([-5.5 / 3] * 3 + [8.5] * 3))


def test_recluster_without_drift_keeps_the_fine_tuned_centroids():
    linear = line_of_weights([-1.0, -1.0, 1.0, 1.0, 9.0, 11.0])
    share_weights(linear, k=2, min_weights=0)
    shared = shared_layers(linear)[""]
    with torch.no_grad():  # tied fine-tuning moved both centroids; the latent weights did not move
        shared.codebook.copy_(torch.tensor([0.5, 9.0]))
    assert recluster(linear) == 0
    assert shared.codebook.tolist() == [0.5, 9.0]


def test_after_training_steps_and_a_recluster_each_layer_keeps_at_most_k_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    share_weights(model, k=4, min_weights=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=generator)).pow(2).mean().backward()
        optimizer.step()
    codebooks_before = {name: shared.codebook for name, shared in shared_layers(model).items()}
    indices_before = {name: shared.indices.clone() for name, shared in shared_layers(model).items()}
    moved = recluster(model)
    assert moved == sum(int((shared.indices != indices_before[name]).sum())
                        for name, shared in shared_layers(model).items())
    for name, shared in shared_layers(model).items():
        assert shared.codebook is codebooks_before[name]  # same Parameter: the optimiser still holds it
        weight = layer(model, name).weight
        assert torch.unique(weight).numel() <= 4
        assert torch.isin(weight, shared.codebook).all()


def test_sharing_state_restores_codebooks_indices_and_latent_weights_exactly(vgg: VGGUNet):
    share_weights(vgg, k=8, min_weights=0)
    with torch.no_grad():
        for shared in shared_layers(vgg).values():
            shared.codebook.mul_(1.5)
    state = sharing_state(vgg)
    fresh = VGGUNet(base=4)
    fresh.load_state_dict(plain_state_dict(vgg))
    restore_sharing(fresh, state)
    for name, shared in shared_layers(vgg).items():
        restored = shared_layers(fresh)[name]
        assert torch.equal(restored.codebook, shared.codebook)
        assert torch.equal(restored.indices, shared.indices)
        assert torch.equal(layer(fresh, name).parametrizations.weight.original,
                           layer(vgg, name).parametrizations.weight.original)


def test_sharing_state_of_another_width_is_refused_with_the_layer_named(vgg: VGGUNet):
    share_weights(vgg, k=8, min_weights=0)
    with pytest.raises(ValueError, match=r"'encoder.0.0': saved weight shape \(4, 3, 3, 3\)"):
        restore_sharing(VGGUNet(base=8), sharing_state(vgg))


# ------------------------------------------------------------------------------------------ callback
def _discs(count: int) -> DiscBatches:
    masks = torch.zeros(count, 1, SIZE, SIZE)
    masks[:, :, 5:11, 5:11] = 1
    return DiscBatches(torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), masks)


class _DiscData(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_discs(4), batch_size=2)

    def val_dataloader(self):
        return DataLoader(_discs(2), batch_size=2)


class _CodebookProbe(WeightSharing):
    """Records the codebook of one layer at the start of every training epoch (after any recluster)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.codebooks: list[torch.Tensor] = []

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.codebooks.append(shared_layers(pl_module.net)["encoder.1.0"].codebook.detach().clone())


class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _trainer(callbacks: list, epochs: int, root: Path, checkpoint: ModelCheckpoint | None = None) -> Trainer:
    # one step per epoch and no validation: the checkpoints are written at the end of each training epoch
    return Trainer(max_epochs=epochs, callbacks=callbacks + ([checkpoint] if checkpoint else []), logger=False,
                   enable_checkpointing=checkpoint is not None, enable_progress_bar=False,
                   enable_model_summary=False, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
                   default_root_dir=str(root))


def test_callback_trains_shared_weights_then_writes_the_packed_file_and_unshares(tmp_path: Path):
    torch.manual_seed(0)
    module = DiscSegmenter(base=4, dropout=0.0, channels_last=True)
    sharing = WeightSharing(k=4, recluster_every=1, output_dir=str(tmp_path / "packed"))
    _trainer([sharing], epochs=2, root=tmp_path).fit(module, datamodule=_DiscData())

    path = tmp_path / "packed" / PACKED_FILENAME
    assert sharing.packed_path == path and path.is_file()
    assert sharing.report["sharing/k"] == 4
    assert sharing.report["sharing/size_bytes"] == path.stat().st_size
    assert sharing.report["sharing/ratio"] == pytest.approx(
        sharing.report["sharing/fp32_state_dict_bytes"] / path.stat().st_size)
    net = module.net
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert torch.unique(net.encoder[1][0].weight).numel() <= 4
    # the file holds exactly the trained network's final weights and statistics (which, being channels-last,
    # may run other conv kernels than the file's row-major copy: compare tensors, not outputs)
    loaded = load_shared(path, standard_builders()).state_dict()
    trained = net.state_dict()
    assert sorted(loaded) == sorted(trained)
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)


def test_a_checkpoint_written_while_shared_resumes_and_loads_into_a_plain_network(tmp_path: Path):
    torch.manual_seed(0)
    checkpoints = tmp_path / "checkpoints"
    first = _CodebookProbe(k=4, recluster_every=0)
    # interrupted after the first of its two epochs
    _trainer([first, _StopAfterFirstEpoch()], 2, tmp_path, ModelCheckpoint(dirpath=checkpoints, save_last=True)).fit(
        DiscSegmenter(base=4, dropout=0.0, channels_last=False), datamodule=_DiscData())
    last = checkpoints / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert "net.encoder.1.0.weight" in saved["state_dict"]
    assert not any("parametrizations" in key for key in saved["state_dict"])
    saved_codebook = saved[CHECKPOINT_KEY]["layers"]["encoder.1.0"]["codebook"]

    # a plain network loads it (this is what trainer.test(ckpt_path="best") and load_from_checkpoint do)
    plain = DiscSegmenter.load_from_checkpoint(last, channels_last=False)
    assert torch.isin(plain.net.encoder[1][0].weight, saved_codebook).all()

    resumed = _CodebookProbe(k=4, recluster_every=0)
    module = DiscSegmenter(base=4, dropout=0.0, channels_last=False)
    _trainer([resumed], 2, tmp_path, ModelCheckpoint(dirpath=checkpoints, save_last=True)).fit(
        module, datamodule=_DiscData(), ckpt_path=str(last))
    # the resumed epoch starts from the saved codebook, not from a new k-means of freshly initialised weights
    assert len(resumed.codebooks) == 1
    assert torch.equal(resumed.codebooks[0], saved_codebook)


def test_the_dr_students_architecture_comes_from_the_build_arguments_among_the_hyperparameters():
    kwargs = {"backbone": "test_efficientnet", "num_classes": 3, "topo_features": 8, "topo_hidden": 8,
              "topo_embedding": 4}
    module = SimpleNamespace(net=build_student_net(pretrained="none", **kwargs),
                             hparams=kwargs | {"pretrained": "lite", "lr": 1e-3, "teacher_checkpoint": None})
    # the pretrained source is dropped (the packed file holds every weight), training settings too
    assert network_architecture(module) == {"kind": "dr_student", "kwargs": kwargs}
    with pytest.raises(ValueError, match="cannot describe a Sequential"):
        network_architecture(SimpleNamespace(net=nn.Sequential(nn.Linear(2, 2)), hparams={}))


def test_callback_arguments_are_validated():
    with pytest.raises(ValueError, match=r"\[2, 256\]"):
        WeightSharing(k=300)
    with pytest.raises(ValueError, match="recluster_every"):
        WeightSharing(recluster_every=-1)
    with pytest.raises(ValueError, match="compression"):
        WeightSharing(compression="gzip")
