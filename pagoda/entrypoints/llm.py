"""`LLM`: offline batched generation, shaped like vLLM's."""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from pagoda.config import EngineArgs
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.input_processor import PromptType
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

Prompts = Union[PromptType, Sequence[PromptType]]


class LLM:
    def __init__(self, model: Optional[str] = None, **kwargs: Any):
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        if model is None:
            from pagoda.model_loader.default_model import default_model_path
            model = default_model_path()
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(self, prompts: Prompts, sampling_params: Union[SamplingParams,
                 Sequence[SamplingParams], None] = None, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        """Returns one RequestOutput per prompt, in input order. Every prompt is validated
        before any is submitted, so a bad one raises ValueError and runs nothing."""
        prompt_list = _as_list(prompts)
        params_list = self._params_for(prompt_list, sampling_params)
        processed = [self.engine.input_processor.process(str(next(self._counter)), prompt,
                                                         params)
                     for prompt, params in zip(prompt_list, params_list)]
        for req, prompt_text in processed:
            self.engine.submit(req, prompt_text)
        return self._run([req.request_id for req, _ in processed], use_tqdm)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                add_generation_prompt=add_generation_prompt,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _params_for(self, prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling params for "
                                 f"{len(prompts)} prompts")
        final = []
        for params in params_list:
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            final.append(params)
        return final

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        num_generated = 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        num_generated += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        rate = num_generated / max(bar.format_dict["elapsed"], 1e-6)
                        bar.set_postfix_str(f"output: {rate:.1f} tok/s", refresh=False)
        except BaseException:
            self.engine.abort_request([r for r in request_ids if r not in results])
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]


def _as_list(prompts: Prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: at least one prompt is needed")
    return prompts
