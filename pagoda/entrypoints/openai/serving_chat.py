"""POST /v1/chat/completions: messages -> the model's chat template (or --chat-template)."""

from __future__ import annotations

import time
from typing import AsyncIterator, Optional

from fastapi import Request

from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import (ChatChoice, ChatCompletionRequest,
                                                ChatCompletionResponse, ChatMessage,
                                                UsageInfo, random_id)
from pagoda.entrypoints.openai.serving import (MIN_LOGPROB, OpenAIServing, SSEResponse, final_outputs,
                                               run_unless_disconnected, safe_logprob, sse,
                                               sse_error, top_entries, usage_of)
from pagoda.outputs import CompletionOutput


class ServingChat(OpenAIServing):
    def __init__(self, engine, served_model_names: list[str],
                 chat_template: Optional[str] = None):
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template

    async def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                     continue_final_message: bool = False) -> tuple[str, list[int]]:
        """Returns (prompt text, token ids). Template failures are the request's fault."""
        tokenizer = self.require_tokenizer()
        conversation = [{"role": m.role, "content": m.text(),
                         **({"name": m.name} if m.name else {})} for m in messages]
        if continue_final_message:
            if conversation[-1]["role"] != "assistant":
                raise OpenAIError("continue_final_message needs a final assistant message",
                                  param="messages")
            add_generation_prompt = False
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise OpenAIError("the model has no chat template; start the server with "
                              "--chat-template", param="messages")
        try:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except Exception as exc:  # jinja raises anything; e.g. templates that reject roles
            raise OpenAIError(f"cannot apply the chat template: {exc}",
                              param="messages") from None
        return text, await self.encode(text, add_special_tokens=False)

    async def create(self, body: ChatCompletionRequest, raw: Request):
        model = self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        text, ids = await self.render(body.messages, body.add_generation_prompt,
                                body.continue_final_message)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = self.max_tokens_for(len(ids), requested, body.truncate_prompt_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        try:
            params = body.to_sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            raise OpenAIError(str(exc)) from None
        request_id = random_id("chatcmpl")
        streams = self.add_requests(request_id, [{"prompt_token_ids": ids, "prompt": text}],
                                    [params])
        ctx = (request_id, model, int(time.time()), body)
        if body.stream:
            return SSEResponse(self._stream(streams[0], ctx), streams)
        return await run_unless_disconnected(raw, self._full(streams, ctx), streams)

    async def _full(self, streams, ctx) -> ChatCompletionResponse:
        request_id, model, created, body = ctx
        (output,) = await final_outputs(streams)
        choices = [ChatChoice(index=c.index,
                              message={"role": "assistant", "content": c.text},
                              logprobs=self._logprobs(c, body), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in output.outputs]
        return ChatCompletionResponse(id=request_id, created=created, model=model,
                                      choices=choices, usage=usage_of([output]))

    def _logprobs(self, comp: CompletionOutput, body: ChatCompletionRequest) -> Optional[dict]:
        if not body.logprobs:
            return None
        content = []
        for token_id, entry in zip(comp.token_ids, comp.logprobs or []):
            chosen = entry.get(token_id)
            token = chosen.decoded_token if chosen and chosen.decoded_token is not None \
                else self.decode_token(token_id)
            tops = [_token_logprob(lp.decoded_token if lp.decoded_token is not None
                                   else self.decode_token(tid), lp.logprob)
                    for tid, lp in top_entries(entry)
                    if lp.rank is not None and lp.rank <= (body.top_logprobs or 0)]
            content.append({**_token_logprob(token, chosen.logprob if chosen else MIN_LOGPROB),
                            "top_logprobs": tops[:body.top_logprobs or 0]})
        return {"content": content}

    async def _stream(self, stream, ctx) -> AsyncIterator[str]:
        request_id, model, created, body = ctx
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and bool(body.stream_options.continuous_usage_stats)
        started: set[int] = set()
        prompt_tokens, completion_tokens = 0, {}

        def chunk(choice: ChatChoice) -> str:
            resp = ChatCompletionResponse(id=request_id, object="chat.completion.chunk",
                                          created=created, model=model, choices=[choice])
            if continuous:
                resp.usage = _usage(prompt_tokens, completion_tokens)
            return sse(resp.model_dump_json(exclude={"choices": {0: {"message"}}}))

        try:
            async for output in stream:
                prompt_tokens = len(output.prompt_token_ids)
                for c in output.outputs:
                    completion_tokens[c.index] = completion_tokens.get(c.index, 0) + len(
                        c.token_ids)
                    if c.index not in started:  # OpenAI opens each choice with the role
                        started.add(c.index)
                        yield chunk(ChatChoice(index=c.index,
                                               delta={"role": "assistant", "content": ""}))
                    if c.text or c.finish_reason or c.token_ids:
                        yield chunk(ChatChoice(
                            index=c.index, delta={"content": c.text} if c.text else {},
                            logprobs=self._logprobs(c, body), finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason))
            if include_usage:
                resp = ChatCompletionResponse(id=request_id, object="chat.completion.chunk",
                                              created=created, model=model, choices=[],
                                              usage=_usage(prompt_tokens, completion_tokens))
                yield sse(resp.model_dump_json())
        except Exception as exc:  # headers are gone already: report in-band
            yield sse_error(exc)
        yield sse("[DONE]")



def _token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": safe_logprob(logprob),
            "bytes": list(token.encode("utf-8", errors="replace"))}


def _usage(prompt_tokens: int, completion_tokens: dict[int, int]) -> UsageInfo:
    completion = sum(completion_tokens.values())
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                     total_tokens=prompt_tokens + completion)
