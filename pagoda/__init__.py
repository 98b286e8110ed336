"""Pagoda: a fast, memory-efficient LLM inference and serving engine."""

from pagoda.config import EngineArgs
from pagoda.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "RequestOutputKind", "__version__"]


def __getattr__(name: str):
    # Heavy pieces import lazily so `import pagoda` stays cheap.
    if name == "LLM":
        from pagoda.entrypoints.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from pagoda.engine.async_llm import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)
