"""Builds the model from the registry and fills its weights: safetensors (sharded,
memory-mapped), PyTorch .bin, GGUF, or random "dummy" weights of the real shapes."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Optional

import torch
from torch import nn

from pagoda.config import ModelConfig
from pagoda.layers.fused_decode import fold_norm_weights
from pagoda.models.registry import resolve_model_class

WeightIter = Iterator[tuple[str, torch.Tensor]]


def get_model(model_config: ModelConfig, device: torch.device) -> nn.Module:
    cls = resolve_model_class(model_config.architecture)
    text_config = model_config.text_config()
    max_position = max(model_config.max_model_len,
                       getattr(text_config, "max_position_embeddings", 0) or 0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device):
            model = cls(text_config, max_position)
    finally:
        torch.set_default_dtype(previous)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        stream = WeightStream(model_config)
        try:
            model.load_weights(stream)
        except ValueError as exc:
            if stream.current_file is None or stream.current_file in str(exc):
                raise
            raise ValueError(f"{stream.current_file}: {exc}") from exc
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    fold_norm_weights(model)  # for the fused decode layer, where it applies
    return model.eval()


class WeightStream:
    """(name, tensor) pairs of a checkpoint; remembers the file the last tensor came from,
    so an error raised while loading it can name the file as well as the tensor."""

    def __init__(self, model_config: ModelConfig):
        self.sources = _weight_sources(model_config)
        self.current_file: Optional[str] = None

    def __iter__(self) -> WeightIter:
        for path, name, tensor in self.sources:
            self.current_file = path
            yield name, tensor


def _weight_sources(model_config: ModelConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    fmt = model_config.load_format
    if fmt == "gguf":
        from pagoda.model_loader.gguf_loader import iterate_gguf_weights
        path = model_config.gguf_file
        return ((path, name, tensor) for name, tensor in iterate_gguf_weights(path))
    folder = model_config.model
    if fmt in ("auto", "safetensors"):
        files = _safetensors_files(folder)
        if files:
            return _iterate_safetensors(files)
        if fmt == "safetensors":
            raise ValueError(f"load_format=safetensors: no *.safetensors files in {folder}")
    files = sorted(glob.glob(os.path.join(folder, "*.bin")))
    files = [f for f in files if not os.path.basename(f).startswith("training_args")]
    if not files:
        raise ValueError(f"no weights (*.safetensors or *.bin) found in {folder}")
    return _iterate_bin(files)


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(folder, name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index} names shard {os.path.basename(missing[0])}, "
                             f"which is missing")
        return files
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def _iterate_safetensors(files: list[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    from safetensors import safe_open
    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        with handle:
            for name in handle.keys():
                yield path, name, handle.get_tensor(name)


def _iterate_bin(files: list[str]) -> Iterator[tuple[str, str, torch.Tensor]]:
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        for name, tensor in state.items():
            yield path, name, tensor
        del state


def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3,
                       high: float = 1e-3) -> None:
    """Random weights of the real shapes, for benchmarks; norms stay at one. Drawn on the
    parameters' own device, so an 8B model initialises in seconds on a GPU."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:
            param.data.fill_(1.0)
            continue
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        param.data.uniform_(low, high, generator=generators[device])
