"""Engine configuration: `EngineArgs` (what users pass, vLLM's names) -> `EngineConfig`.

Every value is checked when `EngineArgs.create_engine_config()` runs, so a bad argument fails
before any model or cache is allocated, with a message that names the argument.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagoda import platform
from pagoda.layers.rotary import longrope_original_len

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf")
_DEVICES = ("auto", "cuda", "cpu")
_DEFAULT_CPU_KV_BYTES = 1 << 30


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


@dataclass
class ModelConfig:
    model: str
    tokenizer: str
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    seed: int
    load_format: str
    skip_tokenizer_init: bool
    gguf_file: Optional[str] = None
    served_model_name: Optional[str] = None
    max_logprobs: int = 20

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def text_config(self) -> Any:
        return getattr(self.hf_config, "text_config", None) or self.hf_config


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    num_blocks: int = 0  # filled in by the worker after profiling


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    # longrope models: a request longer than this is computed with the long rope factors, and
    # one that grows past it is recomputed from its first token (layers/rotary.py)
    rope_long_after: Optional[int] = None


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device: torch.device
    enforce_eager: bool = False


@dataclass
class EngineArgs:
    """The user-facing arguments, named and defaulted as in vLLM."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    enforce_eager: bool = False
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    device: str = "auto"
    tensor_parallel_size: int = 1
    served_model_name: Optional[str] = None
    max_logprobs: int = 20
    hf_overrides: dict = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def create_engine_config(self) -> EngineConfig:
        self._validate_scalars()
        device = platform.resolve_device(self.device)
        model_path, gguf_file = _resolve_model(self.model)
        hf_config = _load_hf_config(model_path, gguf_file, self.hf_overrides)
        _check_architecture(hf_config)
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        max_model_len = _resolve_max_model_len(self.max_model_len, hf_config)
        _check_tensor_parallel(getattr(hf_config, "text_config", None) or hf_config,
                               self.tensor_parallel_size)
        # Chunked prefill is always on, so the step budget need not cover a whole prompt.
        batched = self.max_num_batched_tokens or 8192
        _check(batched >= 1, "max_num_batched_tokens", "must be >= 1")
        load_format = "gguf" if gguf_file and self.load_format == "auto" else self.load_format
        model_config = ModelConfig(
            model=model_path, tokenizer=self.tokenizer or model_path, hf_config=hf_config,
            dtype=dtype, max_model_len=max_model_len, seed=self.seed, load_format=load_format,
            skip_tokenizer_init=self.skip_tokenizer_init, gguf_file=gguf_file,
            served_model_name=self.served_model_name, max_logprobs=self.max_logprobs)
        cache_config = CacheConfig(
            block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes
            or (_DEFAULT_CPU_KV_BYTES if device.type == "cpu" else None))
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
            max_model_len=max_model_len,
            rope_long_after=longrope_original_len(model_config.text_config(), max_model_len))
        return EngineConfig(model_config, cache_config, scheduler_config,
                            ParallelConfig(self.tensor_parallel_size), device,
                            self.enforce_eager)

    def _validate_scalars(self) -> None:
        _check(bool(self.model), "model", "a model path is required")
        _check(self.dtype in ("auto", *_DTYPES), "dtype",
               f"must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               f"must be a power of two up to 128; got {self.block_size}")
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1; got {self.max_num_seqs}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1]; got {self.gpu_memory_utilization}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               "num_gpu_blocks_override", "must be >= 1")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
               "kv_cache_memory_bytes", "must be > 0")
        _check(self.load_format in _LOAD_FORMATS, "load_format",
               f"must be one of {', '.join(_LOAD_FORMATS)}; got {self.load_format!r}")
        _check(self.device in _DEVICES, "device",
               f"must be one of {', '.join(_DEVICES)}; got {self.device!r}")
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len",
               "must be >= 1")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.max_logprobs >= 0, "max_logprobs", "must be >= 0")


def _resolve_model(model: str) -> tuple[str, Optional[str]]:
    """Returns (folder or file, gguf file or None). A .gguf path is loaded as one file."""
    if model.endswith(".gguf"):
        _check(os.path.isfile(model), "model", f"GGUF file not found: {model}")
        return model, model
    _check(os.path.isdir(model), "model",
           f"{model!r} is not a local folder (Pagoda loads Hugging Face folders from disk)")
    return model, None


def _load_hf_config(model_path: str, gguf_file: Optional[str], overrides: dict) -> Any:
    from transformers import AutoConfig
    if gguf_file:
        from pagoda.model_loader.gguf_loader import load_gguf_config
        config = load_gguf_config(gguf_file)
    else:
        config_file = os.path.join(model_path, "config.json")
        _check(os.path.isfile(config_file), "model", f"no config.json in {model_path}")
        try:
            config = AutoConfig.from_pretrained(model_path)
        except Exception as exc:  # transformers raises many types for a bad file
            raise ValueError(f"model: cannot read {config_file}: {exc}") from exc
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _check_architecture(hf_config: Any) -> None:
    from pagoda.models.registry import supported_architectures
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError("model: config.json names no architecture ('architectures' is empty)")
    if archs[0] not in supported_architectures():
        raise ValueError(f"model: architecture {archs[0]!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")


def _config_dtype(hf_config: Any) -> Optional[torch.dtype]:
    raw = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    if isinstance(raw, str):
        return _DTYPES.get(raw)
    return None


def _resolve_dtype(dtype: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    ckpt = _config_dtype(hf_config) or torch.float32
    if device.type == "cuda" and ckpt == torch.float32:
        return torch.bfloat16  # fp32 checkpoints are served in bf16 on the GPU, as in vLLM
    return ckpt


def _check_tensor_parallel(text_config: Any, tp: int) -> None:
    """Each rank takes whole attention heads; KV heads split evenly or are replicated."""
    if tp == 1:
        return
    heads = getattr(text_config, "num_attention_heads", None)
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    _check(heads is not None and heads % tp == 0, "tensor_parallel_size",
           f"{tp} does not divide the model's {heads} attention heads")
    _check(kv % tp == 0 or tp % kv == 0, "tensor_parallel_size",
           f"{tp} and the model's {kv} KV heads: one must divide the other")
    if platform.cuda_available():
        import torch.cuda
        _check(torch.cuda.device_count() >= tp, "tensor_parallel_size",
               f"{tp} ranks need {tp} GPUs; {torch.cuda.device_count()} are visible")


def _resolve_max_model_len(requested: Optional[int], hf_config: Any) -> int:
    text = getattr(hf_config, "text_config", None) or hf_config
    derived = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            derived = value
            break
    if derived is None:
        derived = 2048
    if requested is None:
        return derived
    _check(requested <= derived or _rope_extends(text), "max_model_len",
           f"{requested} is larger than the model's maximum length {derived}")
    return requested


def _rope_extends(text_config: Any) -> bool:
    scaling = getattr(text_config, "rope_scaling", None) or {}
    return bool(scaling) and scaling.get("rope_type", scaling.get("type")) not in (None, "default")
