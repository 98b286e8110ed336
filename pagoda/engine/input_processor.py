"""Front-end request validation and tokenization -> EngineCoreRequest.

Everything that can be wrong with a request is found here, before the engine core sees it
or any cache is touched, and reported as a ValueError."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

from pagoda.config import ModelConfig
from pagoda.engine.messages import EngineCoreRequest
from pagoda.engine.tokenizer import generation_eos_ids
from pagoda.sampling_params import SamplingParams

PromptType = Union[str, dict]


def kept_prompt_tokens(truncate_prompt_tokens: Optional[int], max_model_len: int
                       ) -> Optional[int]:
    """How many of the last prompt tokens truncate_prompt_tokens keeps: -1 keeps as many as
    leave room for one generated token; None keeps the whole prompt."""
    if truncate_prompt_tokens == -1:
        return max_model_len - 1
    return truncate_prompt_tokens


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Optional[Any]):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = getattr(model_config.hf_config, "eos_token_id", None)
            if isinstance(self.eos_token_id, list):
                self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.extra_eos_ids = generation_eos_ids(model_config)

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: Optional[float] = None) -> tuple[EngineCoreRequest, Optional[str]]:
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        prompt_text, token_ids = self._tokenize(prompt)
        token_ids = self._truncate(token_ids, params.truncate_prompt_tokens)
        self._validate(token_ids, params)
        params = params.clone()
        if params.bad_words:
            params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        if not params.ignore_eos:
            # min_tokens bans every id in this set, the model's own eos included
            params.all_stop_token_ids |= self.extra_eos_ids
            if self.eos_token_id is not None:
                params.all_stop_token_ids.add(self.eos_token_id)
        req = EngineCoreRequest(request_id, token_ids, params, self.eos_token_id,
                                arrival_time or time.time(),
                                prompt.get("cache_salt") if isinstance(prompt, dict) else None)
        return req, prompt_text

    def _tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer "
                                 "(skip_tokenizer_init=True was given)")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        raise ValueError("prompt must be a string or a dict with 'prompt_token_ids' or 'prompt'")

    def _truncate(self, token_ids: list[int], keep: Optional[int]) -> list[int]:
        """Left truncation, as vLLM's truncate_prompt_tokens."""
        keep = kept_prompt_tokens(keep, self.model_config.max_model_len)
        return token_ids if keep is None else token_ids[-keep:]

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as it tokenizes at the start of a text and after a space. The spaced
        form counts only when it is a different first token of the same length (tokenizers
        that split the space off on its own would otherwise ban a lone space)."""
        if self.tokenizer is None:
            raise ValueError("bad_words: needs a tokenizer (skip_tokenizer_init=True was given)")
        sequences: list[list[int]] = []
        for word in words:
            bare = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in (bare, spaced):
                if ids and ids not in sequences and (
                        ids is bare or (len(ids) == len(bare) and ids[0] != bare[0])):
                    sequences.append(ids)
        return sequences

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long; with max_model_len="
                             f"{max_len} it leaves no room to generate (the prompt must be "
                             f"shorter than {max_len} tokens)")
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is out of the vocabulary (size {vocab})")
        params.verify_for_model(vocab, self.model_config.max_logprobs)
