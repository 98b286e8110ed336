"""GGUF checkpoints: config, tokenizer and dequantized weights with Hugging Face names.

A GGUF file is untrusted input: gguf_reader.py parses and validates its header first. Only
after that check do we hand the file to transformers (config, tokenizer) or read tensor bytes
(dequantized with the `gguf` package).

Weights are dequantized to float32 at load; the model casts them to its own dtype. The GGUF ->
HF name map and llama.cpp's q/k row permutation are undone with transformers' own GGUF helpers.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Iterator

import numpy as np
import torch

from pagoda.model_loader.gguf_reader import (GGUFHeader, GGUFTensorInfo, close_map,
                                             open_map, parse_header, read_gguf_header)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- config and tokenizer


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(os.fspath(path))
    return os.path.dirname(path), os.path.basename(path)


def _converted_dir(path: str, kind: str) -> str:
    """Where the transformers conversion of this file version (config, tokenizer, weight
    map) is kept: PAGODA_CACHE_DIR (default ~/.cache/pagoda)/gguf/<hash of path, mtime, size
    and the transformers version, whose conversion it is>/<kind>."""
    import transformers
    st = os.stat(path)
    key = hashlib.sha256(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0{transformers.__version__}"
                         .encode()).hexdigest()[:32]
    root = os.environ.get("PAGODA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "pagoda")
    return os.path.join(root, "gguf", key, kind)


def _save_pretrained(result, folder: str) -> None:
    result.save_pretrained(folder)


def _converted(path: str, kind: str, marker: str, load_saved, convert,
               save=_save_pretrained):
    """transformers parses the whole vocabulary to build a config or a tokenizer from GGUF
    metadata (3-6 s for SmolLM2, on every start and in both server processes). The result is
    saved once as plain JSON files (`save`, by default save_pretrained) and read back from
    there: a config in ~1 ms, a tokenizer in ~0.3 s. A cache that cannot be written or read
    is skipped."""
    folder = _converted_dir(path, kind)
    if os.path.isfile(os.path.join(folder, marker)):
        try:
            return load_saved(folder)
        except Exception:  # a damaged cache entry: convert again and replace it
            logger.warning("replacing the unreadable GGUF conversion cache %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    result = convert()
    tmp = f"{folder}.tmp-{os.getpid()}"
    try:
        save(result, tmp)
        os.replace(tmp, folder)  # atomic; another process may have won the race
    except Exception as exc:  # the cache is an optimisation: never fail a load over it
        logger.debug("GGUF conversion cache not written to %s: %s", folder, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@functools.lru_cache(maxsize=4)
def _cached_config(path: str, mtime_ns: int, size: int):
    # The engine asks for the config several times (engine args, loader): keep it per file
    # version in memory too.
    from transformers import AutoConfig
    header = read_gguf_header(path)
    folder, name = _split(path)

    def convert():
        try:
            return AutoConfig.from_pretrained(folder, gguf_file=name)
        except Exception as exc:  # transformers raises many types for unsupported content
            raise ValueError(f"{path}: cannot build a config from GGUF metadata: {exc}") from exc

    config = _converted(path, "config", "config.json", AutoConfig.from_pretrained, convert)
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

    def convert():
        try:
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
        except Exception as exc:
            raise ValueError(f"{path}: cannot build a tokenizer from GGUF metadata: "
                             f"{exc}") from exc

    if kwargs:  # options change the tokenizer: not the cached conversion
        return convert()
    return _converted(path, "tokenizer", "tokenizer_config.json", AutoTokenizer.from_pretrained,
                      convert)


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
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{header.path}: invalid GGUF file: no general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    name_map, shapes = _weights_map(header.path, arch, config, processor)
    return name_map, processor, shapes


def _weights_map(path: str, arch: str, config, processor) -> tuple[dict, dict]:
    """GGUF -> HF names and the HF parameter shapes. Working them out imports transformers'
    model classes and builds the model on the meta device (~1.9 s for SmolLM2, in the
    engine-core process at every start), so they are kept as JSON beside the converted config,
    per config (a caller may pass its own)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]

    def convert():
        shim, shapes = _expected_params(config)
        try:
            name_map = get_gguf_hf_weights_map(shim, processor, model_type=arch,
                                               num_layers=config.num_hidden_layers)
        except NotImplementedError as exc:
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported: "
                             f"{exc}") from exc
        return name_map, shapes

    def load_saved(folder):
        with open(os.path.join(folder, "map.json")) as f:
            saved = json.load(f)
        return saved["names"], {k: tuple(v) for k, v in saved["shapes"].items()}

    def save(result, folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "map.json"), "w") as f:
            json.dump({"names": result[0], "shapes": result[1]}, f)

    return _converted(path, f"weights_map-{digest}", "map.json", load_saved, convert, save)


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
    buf = open_map(path)
    try:
        header = parse_header(buf, path)
        for info in header.tensors:
            out = _dequantize(buf, info, path)
            # F32 comes back as a read-only view of the map: copy so it outlives the map
            yield info, (out if out.flags.writeable else out.copy())
    finally:
        close_map(buf)


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
