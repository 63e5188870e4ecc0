"""The OpenAI-compatible routes: models, completions and chat completions, streamed or not."""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from metalserve.api.deps import ReplicaDep, SettingsDep
from metalserve.engine import Finished, TextDelta
from metalserve.generation import start_generation
from metalserve.loader import ModelView
from metalserve.prompts import chat_prompt, completion_prompts
from metalserve.relay import SSE_DONE, TextEvents, sse, stream_failure
from metalserve.sampling import TokenLogprob
from metalserve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

router = APIRouter()


def completion_logprobs(
    bundle: ModelView, logprobs: tuple[tuple[int, TokenLogprob], ...] | None
) -> CompletionLogprobs | None:
    """A choice's logprobs in OpenAI's completions form; offsets count from the completion's
    start (no echo)."""
    if logprobs is None:
        return None
    tokenizer = bundle.tokenizer
    texts = [tokenizer.token_text(token) for token, _ in logprobs]
    offsets = [0, *itertools.accumulate(len(t) for t in texts)][: len(texts)]
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[chosen for _, (chosen, _) in logprobs],
        top_logprobs=[
            {tokenizer.token_text(alt): value for alt, value in top} for _, (_, top) in logprobs
        ],
        text_offset=offsets,
    )


@router.get("/v1/models")
async def models(replica: ReplicaDep, settings: SettingsDep) -> ModelList:
    current = replica.engine.model
    return ModelList(
        data=[
            ModelCard(
                id=settings.model,
                created=int(current.loaded_at.timestamp()) if current else now(),
                version_id=current.version_id if current else replica.version_id,
            )
        ]
    )


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, replica: ReplicaDep, settings: SettingsDep
) -> Response | Completion:
    generation = await start_generation(
        replica,
        body,
        lambda bundle: completion_prompts(settings, bundle, body),
        body.max_tokens,
        settings.default_max_tokens,
        "completions",
    )
    bundle = generation.bundle
    completion_id, created = new_id("cmpl"), now()

    def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=completion_id,
            created=created,
            model=bundle.name,
            system_fingerprint=generation.fingerprint,
            choices=choices,
            usage=usage,
        )

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(completion(choices, usage))

    if body.stream:

        @functools.cache  # one template per choice index
        def text_events(index: int) -> TextEvents:
            return TextEvents(
                lambda text: completion(
                    [CompletionChoice(index=index, text=text, finish_reason=None)]
                )
            )

        async def stream() -> AsyncIterator[str | bytes]:
            usage = [0, 0]
            async for index, event in generation.events():
                if isinstance(event, TextDelta):
                    yield text_events(index)(event.text)
                elif isinstance(event, Finished):
                    usage[0] += event.prompt_tokens
                    usage[1] += event.completion_tokens
                    yield chunk(
                        [CompletionChoice(index=index, text="", finish_reason=event.reason)]
                    )
                else:
                    yield stream_failure(event)
                    return
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], Usage.of(*usage))
            yield SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    choices = await generation.collect(request)
    return Completion(
        id=completion_id,
        created=created,
        model=bundle.name,
        system_fingerprint=generation.fingerprint,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=completion_logprobs(bundle, c.logprobs),
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ],
        usage=Usage.of(
            sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices)
        ),
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, replica: ReplicaDep, settings: SettingsDep
) -> Response | ChatCompletion:
    generation = await start_generation(
        replica,
        body,
        lambda bundle: [chat_prompt(settings, bundle, body)],
        body.token_limit(),
        None,
        "chat",
    )
    bundle = generation.bundle
    completion_id, created = new_id("chatcmpl"), now()

    def chat_chunk(
        choice: ChatChunkChoice | None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=bundle.name,
            system_fingerprint=generation.fingerprint,
            choices=[choice] if choice else [],
            usage=usage,
        )

    def chunk(choice: ChatChunkChoice | None, usage: Usage | None = None) -> str:
        return sse(chat_chunk(choice, usage))

    if body.stream:
        content = TextEvents(
            lambda text: chat_chunk(ChatChunkChoice(index=0, delta=ChatDelta(content=text)))
        )

        async def stream() -> AsyncIterator[str | bytes]:
            yield chunk(ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content="")))
            async for _, event in generation.events():
                if isinstance(event, TextDelta):
                    yield content(event.text)
                elif isinstance(event, Finished):
                    yield chunk(
                        ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason=event.reason)
                    )
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield chunk(None, Usage.of(event.prompt_tokens, event.completion_tokens))
                else:
                    yield stream_failure(event)
                    return
            yield SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    (choice,) = await generation.collect(request)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=bundle.name,
        system_fingerprint=generation.fingerprint,
        choices=[
            ChatChoice(
                index=0,
                message=ChatMessageOut(content="".join(choice.text)),
                finish_reason=choice.finish_reason or "stop",
            )
        ],
        usage=Usage.of(choice.prompt_tokens, choice.completion_tokens),
    )
