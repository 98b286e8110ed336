"""The `transformers` baseline of `bench throughput --backend hf`.

`generate` runs the same requests (same prompt token ids, same output lengths) in static
batches, in order, of the largest batch size that fits: it starts at `max_batch_size` (all
requests by default) and halves on a CUDA out-of-memory error, retrying that batch. Prompts
are left-padded; every batch generates exactly the longest output length of its requests
(min_new_tokens = max_new_tokens, so EOS never stops it early). The time is the sum of the
successful batches' wall times. Counted output tokens are each request's own output length
(what pagoda generates for it); the padding work HF does beyond that is reported apart.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pagoda.benchmarks.datasets import SampleRequest

logger = logging.getLogger(__name__)


@dataclass
class HFRunResult:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    generated_tokens_with_padding: int
    batch_size: int
    oom_retries: int = 0
    per_request_output_tokens: list[int] = field(default_factory=list)


def load_hf_model(model_path: str, hf_config: Any, dtype: torch.dtype,
                  device: torch.device, dummy: bool):
    """Real weights from a folder or a GGUF file, or random weights of the config's shape
    (dummy, or a folder without weights)."""
    from transformers import AutoModelForCausalLM
    if not dummy and model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
            return model.to(device).eval()
        except (ImportError, ValueError) as exc:  # transformers needs accelerate for GGUF
            logger.warning("hf backend: cannot load %s (%s); random weights of the same "
                           "shape instead (the timing is the same)", model_path, exc)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(model_path)) \
        if os.path.isdir(model_path) else False
    if dummy or not has_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    return model.eval()


def _pad_left(prompts: list[list[int]], pad_id: int, device: torch.device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _generate_batch(model, batch: list[SampleRequest], pad_id: int,
                    device: torch.device) -> tuple[int, float]:
    """Returns (new tokens per row, seconds)."""
    ids, mask = _pad_left([r.prompt_token_ids for r in batch], pad_id, device)
    max_new = max(r.expected_output_len for r in batch)
    temperature = batch[0].temperature
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) \
        if temperature > 0 else dict(do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=pad_id, use_cache=True,
                             **sampling)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.shape[1] - ids.shape[1], time.perf_counter() - start


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_hf(model, requests: list[SampleRequest], device: torch.device,
           max_batch_size: Optional[int] = None) -> HFRunResult:
    pad_id = model.config.pad_token_id
    if pad_id is None:
        eos = model.config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) or 0
    batch_size = max(1, min(max_batch_size or len(requests), len(requests)))
    elapsed, padded, retries, i = 0.0, 0, 0, 0
    counts: list[int] = []
    while i < len(requests):
        batch = requests[i:i + batch_size]
        try:
            new_tokens, seconds = _generate_batch(model, batch, pad_id, device)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc) or batch_size == 1:
                raise
            batch_size //= 2
            retries += 1
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        elapsed += seconds
        padded += new_tokens * len(batch)
        counts += [min(new_tokens, r.expected_output_len) for r in batch]
        i += len(batch)
    return HFRunResult(elapsed, len(requests), sum(r.prompt_len for r in requests),
                       sum(counts), padded, batch_size, retries, counts)


def free_model(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
