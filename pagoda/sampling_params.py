"""SamplingParams with vLLM's fields, defaults and validation (checked at construction)."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Optional, Union

_SAMPLING_EPS = 1e-5
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_BAD_WORDS = 128


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output when the request finishes


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Words the output must not contain: the token that would complete one is banned.
    bad_words: Optional[list[str]] = None
    # Keep only the last k prompt tokens (-1: as many as max_model_len leaves room for).
    truncate_prompt_tokens: Optional[int] = None
    # Filled in by the engine: ids that end the request (eos + generation_config's eos ids).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled in by the engine: the token sequences of bad_words (with and without a space).
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._verify()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the other knobs cannot change the argmax, so reset them as vLLM does.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        # Kept on a round trip through msgpack, where __post_init__ runs again.
        self.all_stop_token_ids = set(self.all_stop_token_ids) | set(self.stop_token_ids)

    def _verify(self) -> None:
        _require(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n",
                 f"must be an integer in [1, {MAX_N}], got {self.n}")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
                 f"must be in [-2, 2], got {self.presence_penalty}")
        _require(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
                 f"must be in [-2, 2], got {self.frequency_penalty}")
        _require(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
                 f"must be in (0, 2], got {self.repetition_penalty}")
        _require(self.temperature >= 0.0, "temperature",
                 f"must be non-negative, got {self.temperature}")
        _require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
                 f"must be 0, -1 (disable) or at least 1, got {self.top_k}")
        _require(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
                 f"must be at least 1, got {self.max_tokens}")
        _require(self.min_tokens >= 0, "min_tokens",
                 f"must be greater than or equal to 0, got {self.min_tokens}")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be less than or equal to max_tokens={self.max_tokens}, "
                 f"got {self.min_tokens}")
        _require(self.logprobs is None or self.logprobs >= 0, "logprobs",
                 f"must be non-negative, got {self.logprobs}")
        _require(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
                 f"must be non-negative, got {self.prompt_logprobs}")
        _require(len(self.stop) <= MAX_STOP_STRINGS, "stop",
                 f"at most {MAX_STOP_STRINGS} stop strings")
        _require(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS
                     for s in self.stop), "stop",
                 f"stop strings must be non-empty and at most {MAX_STOP_STRING_CHARS} chars")
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                 "stop_token_ids", "must be non-negative integers")
        _require(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        if self.stop and not self.detokenize:
            raise ValueError("stop: stop strings need detokenize=True")
        if self.logit_bias:
            _require(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                     "logit_bias", "values must be in [-100, 100]")
        if self.allowed_token_ids is not None:
            _require(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty")
        if self.bad_words is not None:
            _require(isinstance(self.bad_words, list) and len(self.bad_words) <= MAX_BAD_WORDS,
                     "bad_words", f"must be a list of at most {MAX_BAD_WORDS} strings")
            _require(all(isinstance(w, str) and 0 < len(w.strip()) <= MAX_STOP_STRING_CHARS
                         for w in self.bad_words), "bad_words",
                     f"entries must be non-blank and at most {MAX_STOP_STRING_CHARS} chars")
        _require(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
                 or (isinstance(self.truncate_prompt_tokens, int)
                     and self.truncate_prompt_tokens >= 1), "truncate_prompt_tokens",
                 f"must be -1 or at least 1, got {self.truncate_prompt_tokens}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    def verify_for_model(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the model (called by the input processor)."""
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None and value > max_logprobs:
                raise ValueError(f"{name}: requested {value}, the maximum is {max_logprobs}")
        bad = [t for t in (self.logit_bias or {}) if not 0 <= t < vocab_size]
        bad += [t for t in self.stop_token_ids if t >= vocab_size]
        bad += [t for t in (self.allowed_token_ids or []) if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of the vocabulary (size {vocab_size})")

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


def _require(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name} {message}")
