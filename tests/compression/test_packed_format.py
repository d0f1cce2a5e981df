"""The packed weight file: bit-exact index packing, payload size against its formula, real size, bad files."""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import pytest
import torch

from compression.packed_format import (
    HEADER,
    PackedFileError,
    index_bits,
    load_shared,
    pack_indices,
    packed_size_formula,
    read_payload,
    save_shared,
    standard_builders,
    unpack_indices,
    vgg_unet_architecture,
)
from compression.weight_sharing import share_weights, shared_layers
from lightning_modules.nets.student import build_student_net
from lightning_modules.nets.vgg_unet import VGGUNet

SIZE = 16


# --------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize(("k", "bits"), [(1, 0), (2, 1), (3, 2), (10, 4), (16, 4), (17, 5), (256, 8)])
def test_index_bits_is_ceil_log2_k(k: int, bits: int):
    assert index_bits(k) == bits


def test_indices_are_packed_least_significant_bit_first():
    # 1 -> bits 1,0 ; 2 -> 0,1 ; 3 -> 1,1 : byte bits 0..5 = 1,0,0,1,1,1 = 1 + 8 + 16 + 32
    assert pack_indices(torch.tensor([1, 2, 3]), bits=2) == bytes([57])
    # 9 indices of 1 bit take 2 bytes: 0b11111111 and 0b00000001
    assert pack_indices(torch.ones(9, dtype=torch.int64), bits=1) == bytes([255, 1])


@pytest.mark.parametrize(("k", "bits"), [(2, 1), (16, 4), (256, 8), (10, 4), (5, 3)])
def test_pack_unpack_round_trip_is_bit_exact(k: int, bits: int):
    count = 1001  # not a multiple of 8: the last byte is padded
    indices = torch.randint(0, k, (count,), generator=torch.Generator().manual_seed(k))
    indices[:2] = torch.tensor([0, k - 1])  # both ends of the range
    packed = pack_indices(indices, index_bits(k))
    assert index_bits(k) == bits
    assert len(packed) == math.ceil(count * bits / 8)
    assert torch.equal(torch.from_numpy(unpack_indices(packed, count, bits)).long(), indices)


def test_an_index_that_does_not_fit_its_bits_is_refused():
    with pytest.raises(ValueError, match="do not fit in 4 bits"):
        pack_indices(torch.tensor([3, 16]), bits=4)


def test_packed_size_formula_by_hand():
    # 100 weights at 4 bits = 50 bytes, 7 weights at 4 bits = 28 bits = 4 bytes, plus two 16 x 4-byte codebooks
    assert packed_size_formula([100, 7], k=16) == 50 + 64 + 4 + 64
    # per-layer codebook sizes: 10 weights with k'=3 (2 bits: 3 bytes + 12), 8 weights with k'=256 (8 + 1024)
    assert packed_size_formula([10, 8], k=[3, 256]) == 3 + 12 + 8 + 1024


# ------------------------------------------------------------------------------------------ the file
@pytest.fixture(scope="module")
def shared_base8(tmp_path_factory) -> tuple[VGGUNet, Path, int]:
    """VGGUNet(base=8) shared at k = 16 and packed; also the size of torch.save of its float32 state dict."""
    torch.manual_seed(0)
    net = VGGUNet(base=8).eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    share_weights(net, k=16)
    path = save_shared(net, tmp_path_factory.mktemp("packed") / "base8.rcws", vgg_unet_architecture(net))
    return net, path, buffer.tell()


def test_the_payload_holds_the_formula_for_shared_layers_plus_the_other_tensors_raw(shared_base8):
    net, path, _ = shared_base8
    shared = shared_layers(net)
    layer_sizes = [s.indices.numel() for s in shared.values()]
    codebook_sizes = [s.codebook.numel() for s in shared.values()]
    assert set(codebook_sizes) == {16}
    shared_keys = {f"{name}.weight" for name in shared}
    plain = VGGUNet(base=8).state_dict()  # the unshared tensors, at their float32 / int64 sizes
    others = sum(t.numel() * t.element_size() for key, t in plain.items() if key not in shared_keys)
    _, blobs = read_payload(path)
    assert len(blobs) == packed_size_formula(layer_sizes, k=16) + others


def test_the_packed_file_is_at_least_7_times_smaller_than_torch_save(shared_base8):
    _, path, torch_save_bytes = shared_base8
    # 4-bit indices alone would be 8x smaller; float biases, BN and the two small layers cost the rest
    assert path.stat().st_size * 7 <= torch_save_bytes


def test_the_loaded_network_is_plain_and_computes_the_shared_networks_outputs(shared_base8):
    net, path, _ = shared_base8
    loaded = load_shared(path, standard_builders())
    assert type(loaded) is VGGUNet and loaded.widths == net.widths
    assert not any(hasattr(module, "parametrizations") for module in loaded.modules())
    image = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(loaded.eval()(image), net(image))


def test_a_dr_student_round_trips_through_its_builder(tmp_path: Path):
    kwargs = {"backbone": "test_efficientnet", "num_classes": 3, "topo_features": 8, "topo_hidden": 8,
              "topo_embedding": 4}
    torch.manual_seed(0)
    net = build_student_net(pretrained="none", **kwargs).eval()
    share_weights(net, k=8)
    path = save_shared(net, tmp_path / "student.rcws", {"kind": "dr_student", "kwargs": kwargs})
    loaded = load_shared(path, standard_builders()).eval()
    image, topo = torch.randn(1, 3, 32, 32), torch.randn(1, 8)
    assert torch.equal(loaded(image, topo), net(image, topo))


@pytest.mark.parametrize("codec", ["zlib", "none"])
def test_other_codecs_read_back_the_same_weights(tmp_path: Path, codec: str):
    net = VGGUNet(base=4).eval()
    share_weights(net, k=4)
    path = save_shared(net, tmp_path / f"{codec}.rcws", vgg_unet_architecture(net), compression=codec)
    image = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(load_shared(path, standard_builders()).eval()(image), net(image))


# ----------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    net = VGGUNet(base=4)
    share_weights(net, k=4)
    return save_shared(net, tmp_path / "small.rcws", vgg_unet_architecture(net))


def test_a_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing.rcws"):
        load_shared(tmp_path / "nothing.rcws", standard_builders())


def test_a_torch_save_file_is_not_taken_for_a_packed_one(tmp_path: Path):
    path = tmp_path / "model.pt"
    torch.save(VGGUNet(base=4).state_dict(), path)
    with pytest.raises(PackedFileError, match=r"model.pt' is not a weight-sharing file"):
        load_shared(path, standard_builders())


def test_another_format_version_is_refused(small_file: Path):
    data = bytearray(small_file.read_bytes())
    struct.pack_into("<H", data, 8, 99)  # the version field follows the 8-byte magic
    small_file.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="small.rcws' has format version 99"):
        load_shared(small_file, standard_builders())


@pytest.mark.parametrize("keep", [HEADER.size - 5, -100])
def test_a_truncated_file_is_reported_as_truncated(small_file: Path, keep: int):
    data = small_file.read_bytes()
    small_file.write_bytes(data[:keep])
    with pytest.raises(PackedFileError, match="small.rcws' is truncated"):
        load_shared(small_file, standard_builders())


def test_a_corrupted_body_is_reported_as_corrupt(small_file: Path):
    data = bytearray(small_file.read_bytes())
    middle = HEADER.size + (len(data) - HEADER.size) // 2
    data[middle:middle + 16] = bytes(16)
    small_file.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="small.rcws' is corrupt"):
        load_shared(small_file, standard_builders())


def test_a_kind_without_a_builder_is_named(small_file: Path):
    with pytest.raises(PackedFileError, match=r"holds a 'vgg_unet' network, but builders were given only for "
                                              r"\['dr_student'\]"):
        load_shared(small_file, {"dr_student": standard_builders()["dr_student"]})


def test_weights_that_do_not_fit_the_built_network_are_reported(small_file: Path):
    with pytest.raises(PackedFileError, match="do not fit the 'vgg_unet' network"):
        load_shared(small_file, {"vgg_unet": lambda architecture: VGGUNet(base=8)})


def test_saving_needs_a_shared_network_and_a_plain_json_architecture(tmp_path: Path):
    net = VGGUNet(base=4)
    with pytest.raises(ValueError, match="call share_weights"):
        save_shared(net, tmp_path / "x.rcws", vgg_unet_architecture(net))
    share_weights(net, k=4)
    with pytest.raises(ValueError, match="'kind'"):
        save_shared(net, tmp_path / "x.rcws", {"spec": net.spec()})
    with pytest.raises(ValueError, match="plain JSON"):
        save_shared(net, tmp_path / "x.rcws", {"kind": "vgg_unet", "net": net})
    with pytest.raises(ValueError, match="compression"):
        save_shared(net, tmp_path / "x.rcws", vgg_unet_architecture(net), compression="gzip")
