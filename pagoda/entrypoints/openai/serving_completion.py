"""POST /v1/completions."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional

from fastapi import Request

from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import (CompletionChoice, CompletionRequest,
                                                CompletionResponse, UsageInfo,
                                                random_id)
from pagoda.entrypoints.openai.serving import (MAX_PROMPTS_PER_REQUEST,
                                               MAX_SEQUENCES_PER_REQUEST, OpenAIServing,
                                               SSEResponse, final_outputs, merge_streams,
                                               run_unless_disconnected, safe_logprob, sse,
                                               sse_error, top_entries, usage_of)
from pagoda.outputs import CompletionOutput, RequestOutput


class ServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, raw: Request):
        model = self.check_model(body.model)
        if body.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise OpenAIError("best_of must equal n (beam-style best_of is not supported)",
                              param="best_of")
        prompts = await self._prompts(body)
        params = []
        for prompt in prompts:
            max_tokens = self.max_tokens_for(len(prompt["prompt_token_ids"]), body.max_tokens,
                                             body.truncate_prompt_tokens)
            echo_lps = body.logprobs if body.echo and body.logprobs is not None else None
            try:
                params.append(body.to_sampling_params(max_tokens, body.logprobs, echo_lps))
            except ValueError as exc:
                raise OpenAIError(str(exc)) from None
        request_id = random_id("cmpl")
        streams = self.add_requests(request_id, prompts, params)
        ctx = (request_id, model, int(time.time()), body)
        if body.stream:
            return SSEResponse(self._stream(streams, ctx), streams)
        return await run_unless_disconnected(raw, self._full(streams, ctx), streams)

    async def _prompts(self, body: CompletionRequest) -> list[dict]:
        """Normalizes the four prompt shapes to token ids (+ text when given as text)."""
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if len(prompt) > MAX_PROMPTS_PER_REQUEST:
            raise OpenAIError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request",
                              param="prompt")
        if len(prompt) * body.n > MAX_SEQUENCES_PER_REQUEST:
            raise OpenAIError(f"prompts x n must be at most {MAX_SEQUENCES_PER_REQUEST}",
                              param="n")
        result = []
        for item in prompt:
            if isinstance(item, str):
                ids = await self.encode(item, body.add_special_tokens)
                result.append({"prompt_token_ids": ids, "prompt": item})
            else:
                result.append({"prompt_token_ids": list(item), "prompt": self._decode(item)})
        return result

    def _decode(self, ids: list[int]) -> Optional[str]:
        if self.tokenizer is None:
            return None
        vocab = self.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            return None  # the input processor reports the bad id
        return self.tokenizer.decode(ids)

    async def _full(self, streams, ctx) -> CompletionResponse:
        request_id, model, created, body = ctx
        outputs = await final_outputs(streams)
        choices = []
        for i, output in enumerate(outputs):
            for comp in output.outputs:
                choices.append(self._choice(i * body.n + comp.index, output, comp, body,
                                            echo=body.echo))
        return CompletionResponse(id=request_id, created=created, model=model,
                                  choices=choices, usage=usage_of(outputs))

    def _choice(self, index: int, output: RequestOutput, comp: CompletionOutput,
                body: CompletionRequest, echo: bool) -> CompletionChoice:
        text = (output.prompt or "") + comp.text if echo else comp.text
        logprobs = None
        if body.logprobs is not None:
            logprobs = self._logprobs(output, comp, body.logprobs, echo)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason)

    def _logprobs(self, output: RequestOutput, comp: CompletionOutput, k: int,
                  echo: bool) -> dict:
        ids, entries = list(comp.token_ids), list(comp.logprobs or [])
        if echo:
            ids = list(output.prompt_token_ids) + ids
            entries = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids)
                           ) + entries
        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for token_id, entry in zip(ids, entries):
            token = self.decode_token(token_id)
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            chosen = entry.get(token_id)
            token_lps.append(safe_logprob(chosen.logprob) if chosen else None)
            # The sampled token plus the top k (as OpenAI and vLLM report them).
            top = {token: safe_logprob(chosen.logprob)} if chosen else {}
            for tid, lp in top_entries(entry):
                if lp.rank is not None and lp.rank <= k:
                    top.setdefault(lp.decoded_token if lp.decoded_token is not None
                                   else self.decode_token(tid), safe_logprob(lp.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    async def _stream(self, streams, ctx) -> AsyncIterator[str]:
        request_id, model, created, body = ctx
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and bool(body.stream_options.continuous_usage_stats)
        echoed: set[int] = set()
        prompt_tokens = [0] * len(streams)
        completion_tokens: dict[int, int] = {}
        try:
            async for i, output in merge_streams(streams):
                prompt_tokens[i] = len(output.prompt_token_ids)
                for comp in output.outputs:
                    index = i * body.n + comp.index
                    completion_tokens[index] = completion_tokens.get(index, 0) + len(
                        comp.token_ids)
                    echo = body.echo and index not in echoed
                    echoed.add(index)
                    if not (comp.text or comp.token_ids or comp.finish_reason or echo):
                        continue
                    chunk = CompletionResponse(id=request_id, created=created, model=model,
                                               choices=[self._choice(index, output, comp,
                                                                     body, echo)])
                    if continuous:
                        chunk.usage = _usage(prompt_tokens, completion_tokens)
                    yield sse(chunk.model_dump_json())
            if include_usage:
                final = CompletionResponse(id=request_id, created=created, model=model,
                                           choices=[], usage=_usage(prompt_tokens,
                                                                    completion_tokens))
                yield sse(final.model_dump_json())
        except Exception as exc:  # headers are gone already: report in-band
            yield sse_error(exc)
        yield sse("[DONE]")


def _usage(prompt_tokens: list[int], completion_tokens: dict[int, int]) -> UsageInfo:
    prompt, completion = sum(prompt_tokens), sum(completion_tokens.values())
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)
