"""The synchronous, in-process engine behind `LLM`: input processor -> engine core ->
output processor, stepped by the caller."""

from __future__ import annotations

from typing import Optional

from pagoda.config import EngineArgs, EngineConfig
from pagoda.engine.engine_core import EngineCore
from pagoda.engine.input_processor import InputProcessor, PromptType
from pagoda.engine.messages import EngineCoreRequest
from pagoda.engine.parallel_sampling import fan_out
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.tokenizer import get_tokenizer
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = get_tokenizer(config.model_config)
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        self.submit(*self.input_processor.process(request_id, prompt, params, arrival_time))

    def submit(self, req: EngineCoreRequest, prompt_text: Optional[str]) -> None:
        """Queues an already validated request (fanned out into n samples)."""
        for core_req in fan_out(req, prompt_text, self.output_processor):
            self.core.add_request(core_req)

    def abort_request(self, request_ids: list[str]) -> None:
        self.core.abort_requests(self.output_processor.abort(request_ids))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs, to_abort = self.output_processor.process_outputs(self.core.step())
        if to_abort:
            self.core.abort_requests(to_abort)
        return outputs

    def get_tokenizer(self):
        return self.tokenizer
