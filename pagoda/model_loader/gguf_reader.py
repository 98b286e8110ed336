"""The GGUF file reader: parses and validates a GGUF header before anything else reads it.

A GGUF file is untrusted input. Every count, length, dimension, type and offset is checked
against the file size before it is used, so a truncated or crafted file gives a ValueError
naming the file (and the tensor), never an out-of-bounds read, a huge allocation or a crash
inside numpy. gguf_loader.py builds the config, tokenizer and weights on top of it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

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


def parse_header(buf, path: str) -> GGUFHeader:
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


def open_map(path: str) -> mmap.mmap:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: invalid GGUF file: the file is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def close_map(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a view lives on in an exception's traceback: let GC unmap it
        pass


def read_gguf_header(path: str) -> GGUFHeader:
    """Parses and validates a GGUF header (metadata and tensor table); reads no tensor data."""
    buf = open_map(path)
    try:
        return parse_header(buf, os.fspath(path))
    finally:
        close_map(buf)
