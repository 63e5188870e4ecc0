"""OpenAI-compatible request and response bodies.

Requests are validated strictly (no "5" for 5, no 1 for true), like OpenAI's own API. Parameters
this server does not implement are accepted only with their neutral value, so a client that relies
on them gets a clear 400 instead of a silently different answer. Unknown fields are ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: ModelName
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    # Extension (as in vLLM): keep generating after EOS, for benchmarks and load tests.
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        if self.n not in (None, 1):
            raise ValueError("n: only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty: only 0 is supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)
        ]
    )
    echo: Literal[False] | None = None
    # The chosen tokens' log-probabilities and this many alternatives per position (OpenAI's
    # legacy completions allow up to 5); not with stream.
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _logprobs_not_streamed(self) -> CompletionRequest:
        if self.logprobs is not None and self.stream:
            raise ValueError("logprobs: not supported with stream")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """Every prompt of the request, as texts or as token id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return [str(p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[int(t) for t in prompt if isinstance(t, int)]]
        return [list(p) for p in prompt if isinstance(p, list)]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdminReloadRequest(_Request):
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]


WEDGE_MAX_SECONDS = 3600.0
# A profile's trace grows with every operator recorded (tens of MB for a few hundred passes).
PROFILE_MAX_PASSES = 10_000
PROFILE_MAX_SECONDS = 300.0


# POST /admin/fault/wedge-engine, only with --fault-injection (see metalserve.api.admin).
class WedgeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    seconds: float = Field(gt=0, le=WEDGE_MAX_SECONDS)


class ProfileRequest(BaseModel):
    """``POST /admin/profile``: the engine's next ``passes`` forward passes, ending
    ``max_seconds`` after the request at the latest."""

    model_config = ConfigDict(strict=True, extra="forbid")

    passes: int = Field(100, ge=1, le=PROFILE_MAX_PASSES)
    max_seconds: float = Field(30.0, gt=0, le=PROFILE_MAX_SECONDS)
    # Every Python call too: where the host's time between operators goes; every thread's
    # calls are traced, so the whole replica slows by up to hundreds of times meanwhile.
    python: bool = False


# --- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: per generated token, its text, its log-probability,
    the most likely tokens of its position with theirs, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends {"content": "..."} and a final {}: no null fields in deltas.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "metalserve"
    version_id: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
