"""Tokenizer loading (transformers) and the stop ids a model's generation config adds."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from pagoda.config import ModelConfig


def get_tokenizer(model_config: ModelConfig) -> Optional[Any]:
    if model_config.skip_tokenizer_init:
        return None
    if model_config.gguf_file and model_config.tokenizer == model_config.model:
        from pagoda.model_loader.gguf_loader import load_gguf_tokenizer
        return load_gguf_tokenizer(model_config.gguf_file)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_config.tokenizer)
    except Exception as exc:  # transformers raises many types for a missing tokenizer
        raise ValueError(f"tokenizer: cannot load a tokenizer from {model_config.tokenizer!r}"
                         f" ({exc}); pass skip_tokenizer_init=True to use token ids only")


def generation_eos_ids(model_config: ModelConfig) -> set[int]:
    """eos ids from generation_config.json (Llama 3 lists several)."""
    ids = getattr(model_config.hf_config, "eos_token_id", None)
    path = os.path.join(model_config.model, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            ids = json.load(f).get("eos_token_id", ids)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list) else {int(ids)}
