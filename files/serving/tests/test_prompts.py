"""Prompt checks and sampling parameters, in-process against the tiny model (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import MODEL, Store
from metalserve.errors import ApiError
from metalserve.loader import LoadedModel
from metalserve.prompts import (
    INLINE_TEXT_CHARS,
    MAX_CHARS_PER_TOKEN,
    chat_prompt,
    completion_prompts,
    sampling_params,
    tokenized_inline,
)
from metalserve.schemas import ChatCompletionRequest, CompletionRequest
from metalserve.settings import ServeSettings

PROMPT_LIMIT = 32
MAX_NEW_TOKENS = 64


@pytest.fixture
def settings(model_store: Store) -> ServeSettings:
    return ServeSettings(
        store=model_store.root,
        model=MODEL,
        version=model_store.v1,
        max_prompt_tokens=PROMPT_LIMIT,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, **fields})


def refusal(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as excinfo:
        call(*args)
    assert excinfo.value.status == 400
    return excinfo.value


def test_completion_prompts_as_ids(settings: ServeSettings, v1: LoadedModel) -> None:
    texts = completion_prompts(settings, v1, completion(prompt=["Hi", "Once upon a time"]))
    assert texts == [v1.encode(t, add_special_tokens=True) for t in ("Hi", "Once upon a time")]
    assert completion_prompts(settings, v1, completion(prompt=[1, 45, 74])) == [[1, 45, 74]]


@pytest.mark.parametrize(
    ("prompt", "code"),
    [
        ("", None),
        ([1] * (PROMPT_LIMIT + 1), "context_length_exceeded"),
        ("x" * (PROMPT_LIMIT * MAX_CHARS_PER_TOKEN + 1), "context_length_exceeded"),
        ([10**9], "invalid_token"),
    ],
)
def test_completion_prompts_refused(
    settings: ServeSettings, v1: LoadedModel, prompt: Any, code: str | None
) -> None:
    error = refusal(completion_prompts, settings, v1, completion(prompt=prompt))
    assert (error.param, error.code) == ("prompt", code)


def test_chat_prompt(settings: ServeSettings, v1: LoadedModel) -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    )
    ids = chat_prompt(settings, v1, body)
    assert 0 < len(ids) <= PROMPT_LIMIT
    empty = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": ""}]}
    )
    assert refusal(chat_prompt, settings, v1, empty).param == "messages"


def test_sampling_params(settings: ServeSettings, v1: LoadedModel) -> None:
    body = completion(prompt="Hi", seed=-1, stop="x")
    params = sampling_params(settings, v1, body, None, [[1, 2]], 16)
    assert (params.max_tokens, params.temperature, params.top_p) == (16, 1.0, 1.0)
    assert params.seed == 2**63 - 1
    assert params.stop == ("x",)
    # No default (chat): as much as the server allows and the context leaves room for.
    assert sampling_params(settings, v1, body, None, [[1, 2]], None).max_tokens == min(
        MAX_NEW_TOKENS, v1.max_context - 2
    )
    assert sampling_params(settings, v1, body, 5, [[1, 2]], 16).max_tokens == 5


def test_sampling_params_refused(settings: ServeSettings, v1: LoadedModel) -> None:
    body = completion(prompt="Hi")
    too_many = refusal(sampling_params, settings, v1, body, MAX_NEW_TOKENS + 1, [[1]], None)
    assert too_many.param == "max_tokens"
    long_prompt = [[1] * (v1.max_context - 2)]
    no_room = refusal(sampling_params, settings, v1, body, 3, long_prompt, None)
    assert (no_room.param, no_room.code) == ("max_tokens", "context_length_exceeded")
    full = refusal(sampling_params, settings, v1, body, None, [[1] * v1.max_context], None)
    assert (full.param, full.code) == ("prompt", "context_length_exceeded")


@pytest.mark.parametrize(
    ("body", "inline"),
    [
        ({"prompt": [[1, 2, 3]] * 4}, True),  # ids: nothing to tokenize
        ({"prompt": ["a" * INLINE_TEXT_CHARS]}, True),
        ({"prompt": ["a" * (INLINE_TEXT_CHARS // 2 + 1)] * 2}, False),  # counted together
        ({"messages": [{"role": "user", "content": "Hi"}]}, True),
        ({"messages": [{"role": "user", "content": ""}] * 65}, False),  # the template's work
        ({"messages": [{"role": "user", "content": "", "name": "a" * 4096}]}, False),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 4096}]}]},
            False,
        ),
    ],
    ids=[
        "ids",
        "short-text",
        "long-texts",
        "short-chat",
        "many-messages",
        "long-name",
        "long-chat-parts",
    ],
)
def test_short_prompts_are_tokenized_on_the_event_loop(body: dict[str, Any], inline: bool) -> None:
    """Token ids and short text are prepared inline (a thread costs more); long text, whose
    tokenizing would hold the loop up, in a thread."""
    kind = ChatCompletionRequest if "messages" in body else CompletionRequest
    assert tokenized_inline(kind.model_validate({"model": MODEL, **body})) is inline
