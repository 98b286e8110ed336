"""Physical limits: measured ceilings and the roofline time of a workload (PERF.md).

- Ceilings, measured in the same call as the benchmark: device-to-device copy bandwidth
  (bytes read + written) and an 8192^3 bf16 matmul rate (smaller fp32 shapes on the CPU).
- A step's floor is max(bytes / bandwidth, FLOPs / matmul rate): bytes = weights read
  (embedding table excluded; with tied embeddings the LM head reads it) + KV read + KV
  written; FLOPs = 2 x parameters x tokens (+ LM head per sampled token + attention).
  A workload's roofline time is the sum over the engine's recorded steps.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import torch

from pagoda.benchmarks.recorder import StepRecord

_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass
class Ceilings:
    bandwidth_gbps: float      # GB/s (1e9 bytes)
    matmul_tflops: float       # TFLOP/s (1e12)
    device: str = ""
    matmul_dtype: str = "bfloat16"

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, iters: int, reps: int) -> float:
    """Best over `reps` of the mean time of `iters` calls (seconds)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def measure_ceilings(device: str = "cuda", copy_bytes: Optional[int] = None,
                     matmul_n: Optional[int] = None) -> Ceilings:
    """Copy bandwidth and matmul rate of `device` (1 GiB copies and 8192^3 bf16 on CUDA;
    64 MiB and 1024^3 fp32 on the CPU unless sizes are given)."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    nbytes = copy_bytes or ((1 << 30) if on_gpu else (64 << 20))
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), dev, iters=10 if on_gpu else 3, reps=5)
    del src, dst
    n = matmul_n or (8192 if on_gpu else 1024)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    mm_s = _best_time(lambda: torch.mm(a, b), dev, iters=20 if on_gpu else 2, reps=5)
    name = torch.cuda.get_device_name(dev) if on_gpu else "cpu"
    return Ceilings(bandwidth_gbps=2 * nbytes / copy_s / 1e9,
                    matmul_tflops=2 * n ** 3 / mm_s / 1e12, device=name,
                    matmul_dtype=str(dtype).replace("torch.", ""))


@dataclass
class ModelShape:
    """What the roofline needs to know about a model, counted from its config."""

    body_params: int          # everything but the embedding table, LM head and experts
    expert_params: int        # all routed experts together (0 for dense models)
    lm_head_params: int
    embed_params: int
    tied_embeddings: bool
    num_experts: int
    experts_per_tok: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a decode step may read (embedding lookup excluded)."""
        return (self.body_params + self.expert_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def model_shape(hf_config: Any, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """Counts parameters by building the transformers model on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else embed
    tied = head_w is embed
    seen, body, experts = set(), 0, 0
    for name, param in model.named_parameters():
        if id(param) in seen or param is embed or param is head_w:
            continue
        seen.add(id(param))
        if ".experts." in name:
            experts += param.numel()
        else:
            body += param.numel()
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = text.num_attention_heads
    return ModelShape(
        body_params=body, expert_params=experts, lm_head_params=head_w.numel(),
        embed_params=embed.numel(), tied_embeddings=tied,
        num_experts=getattr(text, "num_local_experts", None)
        or getattr(text, "num_experts", None) or 0,
        experts_per_tok=getattr(text, "num_experts_per_tok", None) or 0,
        num_layers=text.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        dtype_bytes=_DTYPE_BYTES.get(dtype, 2))


def load_config_json(path: str) -> Any:
    from transformers import AutoConfig
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    with open(path) as f:
        raw = json.load(f)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def step_floor(step: StepRecord, shape: ModelShape, ceilings: Ceilings) -> float:
    """Seconds: the larger of the memory time and the compute time of one step."""
    expert_fraction = 0.0
    if shape.num_experts:
        k_over_e = shape.experts_per_tok / shape.num_experts
        expert_fraction = 1.0 - (1.0 - k_over_e) ** step.num_tokens  # distinct experts hit
    weight_bytes = (shape.body_params + shape.lm_head_params
                    + shape.expert_params * expert_fraction) * shape.dtype_bytes
    kv_bytes = (step.context_tokens + step.num_tokens) * shape.kv_bytes_per_token
    per_token_params = shape.body_params + (
        shape.expert_params * shape.experts_per_tok / shape.num_experts
        if shape.num_experts else 0)
    flops = (2 * per_token_params * step.num_tokens
             + 2 * shape.lm_head_params * step.num_sampled
             + 4 * shape.num_layers * shape.num_heads * shape.head_dim * step.attn_pairs)
    return max((weight_bytes + kv_bytes) / (ceilings.bandwidth_gbps * 1e9),
               flops / (ceilings.matmul_tflops * 1e12))


def workload_floor(steps: Iterable[StepRecord], shape: ModelShape,
                   ceilings: Ceilings) -> float:
    return sum(step_floor(step, shape, ceilings) for step in steps)


def decode_floor_ms(shape: ModelShape, ceilings: Ceilings, batch: int = 1,
                    context: int = 0) -> float:
    """PERF.md's decode step floor for `batch` sequences of `context` tokens, in ms."""
    step = StepRecord(num_reqs=batch, num_tokens=batch, generated_tokens=batch,
                      context_tokens=batch * context, attn_pairs=batch * (context + 1),
                      num_sampled=batch)
    return 1000.0 * step_floor(step, shape, ceilings)


def roofline_summary(steps: list[StepRecord], shape: ModelShape, ceilings: Ceilings,
                     measured_s: float) -> dict:
    floor = workload_floor(steps, shape, ceilings)
    return {"ceilings": ceilings.to_dict(), "weight_bytes": shape.weight_bytes,
            "roofline_time_s": floor, "measured_time_s": measured_s,
            "roofline_efficiency": floor / measured_s if measured_s > 0 else 0.0}
