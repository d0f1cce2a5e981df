"""Real int8 (ONNX Runtime), bf16 and QAT on tiny generated networks; the QAT callback on a real Trainer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from onnx import TensorProto
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from callbacks.deployment_bundle import DeploymentBundle
from callbacks.quantization_aware_training import QuantizationAwareTraining
from compression.deploy import load_bundle
from compression.export import export_onnx, ort_session, run_session
from compression.quantization import (
    ActivationFakeQuant,
    QuantizationParityError,
    UnsupportedModelError,
    bf16_module,
    calibration_feeds,
    export_qat_int8,
    fold_batchnorm,
    int8_parity,
    int8_parity_problems,
    prepare_qat,
    quantize_model_int8,
    quantize_onnx_static,
    strip_qat,
)
from datamodules.optic_disc import DiscPreprocessing, disc_spec
from lightning_modules.explain import grad_cam_heatmaps, grad_cam_target_layer
from lightning_modules.nets.vgg_unet import VGGUNet
from lightning_modules.segmenter import DiscSegmenter
from tests.compression.helpers import DiscBatches, tiny_unet

SIZE = 32






def images(count: int, seed: int) -> torch.Tensor:
    """Smooth random images (blurred noise), closer to photographs than white noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 3, SIZE // 4, SIZE // 4, generator=generator)
    return nn.functional.interpolate(noise, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def logits(net: nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.eval()(batch).numpy()


@pytest.fixture(scope="module")
def int8_unet(tmp_path_factory):
    net = tiny_unet(base=8)
    calibration = [images(4, seed) for seed in range(4)]
    exported = quantize_model_int8(net, (calibration[0][:1],), calibration, tmp_path_factory.mktemp("int8"),
                                   input_names=["image"], exporter="torchscript")
    return net, exported


def test_int8_outputs_follow_fp32_on_images_like_the_calibration_ones(int8_unet):
    net, exported = int8_unet
    assert exported.calibration_images == 16  # 4 batches of 4, one feed per image
    test_images = images(6, seed=100)
    (int8,) = run_session(ort_session(exported.int8_path), [test_images])
    assert pearson(int8, logits(net, test_images)) > 0.98


def test_int8_file_stores_integer_weights_and_is_smaller(int8_unet):
    _, exported = int8_unet
    graph = onnx.load(str(exported.int8_path)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    convs = [node for node in graph.node if node.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == 26  # 13 encoder, 8 decoder, 4 up-convs and the head: all quantized, up-convs too
    producers = {output: node for node in graph.node for output in node.output}
    for conv in convs:
        dequantize = producers[conv.input[1]]  # weight -> DequantizeLinear -> Conv
        assert dequantize.op_type == "DequantizeLinear"
        assert initializers[dequantize.input[0]].data_type == TensorProto.INT8
    float_weights = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4]
    assert float_weights == []
    # int8 weights are a quarter of fp32 ones; scales, zero points and int32 biases add a little
    assert exported.int8_bytes < 0.4 * exported.fp32_bytes


def test_zero_calibration_images_raise_before_anything_is_written(tmp_path: Path, int8_unet):
    net, exported = int8_unet
    target = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match="calibration with zero images"):
        quantize_onnx_static(exported.fp32_path, target, [])
    with pytest.raises(ValueError, match="calibration with zero images"):
        quantize_model_int8(net, (images(1, 0),), iter([]), tmp_path / "model", input_names=["image"],
                            exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_calibration_feeds_must_name_the_model_inputs(tmp_path: Path, int8_unet):
    _, exported = int8_unet
    with pytest.raises(ValueError, match="takes \\['image'\\]"):
        quantize_onnx_static(exported.fp32_path, tmp_path / "int8.onnx", [{"picture": np.zeros((1, 3, 32, 32))}])
    assert list(tmp_path.iterdir()) == []


def test_calibration_feeds_are_single_images_up_to_the_limit():
    batches = [(torch.zeros(4, 3, 2, 2), torch.ones(4, 5)), (torch.zeros(4, 3, 2, 2), torch.ones(4, 5))]
    feeds = calibration_feeds(batches, ["image", "topo"], max_images=6)
    assert len(feeds) == 6
    assert feeds[0]["image"].shape == (1, 3, 2, 2) and feeds[5]["topo"].shape == (1, 5)


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.rnn = nn.LSTM(4, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


@pytest.mark.parametrize(("model", "message"), [
    (WithLSTM(), "rnn \\(LSTM\\)"),
    (nn.Sequential(nn.Conv3d(3, 4, 1)), "0 \\(Conv3d\\)"),
    (nn.Sequential(nn.ReLU(), nn.Flatten()), "no Conv2d / ConvTranspose2d / Linear"),
])
def test_unsupported_models_raise_and_stay_unchanged(tmp_path: Path, model: nn.Module, message: str):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match=message):
        prepare_qat(model)
    with pytest.raises(UnsupportedModelError, match=message):
        quantize_model_int8(model, (torch.zeros(1, 3, 4, 4),), [torch.zeros(1, 3, 4, 4)], tmp_path,
                            input_names=["image"], exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_onnx_graph_without_weights_is_rejected(tmp_path: Path):
    path = export_onnx(nn.ReLU(), (torch.zeros(1, 3),), tmp_path / "relu.onnx", ["x"], exporter="torchscript")
    with pytest.raises(UnsupportedModelError, match="no .* node to quantize"):
        quantize_onnx_static(path, tmp_path / "relu_int8.onnx", [{"x": np.ones((1, 3), np.float32)}])


# ------------------------------------------------------------------------------------------------------ bf16
def test_bf16_copy_folds_batchnorm_and_matches_fp32():
    net = tiny_unet(base=8)
    fast = bf16_module(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert fast.model.head.weight.dtype == torch.bfloat16
    assert fast.model.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net.head.weight.dtype == torch.float32  # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    batch = images(2, seed=5)
    out = fast(batch)
    assert out.dtype == torch.float32
    reference = logits(net, batch)
    # bf16 keeps 8 significant bits: errors of a few % of the logit range, same ranking of pixels
    assert np.abs(out.numpy() - reference).max() < 0.1 * np.abs(reference).max()
    assert pearson(out.numpy(), reference) > 0.99


def test_batchnorm_folding_is_exact_in_fp32_and_needs_eval_mode():
    net = tiny_unet(base=8)
    folded = fold_batchnorm(copy.deepcopy(net))
    batch = images(2, seed=6)
    np.testing.assert_allclose(logits(folded, batch), logits(net, batch), atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(net.train())


# ------------------------------------------------------------------------------------------------------ QAT
def test_activation_fake_quant_matches_onnx_runtime_uint8_arithmetic():
    quant = ActivationFakeQuant(momentum=0.5).train()
    quant(torch.tensor([-1.0, 3.0]))  # first batch sets the range [-1, 3]
    scale, zero_point = quant.quantization_parameters()
    assert scale.item() == pytest.approx(4 / 255)
    assert zero_point.item() == 64  # round(1 / (4 / 255)) = round(63.75)
    quant.eval()
    out = quant(torch.tensor([0.5, 0.0, 10.0, -5.0]))
    # 0.5 -> 32 steps of 4/255; 0 exact; beyond the range: clipped to 3 and to -64 * 4/255 = -1.0039
    np.testing.assert_allclose(out.numpy(), [128 / 255, 0.0, 191 * 4 / 255, -64 * 4 / 255], rtol=1e-6)
    assert quant.max_val.item() == 3.0  # eval mode: range frozen
    quant.train()
    quant(torch.tensor([0.0, 5.0]))  # later batches move the range by the momentum: 3 + 0.5 * (5 - 3)
    assert (quant.min_val.item(), quant.max_val.item()) == (-0.5, 4.0)


def test_prepare_qat_copies_quantizes_weights_per_channel_and_calibrates_inputs():
    net = tiny_unet(base=8)
    before = copy.deepcopy(net.state_dict())
    calibration = images(4, seed=1)
    qat = prepare_qat(net, [calibration])
    assert not any(parametrize.is_parametrized(m) for m in net.modules())  # the fp32 net is untouched
    assert all(torch.equal(before[key], value) for key, value in net.state_dict().items())

    first = qat.encoder[0][0]
    assert (first.qat_input_quant.min_val.item(), first.qat_input_quant.max_val.item()) == (
        calibration.min().item(), calibration.max().item())
    original = first.parametrizations.weight.original.detach()
    scale = original.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    steps = first.weight.detach() / scale
    np.testing.assert_allclose(steps.numpy(), steps.round().numpy(), atol=1e-3)  # on the int8 grid
    assert steps.abs().amax(dim=(1, 2, 3)).round().tolist() == [127.0] * first.out_channels
    up = qat.decoder[0].up  # ConvTranspose2d: weight (in, out, kh, kw), one scale per output channel
    up_scale = up.parametrizations.weight.original.detach().abs().amax(dim=(0, 2, 3), keepdim=True) / 127
    assert (up.weight.detach() / up_scale).abs().amax(dim=(0, 2, 3)).round().tolist() == [127.0] * up.out_channels


def test_qat_fine_tunes_then_exports_int8_that_follows_the_fp32_network(tmp_path: Path):
    net = tiny_unet(base=8)
    calibration = [images(4, seed) for seed in range(4)]
    qat = prepare_qat(net, calibration[:1]).train()
    qat.set_dropout(False)
    optimiser = torch.optim.Adam(qat.parameters(), lr=1e-3)
    targets = (images(4, seed=50)[:, :1] > 0.5).float()
    for step in range(3):
        loss = nn.functional.binary_cross_entropy_with_logits(qat(calibration[step]), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    gradient = qat.encoder[0][0].parametrizations.weight.original.grad
    assert gradient is not None and gradient.abs().sum() > 0  # straight-through estimator

    exported = export_qat_int8(qat, (calibration[0][:1],), calibration, tmp_path, ["image"], exporter="torchscript")
    assert type(qat.encoder[0][0]) is nn.Conv2d and not hasattr(qat.encoder[0][0], "qat_input_quant")
    assert set(qat.state_dict()) == set(VGGUNet(base=8).state_dict())  # a plain VGGUNet again
    with pytest.raises(ValueError, match="prepare_qat"):
        strip_qat(qat)
    test_images = images(6, seed=200)
    (int8,) = run_session(ort_session(exported.int8_path), [test_images])
    assert pearson(int8, logits(qat, test_images)) > 0.98


def test_int8_parity_on_hand_made_outputs():
    reference = torch.tensor([[[[2.0, -2.0], [1.0, -1.0]]]])
    quantized = torch.tensor([[[[1.5, -2.0], [-0.5, -1.0]]]])  # one disc pixel lost: |diffs| 0.5, 0, 1.5, 0
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    parity = int8_parity(reference, quantized, target)
    assert parity["mean_abs_logit_diff"] == pytest.approx(0.5)
    assert parity["max_abs_logit_diff"] == pytest.approx(1.5)
    assert parity["mask_dice_int8_vs_fp32"] == pytest.approx(2 * 1 / (1 + 2))
    assert parity["dice_delta"] == pytest.approx(2 * 1 / (1 + 2) - 2 * 1 / (2 + 2))
    classes = int8_parity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.5]]))
    assert classes["agreement"] == 0.5
    # grades 0,1,2; fp32 predicts them all, int8 says 1 for the 2: quadratic kappa 1 - (1/12) / (1/4) = 2/3
    one_hot = torch.eye(3)
    graded = int8_parity(one_hot, one_hot[[0, 1, 1]], torch.tensor([0, 1, 2]))
    assert graded["qwk_fp32"] == pytest.approx(1.0) and graded["qwk_int8"] == pytest.approx(2 / 3)
    assert graded["qwk_delta"] == pytest.approx(-1 / 3) and graded["agreement"] == pytest.approx(2 / 3)


def test_int8_is_judged_on_masks_and_grades_and_the_logit_difference_only_where_asked():
    # the drionsdb qat-prune-16 case: logits drifted (0.395) while the masks may still agree
    masks = {"mean_abs_logit_diff": 0.395, "mask_dice_int8_vs_fp32": 0.99}
    assert int8_parity_problems(masks) == []
    assert int8_parity_problems(masks, min_mask_dice=0.995) == [
        "Dice of int8 vs fp32 masks 0.9900 < min_mask_dice=0.995"]
    assert int8_parity_problems(masks, max_mean_abs_logit_diff=0.25) == [
        "mean |logit difference| 0.3950 > max_mean_abs_logit_diff=0.25"]
    grades = {"mean_abs_logit_diff": 3.0, "agreement": 0.85, "qwk_delta": -0.1}
    assert int8_parity_problems(grades, min_agreement=0.8, max_qwk_drop=0.1) == []
    assert int8_parity_problems(grades, min_agreement=0.9, max_qwk_drop=0.05) == [
        "top-1 agreement of int8 and fp32 0.8500 < min_agreement=0.9",
        "QWK drops by 0.1000 from fp32 to int8 > max_qwk_drop=0.05"]
    # no labels, no QWK: agreement alone decides
    assert int8_parity_problems({"mean_abs_logit_diff": 3.0, "agreement": 1.0}) == []


@pytest.mark.parametrize("key, value", [("min_mask_dice", 1.5), ("min_agreement", -0.1), ("max_qwk_drop", -0.01),
                                        ("max_qwk_drop", 3.0), ("max_mean_abs_logit_diff", -1.0)])
def test_callback_names_a_tolerance_out_of_range(tmp_path: Path, key: str, value: float):
    with pytest.raises(ValueError, match=f"{key}={value}"):
        QuantizationAwareTraining(output_dir=str(tmp_path), **{key: value})


# ------------------------------------------------------------------------------------------------- callback
def _discs(count: int, seed: int) -> DiscBatches:
    smooth = images(count, seed)
    return DiscBatches(smooth, (smooth[:, :1] > 0.5).float())


class _DiscData(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_discs(8, seed=0), batch_size=4)

    def calibration_dataloader(self):
        return DataLoader(_discs(8, seed=1), batch_size=4)

    def val_dataloader(self):
        return DataLoader(_discs(4, seed=2), batch_size=4)


class _Recording(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(callback: QuantizationAwareTraining, module: DiscSegmenter) -> Trainer:
    trainer = Trainer(max_epochs=1, callbacks=[callback], logger=_Recording(), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1, accelerator="cpu")
    trainer.fit(module, datamodule=_DiscData())
    return trainer


def _segmenter() -> DiscSegmenter:
    module = DiscSegmenter(base=4, channels_last=False)
    module.net = tiny_unet(base=4)
    return module


def test_callback_trains_with_fake_quant_then_exports_and_reports_int8(tmp_path: Path):
    module = _segmenter()
    callback = QuantizationAwareTraining(output_dir=str(tmp_path), prepare_batches=1, exporter="torchscript",
                                         max_mean_abs_logit_diff=1.0, min_mask_dice=0.5)
    trainer = _fit(callback, module)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(module.net.encoder[0][0].weight) in optimised  # QAT weights were trained: stripped in place
    assert type(module.net.encoder[0][0]) is nn.Conv2d  # plain fp32 network afterwards
    int8_path = tmp_path / "model_int8.onnx"
    assert callback.report["quant/int8_size_bytes"] == int8_path.stat().st_size
    assert callback.report["quant/calibration_images"] == 8
    assert callback.report["quant/images"] == 4
    assert -1.0 <= callback.report["quant/dice_delta"] <= 1.0
    assert trainer.logger.metrics["quant/int8_size_bytes"] == int8_path.stat().st_size
    assert "quant/dice_delta" in trainer.logger.metrics


def test_callback_parity_failure_raises_and_restores_the_unquantized_network(tmp_path: Path):
    module = _segmenter()
    original = module.net
    before = copy.deepcopy(original.state_dict())
    callback = QuantizationAwareTraining(output_dir=str(tmp_path), prepare_batches=1, exporter="torchscript",
                                         max_mean_abs_logit_diff=0.0)
    with pytest.raises(QuantizationParityError, match="max_mean_abs_logit_diff=0.0") as raised:
        _fit(callback, module)
    # what a chain records of it: the file, the one-line reason, the numbers it logged
    assert raised.value.path == tmp_path / "model_int8.onnx"
    assert "max_mean_abs_logit_diff=0.0" in raised.value.reason and "restored" not in raised.value.reason
    assert raised.value.metrics["quant/mean_abs_logit_diff"] > 0 and raised.value.metrics == callback.report
    assert module.net is original
    assert not any(parametrize.is_parametrized(m) for m in module.net.modules())
    assert all(torch.equal(before[key], value) for key, value in module.net.state_dict().items())


# ------------------------------------------------------------------------------- QAT stage -> bundle -> GradCAM
class _DiscStageData(_DiscData):
    """A QAT stage's datamodule as the runner tests it: a test split and the preprocessing spec too."""

    def test_dataloader(self):
        return DataLoader(_discs(4, seed=3), batch_size=4)

    def inference_spec(self) -> dict:
        return disc_spec(DiscPreprocessing(image_size=SIZE))


def _qat_stage_trainer(callbacks: list, **options) -> Trainer:
    return Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, accelerator="cpu",
                   **({"enable_checkpointing": False} | options))


def _lenient_qat(output_dir: Path) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(output_dir=str(output_dir), prepare_batches=1, exporter="torchscript",
                                     max_mean_abs_logit_diff=1.0, min_mask_dice=0.5)


def test_a_qat_stage_bundles_its_plain_network_which_gradcam_explains(tmp_path: Path):
    module, data = _segmenter(), _DiscStageData()
    qat = _lenient_qat(tmp_path / "qat")
    bundle_callback = DeploymentBundle(weights_dir=str(tmp_path / "qat-prune-8"), calibration_images=4,
                                       exporter="torchscript")
    trainer = _qat_stage_trainer([qat, bundle_callback])
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)  # the runner tests a finisher on its final weights

    bundle = load_bundle(tmp_path / "qat-prune-8" / "deploy")
    assert bundle.manifest["int8"]["source"] == "quantization-aware training"
    assert bundle.int8_path.read_bytes() == qat.int8_path.read_bytes()
    network = bundle.load_network()  # torch.save could not pickle a parametrized (fake-quantized) network
    assert not any(parametrize.is_parametrized(m) for m in network.modules())
    trained = module.net.state_dict()
    assert network.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[key].cpu()) for key, value in network.state_dict().items())
    # what predict gradcam=true does with the bundle's network
    heatmap = grad_cam_heatmaps(network, (images(1, seed=5),), grad_cam_target_layer(network))[0]
    assert heatmap.shape == (SIZE, SIZE) and heatmap.std() > 0.01


def test_a_qat_fit_resumed_after_its_last_epoch_still_exports_int8_and_strips_the_network(tmp_path: Path):
    checkpoints = tmp_path / "checkpoints"
    first = _lenient_qat(tmp_path / "first")
    _qat_stage_trainer([first, ModelCheckpoint(dirpath=checkpoints, save_last=True)],
                       enable_checkpointing=True).fit(_segmenter(), datamodule=_DiscStageData())
    assert first.int8_path is not None
    # the process died after the last epoch (e.g. while testing): the resumed fit has no epoch left to run, and
    # Lightning skips on_train_end; without the export the stage would be bundled fake-quantized and without int8
    module, resumed = _segmenter(), _lenient_qat(tmp_path / "resumed")
    _qat_stage_trainer([resumed, ModelCheckpoint(dirpath=checkpoints, save_last=True)],
                       enable_checkpointing=True).fit(module, datamodule=_DiscStageData(),
                                                      ckpt_path=str(checkpoints / "last.ckpt"))
    assert resumed.int8_path == tmp_path / "resumed" / "model_int8.onnx" and resumed.int8_path.is_file()
    assert not any(parametrize.is_parametrized(m) for m in module.net.modules())
    assert resumed.report["quant/int8_size_bytes"] == resumed.int8_path.stat().st_size
