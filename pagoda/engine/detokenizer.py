"""Incremental detokenization and stop strings.

Fast tokenizers use `tokenizers`' DecodeStream, which holds back a token until its bytes
make whole UTF-8 characters (so a character split across tokens never shows up half-way).
The stream is primed with the end of the prompt, so a first token like "▁Hello" decodes to
" Hello" as it would in the middle of text. Slow tokenizers fall back to decoding the whole
output and emitting the new, complete part."""

from __future__ import annotations

from typing import Any, Optional

from pagoda.sampling_params import SamplingParams

_PRIME_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special = params.skip_special_tokens
        self.output_ids: list[int] = []
        self.num_emitted_ids = 0  # output ids whose text has been emitted
        self.text = ""
        backend = getattr(tokenizer, "_tokenizer", None)
        self.stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream
            self.backend = backend
            self.stream = DecodeStream(skip_special_tokens=self.skip_special)
            for token_id in prompt_token_ids[-_PRIME_TOKENS:]:
                self.stream.step(backend, token_id)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends tokens, returns the text they completed."""
        self.output_ids.extend(token_ids)
        if self.stream is not None:
            new = ""
            for i, token_id in enumerate(token_ids):
                piece = self.stream.step(self.backend, token_id)
                if piece is not None:
                    new += piece
                    self.num_emitted_ids = len(self.output_ids) - len(token_ids) + i + 1
        else:
            full = self.tokenizer.decode(self.output_ids, skip_special_tokens=self.skip_special)
            full = full[:len(full) - 1] if full.endswith("\ufffd") else full
            new = full[len(self.text):] if full.startswith(self.text) else ""
            self.num_emitted_ids = len(self.output_ids) if new else self.num_emitted_ids
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of a request: text for tokens still held back because their bytes
        never completed a character (decoded with replacement characters, as a full
        decode would)."""
        pending = self.output_ids[self.num_emitted_ids:]
        self.num_emitted_ids = len(self.output_ids)
        if not pending:
            return ""
        new = self.tokenizer.decode(pending, skip_special_tokens=self.skip_special)
        self.text += new
        return new


def find_stop_string(text: str, num_new_chars: int, stops: list[str],
                     include_stop: bool) -> Optional[tuple[str, int]]:
    """Looks for a stop string that ends in the newly added text (it may start earlier, so
    stop strings spanning tokens are found). Returns (stop string, text length to keep)."""
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1:
            return stop, index + len(stop) if include_stop else index
    return None


def withheld_chars(params: SamplingParams) -> int:
    """While a stop string could still be completing, its possible prefix is not shown."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1
