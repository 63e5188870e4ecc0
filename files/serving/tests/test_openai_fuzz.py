"""Property: no request body, however malformed, gets a 5xx or crashes the server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import MODEL, Server

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=80)

common_fields = {
    "model": st.just(MODEL) | json_values,
    "max_tokens": small_ints | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": st.floats(min_value=-0.5, max_value=1.5) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | json_values,
    "seed": st.integers() | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "n": small_ints | json_values,
    "ignore_eos": st.booleans() | json_values,
    "logprobs": json_values,
    "presence_penalty": st.floats(allow_nan=False) | json_values,
    "logit_bias": json_values,
}

completion_bodies = st.fixed_dictionaries(
    {},
    optional={
        **common_fields,
        "prompt": st.text(max_size=60)
        | st.lists(st.integers(min_value=-5, max_value=5000), max_size=6)
        | st.lists(st.text(max_size=10), max_size=3)
        | json_values,
        "echo": json_values,
        "suffix": json_values,
    },
)
# Mostly-valid bodies reach past validation into tokenization, templating, generation, stop
# strings and streaming; the others probe validation.
plausible_fields = {
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.integers(min_value=-(2**64), max_value=2**64),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}
plausible_completions = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": st.text(min_size=1, max_size=80)
        | st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=8)
        | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3),
    },
    optional={**plausible_fields, "logprobs": st.integers(min_value=0, max_value=5)},
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | json_values,
        "content": st.text(max_size=40)
        | st.lists(
            st.fixed_dictionaries(
                {}, optional={"type": st.just("text") | json_values, "text": st.text(max_size=10)}
            ),
            max_size=3,
        )
        | json_values,
        "name": json_values,
    },
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        **common_fields,
        "messages": st.lists(message, max_size=4) | json_values,
        "max_completion_tokens": small_ints | json_values,
    },
)


plausible_chats = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user", "assistant", "developer"]),
                    "content": st.text(max_size=40),
                }
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional=plausible_fields,
)


@pytest.fixture(scope="module")
def http(api_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=60.0) as client:
        yield client


def check_response(client: httpx.Client, path: str, content: bytes) -> None:
    headers = {"content-type": "application/json"}
    with client.stream("POST", path, content=content, headers=headers) as response:
        body = response.read()
    event(f"HTTP {response.status_code}")  # shown by --hypothesis-show-statistics
    assert response.status_code < 500, (content, response.status_code, body)
    if response.status_code >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str)
        assert error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    else:
        assert json.loads(body)["choices"]


@FUZZ
@given(body=plausible_completions | completion_bodies | json_values)
def test_completions_never_fail_with_5xx(http: httpx.Client, body: Any) -> None:
    check_response(http, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(body=plausible_chats | chat_bodies | json_values)
def test_chat_completions_never_fail_with_5xx(http: httpx.Client, body: Any) -> None:
    check_response(http, "/v1/chat/completions", json.dumps(body).encode())


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_raw_bytes_never_fail_with_5xx(http: httpx.Client, raw: bytes) -> None:
    check_response(http, "/v1/completions", raw)


def test_server_survived(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200
