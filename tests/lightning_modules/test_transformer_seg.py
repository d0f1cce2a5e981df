"""TransformerSegNet (pvt_v2_b0 + SegFormer decoder), saving either architecture, DiscSegmenter with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.nets.backbones import PretrainedWeightsError
from lightning_modules.nets.networks import load_network, network_from_spec, save_network
from lightning_modules.nets.transformer_seg import TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet
from lightning_modules.nets.vgg_unet import load_network as load_network_from_vgg_module
from lightning_modules.segmenter import NETWORK_SPEC_KEY, DiscSegmenter
from tests.compression.helpers import DiscBatches

pytestmark = pytest.mark.usefixtures("one_thread")

#: pvt_v2_b0 (SegFormer's MiT-B0): channels of its four stages, at strides 4, 8, 16, 32
PVT_B0_CHANNELS = [32, 64, 160, 256]
#: a narrow decoder keeps the tests fast; the architecture is the same at 128
DIM = 16


@pytest.fixture(scope="module")
def net() -> TransformerSegNet:
    torch.manual_seed(0)
    return TransformerSegNet(decoder_dim=DIM, dropout=0.2).eval()


@pytest.mark.parametrize(("shape", "expected"), [((1, 3, 32, 32), (1, 1, 32, 32)),
                                                  ((2, 3, 64, 96), (2, 1, 64, 96))])
def test_output_is_one_channel_logits_at_input_resolution(net: TransformerSegNet, shape, expected):
    with torch.no_grad():
        assert net(torch.randn(*shape)).shape == expected


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (1, 3, 64, 80)])
def test_sides_not_divisible_by_the_coarsest_stride_are_rejected_with_a_size_that_fits(net, shape):
    height, width = shape[-2:]
    fitting = f"{math.ceil(height / 32) * 32}x{math.ceil(width / 32) * 32}"
    with pytest.raises(ValueError, match=rf"divisible by 32.*{height}x{width}.*{fitting}"):
        net(torch.randn(*shape))


def test_wrong_channel_count_is_rejected(net: TransformerSegNet):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 1, 32, 32))


def test_decoder_projects_every_stage_fuses_them_and_starts_at_the_disc_prior(net: TransformerSegNet):
    assert [p.in_channels for p in net.projections] == PVT_B0_CHANNELS
    assert all(p.out_channels == DIM and p.kernel_size == (1, 1) for p in net.projections)
    assert net.input_multiple == 32
    assert net.fuse[0].in_channels == 4 * DIM and net.fuse[0].out_channels == DIM and net.fuse[0].bias is None
    # 1x1 projections with bias, the fusing 1x1 conv without (BatchNorm follows), BN weight + bias, 1x1 head
    expected = sum(c * DIM + DIM for c in PVT_B0_CHANNELS) + 4 * DIM * DIM + 2 * DIM + DIM + 1
    decoder = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.encoder.parameters())
    assert decoder == expected
    assert net.head.bias.item() == pytest.approx(math.log(0.02 / 0.98))


def test_dropout_switch_acts_on_the_decoder_only():
    torch.manual_seed(0)
    net = TransformerSegNet(decoder_dim=DIM, dropout=0.5).train()
    encoder_dropouts = [m.p for m in net.encoder.modules() if isinstance(m, nn.Dropout)]
    image = torch.randn(2, 3, 32, 32)
    assert net.dropout_enabled and net.drop.p == 0.5
    assert not torch.equal(net(image), net(image))  # half of the fused channels dropped at random
    net.set_dropout(False)
    assert not net.dropout_enabled and net.drop.p == 0.0
    assert torch.equal(net(image), net(image))
    net.set_dropout(True)
    assert net.drop.p == 0.5
    assert [m.p for m in net.encoder.modules() if isinstance(m, nn.Dropout)] == encoder_dropouts


def test_spec_rebuilds_the_architecture_and_refuses_unknown_keys(net: TransformerSegNet):
    spec = net.spec()
    assert spec == {"architecture": "transformer", "encoder": "pvt_v2_b0", "decoder_dim": DIM, "dropout": 0.2,
                    "in_channels": 3}
    rebuilt = network_from_spec(spec)
    assert isinstance(rebuilt, TransformerSegNet) and rebuilt.spec() == spec
    with pytest.raises(ValueError, match="unknown TransformerSegNet spec keys.*widths"):
        TransformerSegNet.from_spec({**spec, "widths": [4]})
    with pytest.raises(ValueError, match="unknown network architecture 'mlp'"):
        network_from_spec({"architecture": "mlp"})


def test_another_hierarchical_timm_encoder_works_and_a_wrong_name_is_explained():
    other = TransformerSegNet(encoder="resnet10t", decoder_dim=8).eval()
    assert other.input_multiple == 32 and len(other.projections) == 5  # strides 2, 4, 8, 16, 32
    with torch.no_grad():
        assert other(torch.randn(1, 3, 32, 64)).shape == (1, 1, 32, 64)
    with pytest.raises(ValueError, match="'pvt_v9_b0' is not a timm model name"):
        TransformerSegNet(encoder="pvt_v9_b0")


# --- saving either architecture ----------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["vgg_unet", "transformer"])
def test_save_and_load_round_trip_of_both_architectures(architecture: str, tmp_path: Path):
    torch.manual_seed(0)
    net = VGGUNet(base=4) if architecture == "vgg_unet" else TransformerSegNet(decoder_dim=DIM)
    net.train()(torch.randn(2, 3, 32, 32))  # BatchNorm statistics away from their init
    path = save_network(net, tmp_path / f"{architecture}.pt")
    raw = torch.load(path, weights_only=True)
    # VGGUNet files keep the spec they always had (no architecture key), so old files and new ones read alike
    assert ("architecture" in raw["spec"]) == (architecture == "transformer")
    for loader in (load_network, load_network_from_vgg_module):
        loaded = loader(path)
        assert type(loaded) is type(net) and loaded.spec() == net.spec()
        image = torch.randn(1, 3, 32, 64)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(image), net.eval()(image))


def test_a_file_of_an_unknown_architecture_is_explained(tmp_path: Path):
    path = tmp_path / "odd.pt"
    torch.save({"spec": {"architecture": "mlp"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="odd.pt.*unknown network architecture 'mlp'"):
        load_network(path)


# --- a local pretrained encoder ----------------------------------------------------------------------------
def test_pretrained_encoder_loads_exactly_from_a_whole_timm_state_dict(tmp_path: Path):
    torch.manual_seed(1)
    whole = timm.create_model("pvt_v2_b0", pretrained=False)
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(whole.state_dict(), path)
    net = TransformerSegNet(decoder_dim=DIM, pretrained_path=path)
    assert str(path) in net.pretrained_report
    source = whole.state_dict()
    # the features-only wrapper names stage N's modules stages_N where the whole model has stages.N
    loaded = {key.replace("stages_", "stages.", 1): value for key, value in net.encoder.state_dict().items()}
    assert loaded.keys() <= source.keys() and len(loaded) == len(source) - 2  # all but the classifier
    assert all(torch.equal(value, source[key]) for key, value in loaded.items())


def test_a_pretrained_file_that_does_not_fit_is_refused(tmp_path: Path):
    state = timm.create_model("pvt_v2_b0", pretrained=False).state_dict()
    del state["stages.0.norm.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    # timm's own file loading would accept this file with a log line: here it is an error naming the tensor
    with pytest.raises(PretrainedWeightsError,
                       match=r"(?s)partial.pth.*missing from the file \(1\): stages.0.norm"):
        TransformerSegNet(decoder_dim=DIM, pretrained_path=partial)
    with pytest.raises(PretrainedWeightsError, match="absent.pth"):
        TransformerSegNet(decoder_dim=DIM, pretrained_path=tmp_path / "absent.pth")


# --- DiscSegmenter with the transformer --------------------------------------------------------------------
class _Discs(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        masks = torch.zeros(4, 1, 32, 32)
        masks[:, :, 10:20, 12:22] = 1
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return DataLoader(DiscBatches(images, masks), batch_size=2)


def test_segmenter_checkpoint_round_trips_the_transformer(tmp_path: Path):
    torch.manual_seed(0)
    module = DiscSegmenter(architecture="transformer", decoder_dim=DIM, channels_last=False)
    assert isinstance(module.net, TransformerSegNet) and module.hparams.architecture == "transformer"
    checkpoints = tmp_path / "checkpoints"
    Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
            callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True)]).fit(module, datamodule=_Discs())
    last = checkpoints / "last.ckpt"
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = module.net.eval()(image)
        restored = DiscSegmenter.load_from_checkpoint(last, channels_last=False)
        assert isinstance(restored.net, TransformerSegNet)
        assert torch.equal(restored.net.eval()(image), expected)

        # the spec in the checkpoint rebuilds the network whatever the module was built with
        checkpoint = torch.load(last, weights_only=False)
        assert checkpoint[NETWORK_SPEC_KEY]["architecture"] == "transformer"
        other = DiscSegmenter(base=4, channels_last=False)
        other.on_load_checkpoint(checkpoint)
        other.load_state_dict(checkpoint["state_dict"])
        assert isinstance(other.net, TransformerSegNet)
        assert torch.equal(other.net.eval()(image), expected)


def test_segmenter_refuses_a_saved_network_of_another_architecture_and_an_unknown_one(tmp_path: Path):
    path = save_network(TransformerSegNet(decoder_dim=DIM), tmp_path / "network.pt")
    with pytest.raises(ValueError, match="holds a transformer network but architecture='vgg_unet'"):
        DiscSegmenter(network_path=str(path))
    module = DiscSegmenter(architecture="transformer", network_path=str(path))
    assert isinstance(module.net, TransformerSegNet)
    with pytest.raises(ValueError, match="architecture='unet'"):
        DiscSegmenter(architecture="unet")
