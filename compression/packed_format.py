"""The on-disk format of a weight-shared network: bit-packed cluster indices + codebooks, entropy-coded.

A weight-shared network saved with ``torch.save`` is as large as the original (every shared weight is still
a float32). Here each shared layer is stored as its codebook and its cluster indices at
``ceil(log2 k')`` bits per weight (``k'`` the layer's codebook size), every other tensor of the state dict as
it is, and the whole payload is compressed (lzma by default: an LZ77 + range-coder entropy coder, which
takes whatever unevenness there is in the use of the clusters). The file's size is the model size to report.

Layout (integers little-endian; no pickle anywhere):

* header, 32 bytes, uncompressed: ``magic`` (8 bytes, ``b"RCWSHARE"``), format ``version`` (uint16),
  ``codec`` (uint8: 0 none, 1 zlib, 2 lzma/xz), 5 zero bytes, ``payload_bytes`` (uint64, uncompressed) and
  ``body_bytes`` (uint64, the compressed body that follows; the file is exactly 32 + body_bytes long);
* body: the payload compressed with the codec. Payload = ``metadata_bytes`` (uint32), the metadata as UTF-8
  JSON, then the blob region: the raw bytes of every tensor back to back.
* metadata: ``{"format", "byteorder", "architecture", "tensors": [...]}``; one entry per state-dict tensor,
  in state-dict order, with ``name``, ``dtype``, ``shape`` and

  - ``"kind": "dense"``: ``offset`` / ``nbytes`` of its raw bytes (row-major) in the blob region;
  - ``"kind": "shared"``: ``bits`` per index, ``codebook`` ``{offset, nbytes, size}`` (float32 centroids) and
    ``indices`` ``{offset, nbytes}``: the indices packed least-significant bit first, ``bits`` bits each,
    the last byte zero-padded.

The ``architecture`` entry (``describe_network`` makes it, ``build_network`` rebuilds a fresh network from it
with ``standard_builders``) is plain JSON for every network of the suite; the deployment bundle's network file
(``compression.deploy``) carries the same entry.

Decisions. The codebooks stay float32. At k = 16 a float16 codebook would save 32 bytes per layer, 0.8 kB
for the whole VGGUNet against 202 kB of indices at base 8 and 12.9 MB at base 64; on the trained base-64
network float16 centroids changed neither the test Dice nor the logits (RMS 0.0875 vs 0.0878 from the
unshared network's): harmless, but not worth a second code path for 0.006% of the file. The unshared tensors (biases, BatchNorm
affine parameters and running statistics, the small layers) stay in their own dtype, float32: they are
0.1% of the values of ``VGGUNet(base=64)``, and a running variance is where float16's 3 significant digits
and its 6e-5 underflow could change the outputs.

Measured (VGGUNet(base=64), k = 16): random init, ``torch.save`` 103.6 MB -> 12.97 MB packed (8.0x); the
trained network -> 12.73 MB (8.1x). lzma gains little over the raw 4-bit packing because k-means with a
linear start uses the clusters almost evenly: the indices' entropy is 3.86 bits, a bound of 12.48 MB that
a Huffman coder (Deep Compression's choice) could not beat by more than 2%. zlib did as well as lzma
(trained: 12.69 MB in 0.7 s against 12.73 MB in 8 s; uncompressed 13.07 MB): ``compression="zlib"`` is the
better choice for these networks; lzma stays the default of the API as specified.
"""

from __future__ import annotations

import inspect
import json
import lzma
import math
import struct
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from compression.weight_sharing import shared_layers
from lightning_modules.nets.backbones import create_backbone
from lightning_modules.nets.student import TopoFusionNet, build_student_net
from lightning_modules.nets.transformer_seg import ARCHITECTURE as TRANSFORMER
from lightning_modules.nets.transformer_seg import TransformerSegNet
from lightning_modules.nets.vgg_unet import VGGUNet

MAGIC = b"RCWSHARE"
FORMAT_VERSION = 1
FORMAT_NAME = "retina-compress/weight-sharing"
#: magic, version, codec, 5 padding bytes, payload bytes (uncompressed), body bytes (compressed)
HEADER = struct.Struct("<8sHB5xQQ")
METADATA_LENGTH = struct.Struct("<I")
CODECS = {"none": 0, "zlib": 1, "lzma": 2}
CODEBOOK_DTYPE = torch.float32
#: dtypes a state dict may hold (what ``torch.dtype`` names them, without the ``torch.`` prefix)
STORABLE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
                   "bool")


class PackedFileError(ValueError):
    """A packed weight file that cannot be read: the message names the file and what is wrong with it."""


Builder = Callable[[dict[str, Any]], nn.Module]


def index_bits(codebook_size: int) -> int:
    """Bits per cluster index for a codebook of this size: ``ceil(log2 size)`` (0 for a single centroid)."""
    if not 1 <= codebook_size <= 256:
        raise ValueError(f"codebook size {codebook_size} is outside [1, 256]")
    return (codebook_size - 1).bit_length()


def pack_indices(indices: Tensor | np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below ``2**bits`` at ``bits`` bits each, least-significant bit first."""
    if not 0 <= bits <= 8:
        raise ValueError(f"bits={bits}: cluster indices are packed into 0 to 8 bits")
    values = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"indices in [{values.min()}, {values.max()}] do not fit in {bits} bits")
    if bits == 0:
        return b""
    # one row of 8 bits per index (LSB first), keep its low ``bits`` bits, concatenate, pack 8 to a byte
    planes = np.unpackbits(values.astype(np.uint8).reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_indices``: ``count`` indices (uint8) from ``data``."""
    if not 0 <= bits <= 8:
        raise ValueError(f"bits={bits}: cluster indices are packed into 0 to 8 bits")
    if bits == 0:
        return np.zeros(count, dtype=np.uint8)
    if len(data) * 8 < count * bits:
        raise ValueError(f"{len(data)} bytes hold fewer than {count} indices of {bits} bits")
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    return np.packbits(planes.reshape(count, bits), axis=1, bitorder="little").reshape(count)


def packed_size_formula(layer_sizes: Sequence[int], k: int | Sequence[int], codebook_value_bytes: int = 4) -> int:
    """Uncompressed bytes of the shared layers in the payload: packed indices plus codebooks.

    ``sum_i ceil(n_i * ceil(log2 k_i) / 8) + k_i * codebook_value_bytes`` over the layers, ``n_i`` their
    weights and ``k_i`` their codebook sizes (``k``: one size for all, or one per layer).
    """
    sizes = [k] * len(layer_sizes) if isinstance(k, int) else list(k)
    if len(sizes) != len(layer_sizes):
        raise ValueError(f"{len(layer_sizes)} layer sizes but {len(sizes)} codebook sizes")
    return sum(math.ceil(n * index_bits(size) / 8) + size * codebook_value_bytes
               for n, size in zip(layer_sizes, sizes))


def save_shared(model: nn.Module, path: str | Path, architecture: Mapping[str, Any],
                compression: str = "lzma") -> Path:
    """Write ``model``'s shared layers packed and the rest of its state dict to one compressed file.

    Args:
        model: a network with layers shared by ``share_weights`` (still parametrized).
        path: the file to write; its folder is created.
        architecture: plain JSON telling ``load_shared`` how to rebuild the network, with a ``"kind"``
            (e.g. ``vgg_unet_architecture(net)`` or ``{"kind": "dr_student", "kwargs": {...}}``).
        compression: ``"lzma"``, ``"zlib"`` (as small for these networks, 10x faster) or ``"none"``.

    Returns:
        ``path``.
    """
    if compression not in CODECS:
        raise ValueError(f"compression={compression!r}: choose one of {sorted(CODECS)}")
    if not isinstance(architecture, Mapping) or not isinstance(architecture.get("kind"), str):
        raise ValueError(f"architecture must be a dict with a 'kind' string (e.g. 'vgg_unet'), got {architecture!r}")
    try:
        json.dumps(architecture)
    except (TypeError, ValueError) as err:
        raise ValueError(f"architecture must be plain JSON (dicts, lists, str, numbers): {err}") from err
    shared = shared_layers(model)
    if not shared:
        raise ValueError(f"no shared layer in this {type(model).__name__}: call share_weights(model) before "
                         "save_shared (a plain network is saved with torch.save)")

    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0

    def add_blob(data: bytes) -> dict[str, int]:
        nonlocal offset
        blobs.append(data)
        location = {"offset": offset, "nbytes": len(data)}
        offset += len(data)
        return location

    parametrized_keys = {_key(name, f"parametrizations.weight.{key}"): name
                         for name in shared for key in ("original", "0.codebook", "0.indices")}
    for key, tensor in model.state_dict().items():
        if key in parametrized_keys:
            layer = parametrized_keys[key]
            if not key.endswith(".original"):
                continue  # one entry per shared layer, written where its latent weight would be
            codebook, indices = shared[layer].codebook.detach(), shared[layer].indices
            bits = index_bits(codebook.numel())
            entries.append({
                "name": _key(layer, "weight"),
                "kind": "shared", "dtype": _dtype_name(tensor.dtype), "shape": list(indices.shape), "bits": bits,
                "codebook": add_blob(_raw_bytes(codebook.to(CODEBOOK_DTYPE))) | {"size": codebook.numel()},
                # contiguous(): row-major order, whatever the layer's memory format
                "indices": add_blob(pack_indices(indices.contiguous(), bits)),
            })
        else:
            entries.append({"name": key, "kind": "dense", "dtype": _dtype_name(tensor.dtype),
                            "shape": list(tensor.shape)} | add_blob(_raw_bytes(tensor)))

    metadata = json.dumps({"format": FORMAT_NAME, "byteorder": sys.byteorder, "architecture": dict(architecture),
                           "tensors": entries}).encode("utf-8")
    payload = b"".join([METADATA_LENGTH.pack(len(metadata)), metadata, *blobs])
    body = _compress(payload, compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HEADER.pack(MAGIC, FORMAT_VERSION, CODECS[compression], len(payload), len(body)) + body)
    return path


def read_payload(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """Check the header, decompress, and split the payload: ``(metadata, blob region)``."""
    path = Path(path)
    where = f"packed weight file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist: write it with save_shared(model, path, architecture)")
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise PackedFileError(f"{where} is truncated: {len(data)} bytes, shorter than the {HEADER.size}-byte "
                              "header; write it again")
    magic, version, codec, payload_bytes, body_bytes = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PackedFileError(f"{where} is not a weight-sharing file (starts with {magic!r}, expected {MAGIC!r}): "
                              "a torch.save file is read with torch.load / load_network instead")
    if version != FORMAT_VERSION:
        raise PackedFileError(f"{where} has format version {version}; this code reads version {FORMAT_VERSION}: "
                              "read it with the retina-compress version that wrote it, or write it again")
    codec_name = {code: name for name, code in CODECS.items()}.get(codec)
    if codec_name is None:
        raise PackedFileError(f"{where} names an unknown compression codec {codec}: the file is corrupt")
    if len(data) - HEADER.size != body_bytes:
        state = "truncated" if len(data) - HEADER.size < body_bytes else "followed by extra bytes"
        raise PackedFileError(f"{where} is {state}: its header announces {body_bytes} bytes after the header, "
                              f"the file holds {len(data) - HEADER.size}; copy or write it again")
    try:
        payload = _decompress(data[HEADER.size:], codec_name)
    except (lzma.LZMAError, zlib.error) as err:
        raise PackedFileError(f"{where} is corrupt: {codec_name} could not decompress it ({err})") from err
    if len(payload) != payload_bytes or len(payload) < METADATA_LENGTH.size:
        raise PackedFileError(f"{where} is corrupt: {len(payload)} payload bytes, the header says {payload_bytes}")
    (metadata_bytes,) = METADATA_LENGTH.unpack_from(payload)
    start = METADATA_LENGTH.size
    try:
        metadata = json.loads(payload[start:start + metadata_bytes].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackedFileError(f"{where} is corrupt: unreadable metadata ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise PackedFileError(f"{where} is corrupt: its metadata does not describe a {FORMAT_NAME} file")
    if metadata.get("byteorder") != sys.byteorder:
        raise PackedFileError(f"{where} was written on a {metadata.get('byteorder')}-endian machine; this one "
                              f"is {sys.byteorder}-endian")
    return metadata, payload[start + metadata_bytes:]


def read_shared_state_dict(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(architecture, plain state dict)`` of a packed file: shared weights decoded to ``codebook[indices]``."""
    metadata, blobs = read_payload(path)
    state: dict[str, Tensor] = {}
    try:
        for entry in metadata["tensors"]:
            dtype, shape = _dtype(entry["dtype"]), tuple(entry["shape"])
            if entry["kind"] == "shared":
                codebook = _tensor(blobs, entry["codebook"], CODEBOOK_DTYPE, (entry["codebook"]["size"],))
                count = math.prod(shape)
                indices = unpack_indices(_blob(blobs, entry["indices"]), count, entry["bits"])
                if count and int(indices.max()) >= codebook.numel():
                    raise ValueError(f"cluster index {int(indices.max())} beyond the {codebook.numel()}-entry codebook")
                state[entry["name"]] = codebook[torch.from_numpy(indices.astype(np.int64))].reshape(shape).to(dtype)
            elif entry["kind"] == "dense":
                state[entry["name"]] = _tensor(blobs, entry, dtype, shape)
            else:
                raise ValueError(f"unknown tensor kind {entry['kind']!r}")
        architecture = metadata["architecture"]
    except (KeyError, TypeError, ValueError) as err:
        raise PackedFileError(f"packed weight file {str(path)!r} is corrupt: {type(err).__name__}: {err}") from err
    return architecture, state


def load_shared(path: str | Path, builders: Mapping[str, Builder]) -> nn.Module:
    """Rebuild the network of a ``save_shared`` file: a plain network (no parametrization), weights loaded.

    Args:
        path: the packed file.
        builders: architecture ``"kind"`` -> function building a fresh network from the architecture dict,
            e.g. ``standard_builders()``.

    Raises:
        FileNotFoundError, PackedFileError: missing, foreign, truncated or corrupt file, a kind without a
            builder, or weights that do not fit the network the builder makes (each message names the file).
    """
    architecture, state = read_shared_state_dict(path)
    kind = architecture.get("kind") if isinstance(architecture, dict) else None
    if kind not in builders:
        raise PackedFileError(f"packed weight file {str(path)!r} holds a {kind!r} network, but builders were given "
                              f"only for {sorted(builders)}: pass a builder for {kind!r}")
    net = builders[kind](architecture)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise PackedFileError(f"weights in packed file {str(path)!r} do not fit the {kind!r} network built from "
                              f"its architecture {architecture}: {err}") from err
    return net


def vgg_unet_architecture(net: VGGUNet) -> dict[str, Any]:
    """The architecture entry of a (possibly pruned) ``VGGUNet``."""
    return {"kind": "vgg_unet", "spec": net.spec()}


def build_vgg_unet(architecture: Mapping[str, Any]) -> VGGUNet:
    return VGGUNet.from_spec(architecture["spec"])


def build_dr_student(architecture: Mapping[str, Any]) -> nn.Module:
    """The DR student from ``{"kind": "dr_student", "kwargs": build_student_net arguments}``, never downloading:
    the file holds every weight, so no pretrained weights are fetched."""
    kwargs = dict(architecture.get("kwargs", {})) | {"pretrained": "none", "pretrained_path": None}
    return build_student_net(**kwargs)


def build_transformer_segmenter(architecture: Mapping[str, Any]) -> TransformerSegNet:
    """The transformer segmenter from ``{"kind": "transformer", "spec": net.spec()}`` (its spec has no weights
    path: nothing is read but the file being loaded)."""
    return TransformerSegNet.from_spec(architecture["spec"])


#: timm arguments that would read or fetch weights while building; a classifier is rebuilt from its own file only
_WEIGHT_SOURCES = frozenset({"pretrained", "pretrained_path", "checkpoint_path", "pretrained_cfg",
                             "pretrained_cfg_overlay"})


def build_timm_classifier(architecture: Mapping[str, Any]) -> nn.Module:
    """A timm classifier (the DR teacher, the architecture baselines) from ``{"kind": "timm_classifier",
    "kwargs": {"backbone", "num_classes", "drop_rate", "backbone_kwargs"}}``, the arguments
    ``TeacherClassifier`` builds its network with; never downloading."""
    kwargs = dict(architecture["kwargs"])
    extra = dict(kwargs.get("backbone_kwargs") or {})
    sources = sorted(_WEIGHT_SOURCES & set(extra))
    if sources:
        raise ValueError(f"backbone_kwargs {sources} would load weights while building the network: the file "
                         "holds every weight")
    return create_backbone(kwargs["backbone"], pretrained="none", num_classes=int(kwargs["num_classes"]),
                           drop_rate=float(kwargs.get("drop_rate", 0.0)), **extra)


def standard_builders() -> dict[str, Builder]:
    """Builders for every network of this suite: ``vgg_unet`` (pruned widths included), ``transformer``,
    ``dr_student`` and ``timm_classifier`` (DR teacher, baselines)."""
    return {"vgg_unet": build_vgg_unet, TRANSFORMER: build_transformer_segmenter, "dr_student": build_dr_student,
            "timm_classifier": build_timm_classifier}


def build_network(architecture: Mapping[str, Any], builders: Mapping[str, Builder] | None = None) -> nn.Module:
    """A fresh network of the architecture entry ``architecture`` (``describe_network``), weights aside.

    Raises:
        ValueError: no builder for its ``kind`` (``builders``, default ``standard_builders()``), or arguments the
            builder refuses.
    """
    builders = standard_builders() if builders is None else builders
    kind = architecture.get("kind") if isinstance(architecture, Mapping) else None
    if kind not in builders:
        raise ValueError(f"a {kind!r} network: networks of the kinds {sorted(builders)} can be rebuilt")
    return builders[kind](architecture)


def describe_network(net: nn.Module, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture entry (plain JSON, ``{"kind": ..., ...}``) that ``build_network`` rebuilds ``net`` from.

    A segmentation network describes itself (``spec()``: a pruned VGGUNet's widths, a TransformerSegNet's
    encoder). The DR student and the timm classifiers (teacher, baselines) cannot: they are described by the
    hyperparameters their LightningModule built them with (``hparams``), the pretrained source dropped since the
    saved file holds every weight. Networks finished by QAT (``baked_qat_copy``) or weight sharing (``unshare``)
    are plain networks of their original class, described alike.

    Raises:
        ValueError: a network of another class, or a classifier given without its hyperparameters.
    """
    hparams = dict(hparams or {})
    if isinstance(net, VGGUNet):
        return vgg_unet_architecture(net)
    if isinstance(net, TransformerSegNet):
        return {"kind": TRANSFORMER, "spec": net.spec()}
    timm_model = hasattr(net, "get_classifier")  # timm's classifier interface
    if isinstance(net, TopoFusionNet) and "backbone" in hparams:
        accepted = set(inspect.signature(build_student_net).parameters) - {"pretrained", "pretrained_path"}
        return {"kind": "dr_student", "kwargs": {key: hparams[key] for key in sorted(accepted & set(hparams))}}
    if timm_model and {"backbone", "num_classes"} <= set(hparams):
        return {"kind": "timm_classifier",
                "kwargs": {"backbone": hparams["backbone"], "num_classes": hparams["num_classes"],
                           "drop_rate": hparams.get("drop_rate", 0.0),
                           "backbone_kwargs": dict(hparams.get("backbone_kwargs") or {})}}
    # a classifier's module hyperparameters name its backbone; without them its timm model cannot be named
    classifier = timm_model or isinstance(net, TopoFusionNet)
    needs = " without the hyperparameters of the module that built it (backbone, num_classes)" if classifier else ""
    raise ValueError(f"cannot describe a {type(net).__name__} network{needs}: the suite rebuilds networks of the "
                     f"kinds {sorted(standard_builders())}")


def _key(layer: str, attribute: str) -> str:
    return f"{layer}.{attribute}" if layer else attribute


def _compress(payload: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    if codec == "zlib":
        return zlib.compress(payload, level=9)
    return payload


def _decompress(body: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return lzma.decompress(body, format=lzma.FORMAT_XZ)
    if codec == "zlib":
        return zlib.decompress(body)
    return body


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in STORABLE_DTYPES:
        raise ValueError(f"cannot store a {dtype} tensor: supported are {', '.join(STORABLE_DTYPES)}")
    return name


def _dtype(name: str) -> torch.dtype:
    if name not in STORABLE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return getattr(torch, name)


def _raw_bytes(tensor: Tensor) -> bytes:
    # through uint8, so every dtype (bfloat16 too, which numpy lacks) is written as its raw bytes
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _blob(blobs: bytes, location: Mapping[str, int]) -> bytes:
    offset, nbytes = int(location["offset"]), int(location["nbytes"])
    if offset < 0 or nbytes < 0 or offset + nbytes > len(blobs):
        raise ValueError(f"blob [{offset}, {offset + nbytes}) lies outside the {len(blobs)}-byte blob region")
    return blobs[offset:offset + nbytes]


def _tensor(blobs: bytes, location: Mapping[str, int], dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    raw = _blob(blobs, location)
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(raw) != expected:
        raise ValueError(f"{len(raw)} bytes for a {dtype} tensor of shape {shape} (expected {expected})")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype).reshape(shape)
