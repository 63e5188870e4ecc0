"""The OpenAI-compatible routes (models, completions, chat), against a real server."""

from __future__ import annotations

import json
import threading
from typing import Any, ClassVar

import httpx
import openai
import pytest

from conftest import GREEDY, MODEL, Server, Store, assert_openai_error, complete, metric_samples

pytestmark = pytest.mark.e2e


def forward_passes(client: httpx.Client) -> float:
    samples = metric_samples(client)
    return sum(v for (name, _), v in samples.items() if name == "metalserve_forward_passes_total")


def test_models(client: httpx.Client, model_store: Store) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["version_id"] == model_store.v1


def test_unknown_route_has_openai_error_shape(client: httpx.Client) -> None:
    assert_openai_error(client.get("/v2/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


class TestCompletions:
    def test_greedy_is_deterministic(self, client: httpx.Client, api_server: Server) -> None:
        first = complete(client, "The quick brown fox")
        second = complete(client, "The quick brown fox")
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert first["choices"][0]["text"]
        assert first["choices"][0]["finish_reason"] == "length"
        assert first["object"] == "text_completion"
        assert first["system_fingerprint"].startswith(f"{MODEL}@")
        usage = first["usage"]
        assert usage["completion_tokens"] == 12
        assert usage["total_tokens"] == usage["prompt_tokens"] + 12

    def test_token_prompts_and_several_prompts(self, client: httpx.Client) -> None:
        text = complete(client, "Hi")["choices"][0]["text"]
        both = complete(client, ["Hi", "Once upon a time"])
        assert [c["index"] for c in both["choices"]] == [0, 1]
        assert both["choices"][0]["text"] == text
        assert both["usage"]["completion_tokens"] == 24
        # The tiny tokenizer puts BOS (id 1) first: same ids, same output.
        ids = complete(client, [1, 45, 74])["choices"][0]["text"]
        assert ids == complete(client, [[1, 45, 74]])["choices"][0]["text"]

    def test_stop_and_seed(self, client: httpx.Client) -> None:
        full = complete(client, "Hi", max_tokens=20)["choices"][0]["text"]
        stop = full[4:7]
        cut = complete(client, "Hi", max_tokens=20, stop=[stop])["choices"][0]
        assert cut["text"] == full[: full.index(stop)]
        assert cut["finish_reason"] == "stop"

        sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 16}
        a = complete(client, "Hi", **sampled)["choices"][0]["text"]
        b = complete(client, "Hi", **sampled)["choices"][0]["text"]
        assert a == b

    def test_logprobs_are_the_models_and_name_the_alternatives(self, client: httpx.Client) -> None:
        plain = complete(client, "The quick brown fox")["choices"][0]
        choice = complete(client, "The quick brown fox", logprobs=2)["choices"][0]
        assert choice["text"] == plain["text"]  # asking for them changes nothing
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == 12
        # Each token decoded alone (a byte of a character shows as U+FFFD), offsets add up.
        lengths = [len(token) for token in logprobs["tokens"]]
        assert logprobs["text_offset"] == [sum(lengths[:i]) for i in range(12)]
        for token, chosen, top in zip(
            logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
        ):
            assert 1 <= len(top) <= 2  # two tokens that decode alike share a key
            assert chosen <= 0
            # Greedy: the chosen token is the most likely one.
            assert chosen >= max(top.values()) - 1e-5
            assert token in top
        assert complete(client, "Hi")["choices"][0]["logprobs"] is None

    @pytest.mark.parametrize("extra", [{"logprobs": 6}, {"logprobs": 1, "stream": True}])
    def test_logprobs_out_of_bounds_or_streamed_are_refused(
        self, client: httpx.Client, extra: dict[str, object]
    ) -> None:
        response = client.post("/v1/completions", json={**GREEDY, "prompt": "Hi", **extra})
        assert_openai_error(response, 400)
        assert "logprobs" in response.text

    def test_streaming_matches_non_streaming(self, client: httpx.Client) -> None:
        expected = complete(client, "The quick brown fox")["choices"][0]["text"]
        body = {
            **GREEDY,
            "prompt": "The quick brown fox",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == expected
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 12

    def test_a_streamed_batch_of_prompts_keeps_each_choice_apart(
        self, client: httpx.Client
    ) -> None:
        prompts = ["The quick brown fox", "Hi"]
        expected = [c["text"] for c in complete(client, prompts)["choices"]]
        body = {**GREEDY, "prompt": prompts, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        texts = ["", ""]
        for line in lines:
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                texts[choice["index"]] += choice["text"]
        assert texts == expected
        assert expected[0] != expected[1]


class TestChat:
    messages: ClassVar[list[dict[str, str]]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]

    def test_chat_and_streaming(self, client: httpx.Client) -> None:
        response = client.post("/v1/chat/completions", json={**GREEDY, "messages": self.messages})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"]

        stream = {**GREEDY, "messages": self.messages, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=stream) as r:
            lines = [line for line in r.iter_lines() if line]
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == message["content"]

    def test_content_parts(self, client: httpx.Client) -> None:
        parts = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}],
            }
        ]
        plain = [{"role": "user", "content": "Hi"}]
        a = client.post("/v1/chat/completions", json={**GREEDY, "messages": parts}).json()
        b = client.post("/v1/chat/completions", json={**GREEDY, "messages": plain}).json()
        assert a["choices"][0]["message"] == b["choices"][0]["message"]


class TestOpenAIClient:
    @pytest.fixture
    def oai(self, api_server: Server) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="x", max_retries=0)

    def test_models_and_completions(self, oai: openai.OpenAI, client: httpx.Client) -> None:
        assert [m.id for m in oai.models.list()] == [MODEL]
        result = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0)
        assert (
            result.choices[0].text
            == complete(client, "Hi", max_tokens=8, ignore_eos=False)["choices"][0]["text"]
        )
        assert result.usage is not None
        assert result.usage.completion_tokens <= 8

        stream = oai.completions.create(
            model=MODEL, prompt="Hi", max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == result.choices[0].text

    def test_chat(self, oai: openai.OpenAI) -> None:
        messages: list[Any] = [{"role": "user", "content": "What is two plus two?"}]
        result = oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, seed=1
        )
        content = result.choices[0].message.content
        assert content is not None
        assert result.choices[0].finish_reason in {"stop", "length"}

        stream = oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens == result.usage.completion_tokens  # type: ignore[union-attr]

    def test_errors_map_to_openai_exceptions(self, oai: openai.OpenAI) -> None:
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
        with pytest.raises(openai.BadRequestError) as excinfo:
            oai.completions.create(model=MODEL, prompt="Hi", max_tokens=10_000)
        assert "max_tokens" in str(excinfo.value)


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"model": MODEL}, "prompt"),
            ({"model": MODEL, "prompt": ""}, "prompt"),
            ({"model": MODEL, "prompt": []}, None),
            ({"model": MODEL, "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
            ({"model": MODEL, "prompt": "Hi", "max_tokens": 65}, "max_tokens"),
            ({"model": MODEL, "prompt": "Hi", "max_tokens": "5"}, "max_tokens"),
            ({"model": MODEL, "prompt": "Hi", "temperature": 2.5}, "temperature"),
            ({"model": MODEL, "prompt": "Hi", "temperature": -1}, "temperature"),
            ({"model": MODEL, "prompt": "Hi", "top_p": 0}, "top_p"),
            ({"model": MODEL, "prompt": "Hi", "top_p": 1.5}, "top_p"),
            ({"model": MODEL, "prompt": "Hi", "stream": "yes"}, "stream"),
            ({"model": MODEL, "prompt": "Hi", "stop": [""]}, None),
            ({"model": MODEL, "prompt": "Hi", "n": 2}, None),
            ({"model": MODEL, "prompt": [10**9]}, "prompt"),
            ({"model": MODEL, "prompt": "word " * 300}, "prompt"),
            ({"model": MODEL, "prompt": "x" * 100_000}, "prompt"),
            ({"model": 5, "prompt": "Hi"}, "model"),
        ],
    )
    def test_completions_rejects(
        self, client: httpx.Client, body: dict[str, Any], param: str | None
    ) -> None:
        assert_openai_error(client.post("/v1/completions", json=body), 400, param)

    def test_unknown_model_is_404(self, client: httpx.Client) -> None:
        response = client.post("/v1/completions", json={"model": "nope", "prompt": "Hi"})
        assert_openai_error(response, 404, "model")
        assert response.json()["error"]["code"] == "model_not_found"

    @pytest.mark.parametrize(
        "raw",
        [
            b"{bad json",
            b"",
            b"[]",
            b"null",
            b'"text"',
            b'{"model": "tiny", "prompt": "\\ud800"}',
            b'{"model": "tiny", "prompt": "Hi", "temperature": NaN}',
        ],
    )
    def test_malformed_bodies(self, client: httpx.Client, raw: bytes) -> None:
        for path in ("/v1/completions", "/v1/chat/completions"):
            response = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert_openai_error(response, 400)

    @pytest.mark.parametrize(
        "messages",
        [
            [],
            [{"role": "robot", "content": "Hi"}],
            [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            [{"role": "user", "content": ""}],
            "Hi",
        ],
    )
    def test_chat_rejects(self, client: httpx.Client, messages: Any) -> None:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert_openai_error(response, 400)

    def test_oversized_body(self, client: httpx.Client) -> None:
        response = client.post(
            "/v1/completions",
            content=b"x" * (9 * 1024 * 1024),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413

    def test_server_still_healthy(self, client: httpx.Client) -> None:
        assert client.get("/readyz").status_code == 200
        complete(client, "Hi")


def test_concurrent_requests_are_batched(client: httpx.Client, api_server: Server) -> None:
    prompts = ["The quick brown fox", "Hi", "What is two plus two?", "Once upon", "Paris", "Sea"]
    solo = {p: complete(client, p, max_tokens=16)["choices"][0]["text"] for p in prompts}

    before = forward_passes(client)
    for p in prompts:
        complete(client, p, max_tokens=16)
    sequential = forward_passes(client) - before

    results: dict[str, str] = {}
    barrier = threading.Barrier(len(prompts))

    def send(prompt: str) -> None:
        with httpx.Client(base_url=api_server.url, timeout=30) as own:
            barrier.wait(timeout=10)
            results[prompt] = complete(own, prompt, max_tokens=16)["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(p,)) for p in prompts]
    before = forward_passes(client)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    concurrent = forward_passes(client) - before

    assert results == solo, "batching must not change greedy outputs"
    assert sequential == len(prompts) * 16
    assert concurrent < sequential * 0.6, (concurrent, sequential)
    samples = metric_samples(client)
    batched = sum(
        v
        for (name, labels), v in samples.items()
        if name == "metalserve_batch_size_bucket" and ("le", "1.0") in labels
    )
    total = sum(v for (name, _), v in samples.items() if name == "metalserve_batch_size_count")
    assert total > batched, "some forward passes ran more than one sequence"
