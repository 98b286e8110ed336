"""GGUF checkpoints: config, tokenizer and dequantized weights with Hugging Face names.

A GGUF file is untrusted input. Its header is parsed here by a small reader that checks every
count, length, dimension, type and offset against the file size before using it, so a truncated
or crafted file gives a ValueError naming the file (and the tensor), never an out-of-bounds read,
a huge allocation or a crash inside numpy. Only after that check do we hand the file to
transformers (config, tokenizer) or read tensor bytes (dequantized with the `gguf` package).

Weights are dequantized to float32 at load; the model casts them to its own dtype. The GGUF ->
HF name map and llama.cpp's q/k row permutation are undone with transformers' own GGUF helpers.
"""

from __future__ import annotations

import copy
import functools
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4  # arrays of arrays are legal; a deeper nest is a crafted file
_DEFAULT_ALIGNMENT = 32
# Value types: (struct code, size) for the fixed-size scalars; 7 is bool.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
            6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9


def _supported_types() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, block size, bytes per block) for the types we can dequantize."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    names = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    return {int(T[n]): (n, *GGML_QUANT_SIZES[T[n]]) for n in names}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / PyTorch order (GGUF stores the fastest dim first)
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]  # scalars and strings; arrays are kept only as ("array", count)
    tensors: list[GGUFTensorInfo]
    data_start: int
    file_size: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: invalid GGUF file: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what} at byte {self.pos} "
                            f"(needs {n} bytes, file has {self.size})")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", 8, what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8") from exc

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_DEPTH}")
        item_type = self.scalar("I", 4, what + " item type")
        count = self.scalar("Q", 8, what + " count")
        # Each item takes at least this many bytes: reject a huge count before looping on it.
        min_item = _SCALARS[item_type][1] if item_type in _SCALARS else 8
        self.need(count * min_item, f"{what} ({count} items)")
        if item_type in _SCALARS:
            self.pos += count * min_item  # fixed size: skip without a Python loop
        else:
            for _ in range(count):
                self.value(item_type, what + " item", depth + 1)
        return ("array", count)


def _parse_tensor_info(cur: _Cursor, types: dict) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.scalar("I", 4, f"tensor {name!r} n_dims")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dims (1..{_MAX_DIMS} allowed)")
    dims = tuple(cur.scalar("Q", 8, f"tensor {name!r} dim") for _ in range(n_dims))
    ggml_type = cur.scalar("I", 4, f"tensor {name!r} type")
    offset = cur.scalar("Q", 8, f"tensor {name!r} offset")
    if ggml_type not in types:
        raise cur.fail(f"tensor {name!r} has unknown or unsupported GGML type {ggml_type}")
    if any(d <= 0 for d in dims):
        raise cur.fail(f"tensor {name!r} has a non-positive dimension {dims}")
    return name, dims, ggml_type, offset


def _check_tensor(path: str, name: str, dims: tuple[int, ...], ggml_type: int, offset: int,
                  types: dict, data_start: int, alignment: int, file_size: int) -> GGUFTensorInfo:
    type_name, block, block_bytes = types[ggml_type]
    where = f"{path}: invalid GGUF file: tensor {name!r} ({type_name}, dims {list(dims)})"
    if dims[0] % block:
        raise ValueError(f"{where}: row length {dims[0]} is not a multiple of the "
                         f"{type_name} block size {block}")
    n_elements = 1
    for d in dims:  # Python ints: no overflow, and the byte check below bounds the product
        n_elements *= d
    nbytes = n_elements // block * block_bytes
    if offset % alignment:
        raise ValueError(f"{where}: data offset {offset} is not aligned to {alignment}")
    start = data_start + offset
    if start + nbytes > file_size:
        raise ValueError(f"{where}: data [{start}, {start + nbytes}) lies past the end of the "
                         f"file ({file_size} bytes); the file is truncated or corrupt")
    return GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, type_name, start, nbytes)


def _parse_header(buf, path: str) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if cur.size < 4 or bytes(buf[:4]) != _MAGIC:
        raise cur.fail("missing GGUF magic (not a GGUF file, or empty)")
    cur.pos = 4
    version = cur.scalar("I", 4, "version")
    if version not in (2, 3):
        # A big-endian file reads as a huge version number here; both are unsupported.
        raise cur.fail(f"unsupported GGUF version {version} (2 or 3, little-endian, expected)")
    n_tensors = cur.scalar("Q", 8, "tensor count")
    n_kv = cur.scalar("Q", 8, "metadata count")
    # Smallest possible entries: kv = 8 (key len) + 4 (type) + 1; tensor = 8 + 4 + 8 + 4 + 8.
    cur.need(n_kv * 13 + n_tensors * 32, f"{n_kv} metadata entries and {n_tensors} tensors")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        metadata[key] = cur.value(cur.scalar("I", 4, f"type of {key!r}"), f"metadata {key!r}")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment % 8:
        raise cur.fail(f"general.alignment {alignment!r} is not a positive multiple of 8")
    types = _supported_types()
    raw = [_parse_tensor_info(cur, types) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    if data_start > cur.size:
        raise cur.fail(f"data section starts at {data_start}, past the end ({cur.size} bytes)")
    tensors = [_check_tensor(path, *r, types, data_start, alignment, cur.size) for r in raw]
    _check_unique_and_disjoint(path, tensors)
    return GGUFHeader(path, version, metadata, tensors, data_start, cur.size)


def _check_unique_and_disjoint(path: str, tensors: list[GGUFTensorInfo]) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"{path}: invalid GGUF file: tensor {t.name!r} appears twice")
        seen.add(t.name)
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise ValueError(f"{path}: invalid GGUF file: tensor {b.name!r} overlaps {a.name!r}")


def _open_map(path: str) -> mmap.mmap:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: invalid GGUF file: the file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _close(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view lives on in an exception's traceback: let GC unmap it
        pass


def read_gguf_header(path: str) -> GGUFHeader:
    """Parses and validates a GGUF header (metadata and tensor table); reads no tensor data."""
    buf = _open_map(path)
    try:
        return _parse_header(buf, os.fspath(path))
    finally:
        _close(buf)


# ---------------------------------------------------------------- config and tokenizer


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(os.fspath(path))
    return os.path.dirname(path), os.path.basename(path)


@functools.lru_cache(maxsize=4)
def _cached_config(path: str, mtime_ns: int, size: int):
    # transformers parses the whole vocabulary for a config (seconds); the engine asks for the
    # config several times (engine args, loader), so keep it per file version.
    from transformers import AutoConfig
    header = read_gguf_header(path)
    folder, name = _split(path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types for unsupported content
        raise ValueError(f"{path}: cannot build a config from GGUF metadata: {exc}") from exc
    config.architectures = [_causal_lm_class(config, path)]
    config.dtype = _checkpoint_dtype(header)
    return config


def load_gguf_config(path: str):
    """A transformers PretrainedConfig for a GGUF file, with `architectures` and `dtype` set."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: GGUF file not found")
    st = os.stat(path)
    return copy.deepcopy(_cached_config(path, st.st_mtime_ns, st.st_size))


def _causal_lm_class(config, path: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ValueError(f"{path}: GGUF model type {config.model_type!r} has no causal-LM class")
    return name


def _checkpoint_dtype(header: GGUFHeader) -> torch.dtype:
    """The dtype the weights were stored in: 16-bit only if every matrix is exactly that type.

    Quantized weights dequantize to float32 (their scales are fp16 but the products are not
    representable in 16 bits exactly), so a quantized file reports float32, as transformers does.
    """
    kinds = {t.type_name for t in header.tensors if len(t.shape) >= 2}
    if kinds == {"BF16"}:
        return torch.bfloat16
    if kinds == {"F16"}:
        return torch.float16
    return torch.float32


def load_gguf_tokenizer(path: str, **kwargs):
    """A transformers tokenizer (with the file's chat template) built from GGUF metadata."""
    from transformers import AutoTokenizer
    path = os.path.abspath(os.fspath(path))
    read_gguf_header(path)  # validate before transformers' unchecked reader sees the file
    folder, name = _split(path)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
    except Exception as exc:
        raise ValueError(f"{path}: cannot build a tokenizer from GGUF metadata: {exc}") from exc


# ---------------------------------------------------------------- weights


class _NameShim:
    """Just what transformers' get_gguf_hf_weights_map reads from a model.

    Passing the real model makes it rebuild gguf's name table for every submodule (seconds for
    a 30-layer model); one level of children keeps its prefix fallback (e.g. Bloom's
    `transformer.`) at a fraction of the cost.
    """

    def __init__(self, config, names, children=()):
        self.config, self._names, self._children = config, list(names), list(children)

    def state_dict(self):
        return dict.fromkeys(self._names)

    def named_children(self):
        return self._children


def _expected_params(config) -> tuple[_NameShim, dict[str, tuple[int, ...]]]:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):  # names and shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    children = [(n, _NameShim(config, c.state_dict().keys())) for n, c in model.named_children()]
    return _NameShim(config, shapes.keys(), children), shapes


def _name_map_and_processor(header: GGUFHeader, config):
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map)
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{header.path}: invalid GGUF file: no general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    shim, shapes = _expected_params(config)
    try:
        name_map = get_gguf_hf_weights_map(shim, processor, model_type=arch,
                                           num_layers=config.num_hidden_layers)
    except NotImplementedError as exc:
        raise ValueError(f"{header.path}: GGUF architecture {arch!r} is not supported: "
                         f"{exc}") from exc
    return name_map, processor, shapes


def _dequantize(buf, info: GGUFTensorInfo, path: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    rows = raw.reshape(*info.shape[:-1], -1)  # one row of blocks per last-dim row
    qtype = GGMLQuantizationType(info.ggml_type)
    if info.type_name == "BF16":
        # gguf returns bf16 as a float32 view; do it in torch, which knows bfloat16
        out = torch.from_numpy(rows.copy()).view(torch.bfloat16).float().numpy()
    else:
        out = dequantize(rows, qtype)
    if out.shape != info.shape:
        raise ValueError(f"{path}: tensor {info.name!r} ({info.type_name}) dequantized to "
                         f"{out.shape}, expected {info.shape}")
    return out


def iterate_gguf_tensors(path: str) -> Iterator[tuple[GGUFTensorInfo, np.ndarray]]:
    """Yields (tensor info, float32 array) for every tensor, in file order, with GGUF names."""
    path = os.path.abspath(os.fspath(path))
    buf = _open_map(path)
    try:
        header = _parse_header(buf, path)
        for info in header.tensors:
            out = _dequantize(buf, info, path)
            # F32 comes back as a read-only view of the map: copy so it outlives the map
            yield info, (out if out.flags.writeable else out.copy())
    finally:
        _close(buf)


def iterate_gguf_weights(path: str, hf_config=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF parameter name, float32 tensor) for every weight of a GGUF file.

    `hf_config` defaults to load_gguf_config(path). Tensors the HF model has no parameter for
    (e.g. llama.cpp's rope_freqs) are skipped. With tied embeddings no lm_head is yielded.
    """
    path = os.path.abspath(os.fspath(path))
    config = hf_config if hf_config is not None else load_gguf_config(path)
    name_map, processor, shapes = _name_map_and_processor(read_gguf_header(path), config)
    # MoE processors stack experts into parsed["tensors"] across several GGUF tensors.
    parsed: dict[str, dict] = {"tensors": {}, "config": config.to_dict()}
    for info, weights in iterate_gguf_tensors(path):
        item = _convert_one(info, weights, path, name_map, processor, parsed, shapes)
        if item is not None:
            yield item
    yield from parsed["tensors"].items()


def _convert_one(info, weights, path, name_map, processor, parsed, shapes):
    try:
        result = processor.process(weights=weights, name=info.name,
                                   tensor_key_mapping=name_map, parsed_parameters=parsed)
    except (ValueError, IndexError) as exc:  # e.g. a q/k row count not divisible by heads
        raise ValueError(f"{path}: tensor {info.name!r} {info.shape}: {exc}") from exc
    if result.name is None:  # consumed into parsed["tensors"]
        return None
    hf_name = name_map.get(result.name)
    if hf_name is None:
        logger.debug("%s: skipping tensor %r with no HF parameter", path, info.name)
        return None
    # the q/k un-permutation returns a strided view; make it one contiguous block
    tensor = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
    expected = shapes.get(hf_name)
    if expected is not None and tuple(tensor.shape) != expected:
        raise ValueError(f"{path}: tensor {info.name!r} has shape {tuple(tensor.shape)} but "
                         f"{hf_name} needs {expected}")
    return hf_name, tensor
