"""Test fixtures: a small byte-level BPE tokenizer trained here and tiny random checkpoints
made with `transformers` (no model hub needed)."""

from __future__ import annotations

import os
from typing import Any

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little engine that could.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Unicode: café, naïve, 日本語, emoji 🙂🚀 and more.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(path: str, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>",
                "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|bos|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _strengthen(model: torch.nn.Module, std: float, seed: int) -> None:
    """Default init gives flat, tie-ridden logits; larger weights make greedy decisive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                if "norm" in name or "ln" in name:
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "embed" in name or "wte" in name or "wpe" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator)
                            / (param.shape[-1] ** 0.5) * 4)


def make_model(path: str, config: Any, seed: int = 0, std: float = 0.3,
               safe_serialization: bool = True, tokenizer: bool = True):
    """Saves a random model of `config` (a transformers config) plus a tokenizer to `path`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _strengthen(model, std, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    if tokenizer:
        make_tokenizer(path, vocab_size=config.vocab_size)
    return model


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    base = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0,
                architectures=["LlamaForCausalLM"])
    base.update(overrides)
    return LlamaConfig(**base)
