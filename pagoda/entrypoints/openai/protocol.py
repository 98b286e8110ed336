"""OpenAI-compatible request and response models (pydantic), with vLLM's extra sampling
fields. Bounds live in the schema, so bad values are rejected (400) before any work and
/openapi.json tells clients (and schemathesis) what is accepted."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from pagoda.sampling_params import MAX_N, RequestOutputKind, SamplingParams

MAX_TOKENS_LIMIT = 1 << 20  # schema bound; the real bound is the model's context length
MAX_TOP_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 63) - 1


def _json_int(value):
    """JSON Schema's integer: 3 and 3.0 yes; "3", 3.5 and true no (pydantic's lax int would
    take "3" and true; its strict int would refuse 3.0)."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _json_number(value):
    if isinstance(value, (bool, str)):  # "0.5" and true are client bugs, not numbers
        raise ValueError("must be a number")
    return value


Int = Annotated[int, BeforeValidator(_json_int)]
Float = Annotated[float, BeforeValidator(_json_number)]
StopType = Optional[Union[str, list[str]]]


class OpenAIModel(BaseModel):
    # Unknown fields are ignored (as OpenAI and vLLM do); NaN / Infinity are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: Optional[StrictBool] = False
    continuous_usage_stats: Optional[StrictBool] = False


class SamplingFields(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = Field(None, max_length=1024)
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[Float] = Field(None, ge=0.0, le=100.0)
    top_p: Optional[Float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[Int] = Field(None, ge=-1, le=1 << 20)
    min_p: Optional[Float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[Float] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Optional[Float] = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: Optional[Float] = Field(None, gt=0.0, le=2.0)
    seed: Optional[Int] = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: StopType = None
    stop_token_ids: Optional[list[Int]] = Field(None, max_length=1024)
    logit_bias: Optional[dict[str, Float]] = Field(None, max_length=1024)
    ignore_eos: StrictBool = False
    min_tokens: Int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    bad_words: Optional[list[Annotated[str, Field(max_length=1024)]]] = Field(
        None, max_length=128)
    truncate_prompt_tokens: Optional[Int] = Field(None, ge=-1, le=1 << 20)
    user: Optional[str] = Field(None, max_length=256)

    def to_sampling_params(self, max_tokens: int, logprobs: Optional[int],
                           prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Raises ValueError (-> 400) for combinations the schema cannot express."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias: keys must be token ids (integers)") from None
            if any(not -100.0 <= v <= 100.0 for v in bias.values()):
                raise ValueError("logit_bias: values must be in [-100, 100]")
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0, seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias,
            bad_words=self.bad_words, truncate_prompt_tokens=self.truncate_prompt_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream
            else RequestOutputKind.FINAL_ONLY)


PromptInput = Union[str, list[str], list[Int], list[list[Int]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Optional[Int] = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: StrictBool = False
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[Int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = Field(None, max_length=1 << 16)  # only "" is supported
    add_special_tokens: StrictBool = True


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[Int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[Int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: StrictBool = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False


class TokenizeRequest(OpenAIModel):
    model: Optional[str] = Field(None, max_length=1024)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = Field(None, max_length=1024)
    tokens: list[Int]


# -- responses ---------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[int] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatChoice(BaseModel):
    index: int
    message: Optional[dict[str, Any]] = None
    delta: Optional[dict[str, Any]] = None
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Optional[UsageInfo] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
