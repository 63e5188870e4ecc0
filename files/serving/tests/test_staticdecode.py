"""The static-cache decode path on the CPU (the CUDA-graph variant replays this very code)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import MODEL, Store
from engine_helpers import (
    GREEDY,
    PROMPTS,
    alone,
    free_bytes_for,
    llama_relative,
    padded_prompts,
    submit,
)
from metalserve import staticdecode
from metalserve.engine import DynamicBatch, Engine, Finished, StaticBatch, generate_once
from metalserve.loader import LoadedModel
from metalserve.metrics import Metrics
from metalserve.sampling import SamplingParams


def test_buckets() -> None:
    assert staticdecode.batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert staticdecode.batch_buckets(4) == [1, 2, 4]
    assert staticdecode.batch_buckets(5) == [1, 2, 4, 5]
    assert staticdecode.batch_buckets(1) == [1]
    assert staticdecode.batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100]
    assert staticdecode.length_buckets(2048) == [128, 256, 512, 1024, 2048]
    assert staticdecode.length_buckets(100) == [100]
    assert staticdecode.length_buckets(300) == [128, 256, 300]
    assert staticdecode.bucket(1, [1, 2, 4]) == 1
    assert staticdecode.bucket(3, [1, 2, 4]) == 4
    assert staticdecode.bucket(129, [128, 256]) == 256
    with pytest.raises(ValueError, match="exceeds"):
        staticdecode.bucket(5, [1, 2, 4])


def test_prefill_buckets() -> None:
    shapes = staticdecode.prefill_shapes(64, 2048)
    assert sorted({r for r, _ in shapes}) == [1, 2, 4, 8, 16, 32, 64]
    assert sorted({n for _, n in shapes}) == [16, 32, 64, 128, 256, 512]
    assert max(r * n for r, n in shapes) == staticdecode.PREFILL_GRAPH_TOKENS
    assert (32, 64) in shapes
    assert (16, 128) in shapes
    assert (64, 64) not in shapes
    assert staticdecode.prefill_shapes(5, 40) == [(r, n) for r in (1, 2, 4, 5) for n in (16, 32)]


def test_cache_bytes(v1: LoadedModel) -> None:
    config = v1.model.config
    # tiny model: 2 layers, 2 KV heads of 16 dims; keys and values; float32
    assert staticdecode.cache_bytes(config, 4, 512, torch.float32) == 2 * 2 * 2 * 16 * 4 * 512 * 4
    assert staticdecode.cache_bytes(config, 4, 512, torch.bfloat16) == 2 * 2 * 2 * 16 * 4 * 512 * 2


def test_unsupported_models_are_named() -> None:
    class Config:
        model_type = "gpt2"

    class Model:
        config = Config()

    assert "gpt2" in (staticdecode.unsupported_reason(Model()) or "")
    with pytest.raises(staticdecode.StaticDecodeUnavailable):
        staticdecode.StaticDecoder(
            Model(),
            slots=2,
            max_length=16,
            device=torch.device("cpu"),
            dtype=torch.float32,
            cuda_graphs=False,
        )


def _decoder(
    bundle: LoadedModel,
    slots: int = 4,
    compile_layers: bool = False,
    bucketed: bool = False,
    attention: str = "auto",
    prefix_cache_tokens: int = 0,
    reserve_bytes: int = 0,
) -> staticdecode.StaticDecoder:
    return staticdecode.StaticDecoder(
        bundle.model,
        slots=slots,
        max_length=bundle.max_context,
        device=bundle.device,
        dtype=bundle.dtype,
        cuda_graphs=False,
        compile_layers=compile_layers,
        bucketed_prefill=bucketed,
        attention=attention,
        prefix_cache_tokens=prefix_cache_tokens,
        reserve_bytes=reserve_bytes,
    )


@pytest.mark.parametrize(
    ("compile_layers", "bucketed", "attention", "skinny", "fused"),
    [
        (False, False, "bucketed", False, False),
        (True, False, "bucketed", False, False),
        (False, True, "bucketed", False, False),
        (True, False, "own", False, False),
        (True, False, "own", True, False),
        (False, False, "own", True, True),
        (False, False, "bucketed", False, True),
    ],
    ids=[
        "eager",
        "compiled",
        "bucketed-prefill",
        "own-lengths-compiled",
        "own-lengths-skinny-compiled",
        "own-lengths-skinny-fused",
        "fused",
    ],
)
@torch.inference_mode()
def test_logits_match_the_transformers_forward(
    v1: LoadedModel,
    compile_layers: bool,
    bucketed: bool,
    attention: str,
    skinny: bool,
    fused: bool,
) -> None:
    """Prefill of right-padded prompts of different lengths, then decode steps with every row at
    its own position, give the logits of a full transformers forward over each sequence alone;
    also with the decode step's layer compiled (torch.compile, here for the CPU), with the
    prefill padded to its bucket (3 rows to 4, the prompts to a length bucket: what a prefill
    graph runs on CUDA), and with the decode attention over each row's own length (the
    ``decode_attention`` operator, compiled: what runs on CUDA), and with the projections
    through the ``skinny_linear`` operator as on CUDA (here untuned: torch's linear in it), and
    through ``layer_kernels``' fused steps as uncompiled on CUDA (here their torch references:
    the layer's calls and the cache writes checked)."""
    decoder = _decoder(v1, compile_layers=compile_layers, bucketed=bucketed, attention=attention)
    assert decoder.own_lengths == (attention == "own")
    assert not decoder.skinny  # the CPU: no kernel to tune
    assert not decoder.fused  # nor the fused kernels
    decoder.skinny, decoder.fused = skinny, fused
    prompts = [v1.encode(p, add_special_tokens=True) for p in PROMPTS[:3]]
    longest = max(len(p) for p in prompts)
    ids = torch.full((3, longest), v1.pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts])
    # Slot 0 stays free: the group starts at slot 1.
    _decode_like_transformers(v1, decoder, prompts, decoder.prefill(ids, lengths, 1), steps=6)


def _decode_like_transformers(
    bundle: LoadedModel,
    decoder: staticdecode.StaticDecoder,
    prompts: list[list[int]],
    logits: torch.Tensor,
    steps: int,
) -> None:
    """After a prefill of three ``prompts`` into slots 1-3 (``logits``): greedy decode steps of
    all four slots, each row's logits those of transformers' forward over its sequence alone."""
    sequences = [list(p) for p in prompts]
    lengths = torch.tensor([len(p) for p in prompts])
    for step in range(steps):
        for row, seq in enumerate(sequences):
            reference = bundle.model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[row], reference, rtol=1e-4, atol=1e-4)
        chosen = logits.argmax(-1)
        if step == 0:
            decoder.admit(1, chosen, lengths)
        else:
            decoder.advance(4, torch.cat([decoder.tokens[:1], chosen]))
        for seq, token in zip(sequences, chosen.tolist(), strict=True):
            seq.append(token)
        logits = decoder.decode(4, max(len(s) for s in sequences) - 1)[1:]


@torch.inference_mode()
def test_bucketed_prefill_writes_its_own_slots_and_the_spare_only(v1: LoadedModel) -> None:
    """A group of 3 padded to a bucket of 4 rows, starting at slot 1: slots 1-3 get the prompts'
    keys, slot 0 (a live sequence's in a real batch) is untouched, the padding row went to the
    spare slot; the logits equal the unpadded prefill's."""
    plain, bucketed = _decoder(v1), _decoder(v1, bucketed=True)
    assert bucketed.spare_slot == 4
    assert bucketed.keys[0].shape[0] == 5
    prompts = [v1.encode(p, add_special_tokens=True) for p in PROMPTS[:3:2]]
    longest = max(len(p) for p in prompts)
    ids = torch.full((2, longest), v1.pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts])
    length = staticdecode.bucket(longest, list(staticdecode.PREFILL_LENGTHS))
    assert bucketed._prefill_bucket(2, longest) == (2, length)
    assert bucketed._prefill_bucket(3, longest) == (4, length)
    ids3 = torch.cat([ids, ids[:1]])
    lengths3 = torch.cat([lengths, lengths[:1]])
    for cache in (*bucketed.keys, *bucketed.values):
        cache.fill_(float("nan"))
    logits = bucketed.prefill(ids3, lengths3, 1)  # rows 1..3 real, one padding row
    reference = plain.prefill(ids3, lengths3, 1)
    torch.testing.assert_close(logits, reference)
    for cache in (*bucketed.keys, *bucketed.values):
        assert cache[0].isnan().all(), "slot 0 was written"
        for row, slot in enumerate((1, 2, 3)):
            assert not cache[slot, :, : lengths3[row]].isnan().any()
        assert not cache[bucketed.spare_slot, :, :length].isnan().any()  # the padding row's
    # A group larger than every bucket prefills eagerly at its own shape.
    assert bucketed._prefill_bucket(1, staticdecode.PREFILL_LENGTHS[-1] + 1) is None


@torch.inference_mode()
def test_move_keeps_a_sequence_intact(v1: LoadedModel) -> None:
    decoder = _decoder(v1)
    prompt = v1.encode(PROMPTS[2], add_special_tokens=True)
    ids = torch.tensor([prompt, prompt])
    lengths = torch.tensor([len(prompt)] * 2)
    first = decoder.prefill(ids, lengths, 0)
    decoder.admit(0, first.argmax(-1), lengths)
    decoder.move([1], [3], len(prompt) + 1)
    for cache in (*decoder.keys, *decoder.values):
        cache[1].fill_(float("nan"))  # slot 1 is free now: nothing may read it
        cache[2] = cache[3]
    decoder.tokens[2] = decoder.tokens[3]
    decoder.positions[2] = decoder.positions[3]
    logits = decoder.decode(4, len(prompt))
    torch.testing.assert_close(logits[0], logits[2])
    torch.testing.assert_close(logits[0], logits[3])


SYSTEM = "You are a helpful assistant on metal servers. Answer briefly and kindly, please."


def _prefix_prompts(bundle: LoadedModel) -> list[list[int]]:
    """Prompts that share a system prompt of more than two blocks, and one that does not."""
    system = bundle.encode(SYSTEM, add_special_tokens=True)
    assert len(system) > 2 * 16, "the shared part must span whole blocks"
    asked = [bundle.encode(f" {p}", add_special_tokens=False) for p in PROMPTS[:3]]
    return [system + a for a in asked] + [bundle.encode(PROMPTS[3], add_special_tokens=True)]


@torch.inference_mode()
def test_prefix_cache_prefills_only_what_follows_a_cached_prefix(v1: LoadedModel) -> None:
    """The first group fills the cache; a later group of the same system prompt with other
    questions (one prompt without it) starts from the cached blocks, at slot 1 (slot 0 keeps a
    live sequence's cache untouched), and its logits, then its decode steps, are those of the
    full transformers forward over each sequence alone."""
    decoder = _decoder(v1, slots=5, prefix_cache_tokens=256)
    assert decoder.prefix is not None
    prompts = _prefix_prompts(v1)
    system = len(v1.encode(SYSTEM, add_special_tokens=True))
    _, reused = decoder.prefill_prompts(prompts[:1], 0)
    assert reused == 0
    assert len(decoder.prefix) == len(prompts[0]) // 16
    for cache in (*decoder.keys, *decoder.values):
        cache[0].fill_(float("nan"))  # a live sequence's: not to be written
        cache[1:].fill_(7.0)  # stale entries: not to be read (masked; finite, as real ones)
    group = prompts[1:]
    logits, reused = decoder.prefill_prompts(group, 1)
    assert reused == 2 * (system // 16 * 16)  # the two that share it: its whole blocks
    for cache in (*decoder.keys, *decoder.values):
        assert cache[0].isnan().all(), "slot 0 was written"
    _decode_like_transformers(v1, decoder, group, logits, steps=4)
    # The blocks after the cached prefix, written to the pool by that prefill, serve too.
    longest = max(group[:2], key=len)
    assert (len(longest) - 1) // 16 > system // 16, "the question must fill a block of its own"
    logits, reused = decoder.prefill_prompts([longest], 4)
    assert reused == (len(longest) - 1) // 16 * 16
    reference = v1.model(input_ids=torch.tensor([longest])).logits[0, -1]
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_prefix_cache_leaves_a_prompt_one_token_to_prefill(v1: LoadedModel) -> None:
    """A prompt that is exactly whole cached blocks reuses all of them but the last (the
    logits after its last token must be computed), and a prompt shorter than a block none."""
    decoder = _decoder(v1, slots=2, prefix_cache_tokens=64)
    prompt = v1.encode(SYSTEM, add_special_tokens=True)[:32]
    decoder.prefill_prompts([prompt], 0)
    logits, reused = decoder.prefill_prompts([prompt], 1)
    assert reused == 16
    reference = v1.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)
    assert decoder.prefill_prompts([prompt[:15]], 0)[1] == 0


@torch.inference_mode()
def test_prefix_cache_falls_back_to_whole_prompts_and_forgets_unwritten_blocks(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose attention mask would pass MAX_MASK_BYTES prefills its whole prompts (the
    same logits, nothing reused); blocks whose prefill failed to write them are not named."""
    decoder = _decoder(v1, slots=2, prefix_cache_tokens=256)
    assert decoder.prefix is not None
    prompt = v1.encode(SYSTEM, add_special_tokens=True)
    decoder.prefill_prompts([prompt], 0)
    cached = len(decoder.prefix)
    monkeypatch.setattr(staticdecode, "MAX_MASK_BYTES", 0)
    logits, reused = decoder.prefill_prompts([prompt], 1)
    assert reused == 0
    reference = v1.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)

    def failing(*args: object) -> None:
        raise RuntimeError("device error")

    # The forward that would write the claimed blocks fails: none of them is named.
    monkeypatch.setattr(decoder, "_store_blocks", failing)
    other = v1.encode(PROMPTS[2] + " " + PROMPTS[5], add_special_tokens=True)
    assert len(other) >= 16
    with pytest.raises(RuntimeError, match="device error"):
        decoder.prefill_prompts([other], 0)
    assert len(decoder.prefix) == cached


@torch.inference_mode()
def test_prefix_cache_under_pressure_keeps_only_blocks_their_prefill_wrote(
    v1: LoadedModel,
) -> None:
    """A pool too small for a group: one row's claims evict blocks that a later row of the same
    group matched (and copied into its slot). That later row claims only its blocks after its
    start, which its forward writes: every block named afterwards holds what its name says
    (before the fix a row claimed its evicted prefix again, and its forward wrote another
    block's keys there, or the claim failed outside the forget; found in review)."""
    generator = torch.Generator().manual_seed(1)
    vocab = v1.model.config.vocab_size

    def tokens(count: int) -> list[int]:
        return torch.randint(5, vocab, (count,), generator=generator).tolist()

    decoder = _decoder(v1, slots=4, prefix_cache_tokens=80)  # 5 blocks
    a, d, b, c = tokens(49), tokens(17), tokens(33), tokens(33)
    decoder.prefill_prompts([a], 0)
    decoder.prefill_prompts([d], 0)
    decoder.prefill_prompts([b, c, a[:48] + tokens(3), d[:16] + tokens(3)], 0)
    for prompt in (b + tokens(4), a[:32] + tokens(5), c + tokens(2), d[:16] + tokens(1)):
        logits, _ = decoder.prefill_prompts([prompt], 0)
        reference = v1.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_group_runs_whole_as_its_prefill_graph_where_that_is_sooner(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With prefill graphs (here their eager buckets stand in), a group that a bucket holds
    prefills its whole prompts where the estimate says the graph is sooner (a small model: its
    extra tokens cost less than the eager pass's launches), its cached prefix unused; it starts
    after the prefix where the graph's extra tokens cost more, or where no bucket holds it."""
    decoder = _decoder(v1, slots=4, bucketed=True, prefix_cache_tokens=256)
    assert decoder.graph_before_prefix is False  # eager buckets: the prefix always pays
    decoder.graph_before_prefix = True
    prompt = v1.encode(SYSTEM, add_special_tokens=True)
    reusable = (len(prompt) - 1) // 16 * 16
    assert decoder._prefill_bucket(1, len(prompt)) is not None
    decoder.prefill_prompts([prompt], 0)
    reference = v1.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    logits, reused = decoder.prefill_prompts([prompt], 1)
    assert reused == 0
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)
    # A device that computes slowly: the graph's extra tokens cost more than the launches.
    monkeypatch.setattr(staticdecode, "PREFILL_GRAPH_FLOPS", 1.0)
    logits, reused = decoder.prefill_prompts([prompt], 2)
    assert reused == reusable > 0
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    decoder.prefill_shapes = [(1, 16)]  # no bucket holds it
    logits, reused = decoder.prefill_prompts([prompt], 3)
    assert reused == reusable
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)


def test_the_prefill_estimate_at_the_bench_presets() -> None:
    """The estimate's choices at 8B and 850M on an H200 (step 13's and step 16's passes): at 8B a
    16 x 64 group that reuses 48 tokens a prompt runs as its graph (the eager pass was no
    faster), 4 prompts of up to 512 tokens after 448 cached ones eagerly; at 850M every graph
    wins (its eager passes took 20 ms, its graphs a few). A bucket whose graph is not captured
    yet (deferred) never wins: it would run eagerly too."""

    def graph_wins(
        layers: int, params: float, bucket: tuple[int, int], after: int, deferred: bool = False
    ) -> bool:
        shaped = SimpleNamespace(
            graph_before_prefix=True,
            _prefill_bucket=lambda rows, longest: bucket,
            _deferred=[bucket] if deferred else [],
            prefill_flop_per_token=2 * params,
            layer_weights=[None] * layers,
        )
        return bool(staticdecode.StaticDecoder._graph_beats_prefix(shaped, 0, 0, after))  # type: ignore[arg-type]

    assert graph_wins(32, 6.98e9, (16, 64), 16 * 16)
    assert not graph_wins(32, 6.98e9, (16, 64), 16 * 16, deferred=True)
    assert not graph_wins(32, 6.98e9, (4, 512), 4 * 64)
    assert graph_wins(16, 0.72e9, (32, 64), 32 * 16)
    assert graph_wins(16, 0.72e9, (4, 512), 4 * 64)


def _reusable(bundle: LoadedModel, prompt: str, earlier: str) -> int:
    """Tokens of ``prompt`` the prefix cache can serve after ``earlier`` was prefilled."""
    ids, before = (bundle.encode(t, add_special_tokens=True) for t in (prompt, earlier))
    pairs = enumerate(zip(ids, before, strict=False))
    common = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(before)))
    return min(common, len(ids) - 1) // 16 * 16


def test_prefix_cache_engine_outputs_and_metrics(v1: LoadedModel) -> None:
    """Through the engine (two slots): requests sharing a system prompt, then others that
    overwrite those slots with another long prompt, then the system prompt again, give the
    texts they give alone, and the metrics count the prompt tokens the cache saved (off:
    nothing counted)."""
    from metalserve.metrics import Metrics

    other = "Metal servers hum in the data center while models answer questions all night."
    texts = [f"{start} {p}" for start in (SYSTEM, other, SYSTEM) for p in PROMPTS[:2]]
    expected = [alone(v1, t) for t in texts]
    for tokens in (0, 512):
        metrics = Metrics()
        eng = Engine(
            max_batch_size=2, decode_mode="static", observer=metrics, prefix_cache_tokens=tokens
        )
        eng.start()
        try:
            eng.swap(v1).result(timeout=10)
            assert eng.prefix_cache_tokens_held == tokens
            sinks = [submit(eng, v1, t)[1] for t in texts]
            assert [s.wait() and s.text for s in sinks] == expected
        finally:
            eng.stop()
        queried = metrics.registry.get_sample_value("metalserve_prefix_cache_queries_total")
        hits = metrics.registry.get_sample_value("metalserve_prefix_cache_hits_total")
        if tokens:
            prompt_tokens = sum(len(v1.encode(t, add_special_tokens=True)) for t in texts)
            assert queried == prompt_tokens
            # At least the last two reuse the first's blocks (earlier rows may reuse others').
            assert hits is not None
            assert hits >= sum(_reusable(v1, t, texts[0]) for t in texts[4:]) >= 2 * 32
        else:
            assert queried == hits == 0


@pytest.fixture
def static_engine(v1: LoadedModel) -> Iterator[Engine]:
    eng = Engine(max_batch_size=4, decode_mode="static")
    eng.start()
    eng.swap(v1).result(timeout=10)
    assert eng.decode_path == "static"
    assert isinstance(eng._batch, StaticBatch)
    yield eng
    eng.stop()


def test_static_engine_matches_solo_outputs(static_engine: Engine, v1: LoadedModel) -> None:
    """Continuous batching on the static path: staggered arrivals, a queue (4 slots for 6
    prompts), different lengths, sequences leaving mid-batch (slots move) and a stop string."""
    limits = [12, 3, 20, 7, 1, 15]
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in limits]
    expected = [alone(v1, p, q) for p, q in zip(PROMPTS, params, strict=True)]
    first = [submit(static_engine, v1, p, q) for p, q in zip(PROMPTS[:3], params[:3], strict=True)]
    first[0][1].first.wait(10)
    later = [submit(static_engine, v1, p, q) for p, q in zip(PROMPTS[3:], params[3:], strict=True)]
    sinks = [s for _, s in first + later]
    for sink, limit in zip(sinks, limits, strict=True):
        finished = sink.wait()
        assert isinstance(finished, Finished)
        assert finished.completion_tokens == limit
    assert [s.text for s in sinks] == expected

    full = alone(v1, "Hi", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop = full[5:8]
    _, sink = submit(
        static_engine,
        v1,
        "Hi",
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,), ignore_eos=True),
    )
    finished = sink.wait()
    assert isinstance(finished, Finished)
    assert finished.reason == "stop"
    assert sink.text == full[: full.index(stop)]


def test_static_engine_seeded_sampling_is_batch_invariant(
    static_engine: Engine, v1: LoadedModel
) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    expected = alone(v1, PROMPTS[0], sampled)
    others = [
        submit(static_engine, v1, p, dataclasses.replace(sampled, seed=i, max_tokens=4 + i))
        for i, p in enumerate(PROMPTS[1:4])
    ]
    _, target = submit(static_engine, v1, PROMPTS[0], sampled)
    target.wait()
    for _, sink in others:
        sink.wait()
    assert target.text == expected


def test_static_engine_drops_cancelled_sequences(v1: LoadedModel) -> None:
    eng = Engine(max_batch_size=4, decode_mode="static", step_delay=0.01)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        seq, sink = submit(eng, v1, "Hi", long)
        _, short = submit(eng, v1, PROMPTS[2], dataclasses.replace(GREEDY, max_tokens=30))
        sink.first.wait(10)
        seq.cancel()
        event = sink.wait(10)
        assert not isinstance(event, Finished)
        assert len(seq.generated) < 100
        # The short one moved into the cancelled one's slot and still completes correctly.
        assert isinstance(short.wait(), Finished)
        assert short.text == alone(v1, PROMPTS[2], dataclasses.replace(GREEDY, max_tokens=30))
    finally:
        eng.stop()


def test_swap_between_static_models(v1: LoadedModel, v2: LoadedModel) -> None:
    eng = Engine(max_batch_size=2, decode_mode="static")
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        _, sink = submit(eng, v1, PROMPTS[0])
        sink.wait()
        assert eng.swap(v2).result(timeout=30) is v1
        _, sink2 = submit(eng, v2, PROMPTS[0])
        sink2.wait()
        assert sink.text == alone(v1, PROMPTS[0])
        assert sink2.text == alone(v2, PROMPTS[0])
        assert eng.decode_path == "static"
    finally:
        eng.stop()


def _decoder_in(
    bundle: LoadedModel, monkeypatch: pytest.MonkeyPatch, slots_fit: float, **kwargs: int
) -> staticdecode.StaticDecoder:
    """A decoder built where the device's free memory holds ``slots_fit`` slots of the context
    (the spare among them) and the prefix pool asked for (``prefix_cache_tokens``)."""
    free = free_bytes_for(
        bundle.model.config,
        bundle.dtype,
        bundle.max_context,
        slots_fit,
        kwargs.get("prefix_cache_tokens", 0),
    )
    monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: free)
    return _decoder(bundle, **kwargs)


def test_the_static_cache_holds_as_many_slots_as_the_device_memory_holds(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the free memory holds fewer slots of the context than asked, the cache has as many
    as it holds (its prefix pool too, which fits beside them), says so, and refuses a sequence
    beyond them; where everything fits, what was asked, silently."""
    with caplog.at_level(logging.WARNING):
        roomy = _decoder_in(v1, monkeypatch, 9.5, slots=8, prefix_cache_tokens=64)
    assert (roomy.slots, roomy.keys[0].shape[0]) == (8, 9)
    assert roomy.prefix is not None
    assert not caplog.text
    with caplog.at_level(logging.WARNING):
        tight = _decoder_in(v1, monkeypatch, 3.5, slots=8, prefix_cache_tokens=64)
    assert (tight.slots, tight.keys[0].shape[0], tight.batch_sizes[-1]) == (2, 3, 2)
    assert tight.cache_bytes == staticdecode.cache_bytes(
        v1.model.config, 3, v1.max_context + 1, v1.dtype
    )
    assert tight.prefix is not None
    assert f"holds 2 sequences of {v1.max_context} tokens, not 8" in caplog.text
    prompts = [v1.encode(p, add_special_tokens=True) for p in PROMPTS[:3]]
    with torch.inference_mode():
        tight.prefill_prompts(prompts[:2], 0)
        with pytest.raises(ValueError, match="3 sequences do not fit 2 slots"):
            tight.prefill_prompts(prompts[2:], 2)


def test_the_prefix_pool_gives_way_to_the_first_slot_and_no_slot_is_named(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prefix pool that leaves no room for one sequence is dropped (the slots then take its
    room); a context of which not even one sequence fits is refused, naming the way out."""
    pool = free_bytes_for(v1.model.config, v1.dtype, v1.max_context, 0, 1024)
    half = free_bytes_for(v1.model.config, v1.dtype, v1.max_context, 1.5) - 1
    monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: pool + half)
    with caplog.at_level(logging.WARNING):
        decoder = _decoder(v1, slots=4, prefix_cache_tokens=1024)
    assert decoder.prefix is None
    assert decoder.prefix_cache_bytes == 0
    assert 1 <= decoder.slots < 4
    assert "no prefix cache" in caplog.text
    monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: half)
    with pytest.raises(staticdecode.StaticDecodeUnavailable, match="lower --max-context"):
        _decoder(v1, slots=4)


def test_a_hot_reload_reserve_that_leaves_no_slot_gives_way(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Room kept for a hot reload's next version shrinks the cache; where it would leave no
    slot at all, it is given up (saying so): a replica that serves beats one that reloads."""
    free = free_bytes_for(v1.model.config, v1.dtype, v1.max_context, 5.5)
    slot = staticdecode.cache_bytes(v1.model.config, 1, v1.max_context + 1, v1.dtype)
    monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: free)
    with caplog.at_level(logging.WARNING):
        assert _decoder(v1, slots=8, reserve_bytes=int(2.5 * slot)).slots == 2
        assert "no room for a hot reload" not in caplog.text
        assert _decoder(v1, slots=8, reserve_bytes=free).slots == 4
    assert "no room for a hot reload's next version" in caplog.text


def test_the_engine_admits_only_the_slots_the_static_cache_holds(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for 4, the cache holding 2: 2 run while 2 wait (no prefill beyond the cache), the
    cache usage counts the 2 slots, and every text is its own greedy generation."""
    from metalserve.metrics import Metrics

    free = free_bytes_for(v1.model.config, v1.dtype, v1.max_context, 3.5)
    monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: free)
    metrics = Metrics()
    eng = Engine(
        max_batch_size=4,
        decode_mode="static",
        prefix_cache_tokens=0,
        observer=metrics,
        step_delay=0.02,
    )
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        assert (eng.max_batch_size, eng.batch_slots) == (4, 2)
        params = dataclasses.replace(GREEDY, max_tokens=20)
        sinks = [submit(eng, v1, p, params)[1] for p in PROMPTS[:4]]

        def value(name: str) -> float:
            return metrics.registry.get_sample_value(name) or 0.0

        deadline = time.monotonic() + 10
        while value("metalserve_num_requests_running") < 2:
            assert time.monotonic() < deadline, "two sequences never ran"
            time.sleep(0.01)
        assert value("metalserve_num_requests_waiting") == 2
        used = sum(len(v1.encode(p, add_special_tokens=True)) + 20 for p in PROMPTS[:2])
        assert 0 < value("metalserve_kv_cache_usage_perc") <= used / (2 * v1.max_context)
        texts = [sink.wait() and sink.text for sink in sinks]
        assert texts == [alone(v1, p, params) for p in PROMPTS[:4]]
    finally:
        eng.stop()


@pytest.mark.parametrize("release", [True, False], ids=["released", "kept"])
def test_a_hot_reload_keeps_room_for_the_next_version_and_frees_the_replaced_one(
    model_store: Store, monkeypatch: pytest.MonkeyPatch, release: bool
) -> None:
    """Device memory as the loaded models' weights leave it: with reload headroom the first
    version's cache leaves one model's size free (the next version loads there) and holds the
    slots that fit beside it; at the switch the replaced weights go first, so the second
    version's cache gets as many slots (kept, they would still take that room)."""
    from metalserve.loader import load_version

    loaded = [load_version(model_store.root, MODEL, model_store.v1)]
    first = loaded[0]
    total = free_bytes_for(first.model.config, first.dtype, first.max_context, 5.5)
    total += 2 * first.loaded_bytes  # the two versions' weights (of one shape)
    monkeypatch.setattr(
        staticdecode,
        "free_device_bytes",
        lambda device: total - sum(b.loaded_bytes for b in loaded),
    )
    eng = Engine(
        max_batch_size=8,
        decode_mode="static",
        prefix_cache_tokens=0,
        reload_headroom=True,
        release_replaced=release,
    )
    eng.start()
    try:
        eng.swap(loaded[0]).result(timeout=10)
        assert (eng.decode_path, eng.batch_slots) == ("static", 4)
        loaded.append(load_version(model_store.root, MODEL, model_store.v2))
        assert eng.swap(loaded[1]).result(timeout=30) is loaded[0]
        assert loaded[0].loaded_bytes == (0 if release else loaded[1].loaded_bytes)
        # Kept, the replaced weights take the room of about two slots.
        assert (eng.decode_path, eng.batch_slots) == ("static", 4 if release else 2)
        _, sink = submit(eng, loaded[1], PROMPTS[0])
        sink.wait()
    finally:
        eng.stop()
    assert sink.text == alone(loaded[1], PROMPTS[0])


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "no-triton"])
def test_the_decode_path_on_each_device(monkeypatch: pytest.MonkeyPatch, triton: bool) -> None:
    """``auto``: CUDA graphs on CUDA with the layer's steps fused by ``layer_kernels`` (the
    layer compiled only where Triton is missing), the dynamic path on the CPU; ``on``/``off``
    as asked on the static paths."""
    from metalserve import layer_kernels

    monkeypatch.setattr(layer_kernels, "triton", object() if triton else None)
    assert Engine().decode_path_on("cuda") == ("cuda-graphs", not triton)
    assert Engine().decode_path_on("cpu") == ("dynamic", False)
    assert Engine(decode_compile="on").decode_path_on("cuda") == ("cuda-graphs", True)
    assert Engine(decode_compile="off").decode_path_on("cuda") == ("cuda-graphs", False)
    assert Engine(decode_mode="static").decode_path_on("cpu") == ("static", False)
    assert Engine(decode_mode="static", decode_compile="on").decode_path_on("cpu") == (
        "static",
        True,
    )
    assert Engine(decode_compile="on").decode_path_on("cpu") == ("dynamic", False)


def test_decode_mode_fallbacks(v1: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    assert type(Engine()._new_batch(v1)) is DynamicBatch  # auto on CPU: dynamic
    with caplog.at_level(logging.WARNING):
        batch = Engine(decode_mode="cuda-graphs")._new_batch(v1)
    assert isinstance(batch, StaticBatch)
    assert not batch.decoder.cuda_graphs
    assert "needs a CUDA device" in caplog.text

    class Config:
        model_type = "gpt2"

    odd = dataclasses.replace(v1, model=type("Odd", (), {"config": Config()})())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batch = Engine(decode_mode="static")._new_batch(odd)
    assert type(batch) is DynamicBatch
    assert "gpt2" in caplog.text
    with pytest.raises(ValueError, match="decode_mode"):
        Engine(decode_mode="fast")
    with pytest.raises(ValueError, match="decode_compile"):
        Engine(decode_compile="yes")


@torch.inference_mode()
def test_the_compiled_layer_compiles_once_for_every_bucket_but_batch_1(v1: LoadedModel) -> None:
    """Sizes that happen to be equal, and an attention slice as long as the cache, must not
    make guards: a recompilation per bucket would take minutes on a GPU and hit dynamo's limit."""
    decoder = _decoder(v1, slots=4, compile_layers=True)
    decoder.capture_all()  # compiles: batch 1 and the rest
    lengths = sorted({2, 3, *decoder.lengths, decoder.max_length})  # a decode step sees >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (4, 3, 2, 1):
            for length in lengths:
                decoder._decode(size, length)


def test_a_failed_compilation_runs_the_layer_uncompiled(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(staticdecode, "compiled_decode_layer", lambda: broken)
    with caplog.at_level(logging.ERROR):
        batch = Engine(decode_mode="static", decode_compile="on")._new_batch(v1)
    assert isinstance(batch, StaticBatch)
    assert not batch.decoder.compiled
    assert batch.decoder._layer_step is staticdecode.decode_layer
    assert "compiling the decode layer failed" in caplog.text


def test_failed_fused_kernels_run_the_layer_in_plain_torch(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture that fails with the fused kernels (a Triton that cannot compile them) is
    tried again with the layer in plain torch, not given up for the dynamic path."""
    build, capture = staticdecode.StaticDecoder.__init__, staticdecode.StaticDecoder.capture_all

    def fused(self: staticdecode.StaticDecoder, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        self.fused = True  # as on CUDA with Triton

    def failing_fused(self: staticdecode.StaticDecoder, defer: bool = False) -> None:
        if self.fused:
            raise RuntimeError("ptxas failed")
        capture(self, defer)

    monkeypatch.setattr(staticdecode.StaticDecoder, "__init__", fused)
    monkeypatch.setattr(staticdecode.StaticDecoder, "capture_all", failing_fused)
    with caplog.at_level(logging.ERROR):
        batch = Engine(decode_mode="static")._new_batch(v1)
    assert isinstance(batch, StaticBatch)
    assert not batch.decoder.fused
    assert "its fused kernels failed; plain torch runs the layer" in caplog.text


def test_a_model_switch_keeps_the_heartbeat_for_a_bounded_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = Engine()  # not started: the switch runs on this thread

    def age() -> float:
        return time.monotonic() - eng._heartbeat

    with eng._beating(deadline=30.0):
        time.sleep(2.5)
        assert age() < 1.5  # a long switch still beats
    with caplog.at_level(logging.ERROR), eng._beating(deadline=1.0):
        time.sleep(3.5)
        assert age() > 1.2  # past the deadline it stops: the watchdog may act
    assert "exceeded 1s" in caplog.text


def test_generate_once_is_unchanged_by_the_static_path(v1: LoadedModel) -> None:
    ids = v1.encode(PROMPTS[0], add_special_tokens=True)
    assert generate_once(v1, ids, GREEDY) == alone(v1, PROMPTS[0])


@pytest.mark.parametrize(
    ("model_type", "compile_layers", "fused"),
    [
        ("mistral", False, False),
        ("qwen2", False, False),
        ("qwen3", False, False),
        ("qwen3", True, False),
        ("qwen3", False, True),
    ],
    ids=["mistral", "qwen2-biases", "qwen3-qk-norm", "qwen3-compiled", "qwen3-fused"],
)
@torch.inference_mode()
def test_llama_relatives_match_their_transformers_forward(
    model_type: str, compile_layers: bool, fused: bool
) -> None:
    """Mistral (Llama's layer), Qwen2 (q/k/v biases) and Qwen3 (a norm on each head's queries
    and keys) on the static path: prefill of right-padded prompts and decode steps give the
    logits of their own transformers forward."""
    model = llama_relative(
        model_type, **({"sliding_window": None} if model_type == "mistral" else {})
    )
    assert staticdecode.unsupported_reason(model) is None
    decoder = staticdecode.StaticDecoder(
        model,
        slots=2,
        max_length=256,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cuda_graphs=False,
        compile_layers=compile_layers,
    )
    decoder.fused = fused
    if model_type == "qwen3":
        assert decoder.layer_weights[0].q_norm is not None
    prompts = [[5, 9, 17, 33, 2, 8, 41], [7, 3, 99]]
    ids = torch.zeros((2, 7), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = decoder.prefill(ids, lengths, 0)
    for step in range(4):
        for row, seq in enumerate(prompts):
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[row], reference, rtol=1e-4, atol=1e-4)
        chosen = logits.argmax(-1)
        if step == 0:
            decoder.admit(0, chosen, lengths)
        else:
            decoder.advance(2, chosen)
        for seq, token in zip(prompts, chosen.tolist(), strict=True):
            seq.append(token)
        logits = decoder.decode(2, max(len(s) for s in prompts) - 1)


def test_sliding_window_attention_runs_static_only_within_its_window() -> None:
    """Within the window a sliding-window layer attends to everything (the static path's
    attention); a context beyond it falls back, naming the window."""
    model = llama_relative("mistral", sliding_window=64)
    assert staticdecode.sliding_window(model.config) == 64
    assert staticdecode.sliding_window(llama_relative("qwen2").config) is None  # off by default
    with pytest.raises(staticdecode.StaticDecodeUnavailable, match="sliding-window attention"):
        staticdecode.StaticDecoder(
            model,
            slots=2,
            max_length=256,
            device=torch.device("cpu"),
            dtype=torch.float32,
            cuda_graphs=False,
        )
    decoder = staticdecode.StaticDecoder(
        model,
        slots=2,
        max_length=64,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cuda_graphs=False,
    )
    assert decoder.max_length == 64


def test_a_prefill_graph_that_fails_without_a_warm_up_is_captured_after_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """capture_all warms up only its first prefill graph; a later one whose capture fails
    without (a kernel only its shape loads) runs its step once and is captured again. The
    graphs themselves need CUDA: BENCHMARKS round 2 step 29 checked them on an H100."""
    decoder = object.__new__(staticdecode.StaticDecoder)
    decoder.device = torch.device("cpu")
    decoder._prefill_graphs = {}
    captures: list[bool] = []

    def capture(run: Any, warm_up: bool = True) -> tuple[Any, torch.Tensor]:
        captures.append(warm_up)
        if not warm_up:
            raise RuntimeError("operation not permitted when stream is capturing")
        return "graph", torch.zeros(1)

    monkeypatch.setattr(decoder, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with caplog.at_level(logging.WARNING, logger="metalserve.staticdecode"):
        graph, _ = decoder._prefill_graph(8, 64, warm_up=False)
    assert graph == "graph"
    assert captures == [False, True]
    assert decoder._prefill_graphs[(8, 64)][0] == "graph"
    assert "failed without a warm-up" in caplog.text
    # A capture that fails after its warm-up is a failure (the caller's fallback handles it).
    monkeypatch.setattr(decoder, "_capture", lambda run, warm_up=True: capture(run, False))
    with pytest.raises(RuntimeError):
        decoder._prefill_graph(4, 64)


class _ReplayedEagerly:
    """A CUDA graph's stand-in on the CPU: its replay runs the captured step again into the
    same output (a real capture records the step without running it; this one runs it, so a
    test sees what a capture's step would write)."""

    def __init__(self, run: Any, out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())


Capture = tuple[str, tuple[int, int], bool]


def _graphs_on_the_cpu(
    decoder: staticdecode.StaticDecoder,
    monkeypatch: pytest.MonkeyPatch,
    fail: tuple[str, tuple[int, int]] | None = None,
) -> list[Capture]:
    """``decoder`` capturing ``_ReplayedEagerly`` graphs; the captures as ("decode" or
    "prefill", its (batch or rows, length) bucket, warm-up). The capture ``fail`` names
    raises."""
    decoder.cuda_graphs = True
    captures: list[Capture] = []
    asked: list[tuple[str, tuple[int, int]]] = []  # the buckets whose step a capture ran
    prefill_inputs, decode = decoder._prefill_inputs, decoder._decode

    def asked_prefill(rows: int, length: int) -> Any:
        asked.append(("prefill", (rows, length)))
        return prefill_inputs(rows, length)

    def asked_decode(batch: int, length: int) -> torch.Tensor:
        asked.append(("decode", (batch, length)))
        return decode(batch, length)

    def capture(run: Any, warm_up: bool = True) -> tuple[Any, torch.Tensor]:
        asked.clear()
        out = run()
        captures.append((*asked[0], warm_up))
        if asked[0] == fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return _ReplayedEagerly(run, out), out

    monkeypatch.setattr(decoder, "_prefill_inputs", asked_prefill)
    monkeypatch.setattr(decoder, "_decode", asked_decode)
    monkeypatch.setattr(decoder, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return captures


@torch.inference_mode()
def test_prefill_graphs_but_the_first_are_captured_in_idle_moments(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``capture_all(defer=True)``: the largest prefill graph (with its warm-up) now, the
    other prefill buckets eager until ``capture_deferred`` captures them one a call (after
    the deferred decode graphs), largest first, without warm-ups; a capture's step writes the
    spare slot alone, never the last prefill's rows (live sequences). The same numbers
    throughout. CUDA graphs stood in for (``_ReplayedEagerly``): BENCHMARKS round 2 step 30
    ran the real ones on an H100."""
    plain = _decoder(v1, bucketed=True)
    decoder = _decoder(v1, bucketed=True)
    shapes = sorted(decoder.prefill_shapes, key=lambda s: -s[0] * s[1])
    ids, lengths = padded_prompts(v1, 2)
    shape = decoder._prefill_bucket(*ids.shape)
    assert shape in shapes[1:]
    captures = _graphs_on_the_cpu(decoder, monkeypatch, fail=("prefill", shapes[-1]))
    decoder.capture_all(defer=True)
    assert list(decoder._prefill_graphs) == shapes[:1]
    assert decoder._deferred == shapes[1:]
    assert captures[-1] == ("prefill", shapes[0], True)  # the decode graphs' before it
    assert all(warm for *_, warm in captures)
    # The deferred decode graphs come first: their warm-up steps write the rows' keys at
    # their positions (the engine captures only while no row is live).
    while decoder._deferred_decode:
        assert decoder.capture_deferred()

    # A deferred bucket: eager, no capture on the way, the unbucketed prefill's numbers.
    captured = len(captures)
    reference = plain.prefill(ids, lengths, 0)
    torch.testing.assert_close(decoder.prefill(ids, lengths, 0), reference)
    assert len(captures) == captured
    written = [cache[:2].clone() for cache in (*decoder.keys, *decoder.values)]

    # Idle moments: one capture each, largest first, no warm-up; the last one's capture
    # fails (without and then with a warm-up): logged, and a larger bucket takes its groups.
    with caplog.at_level(logging.ERROR, logger="metalserve.staticdecode"):
        left = [decoder.capture_deferred() for _ in shapes[1:]]
    assert left == [True] * (len(shapes) - 2) + [False]
    assert decoder.capture_deferred() is False
    assert captures[captured:] == [("prefill", s, False) for s in shapes[1:]] + [
        ("prefill", shapes[-1], True)
    ]
    assert list(decoder._prefill_graphs) == shapes[:-1]
    assert decoder._failed_prefill == {shapes[-1]}
    assert f"prefill graph {shapes[-1]} failed to capture; a larger bucket" in caplog.text
    for before, cache in zip(written, (*decoder.keys, *decoder.values), strict=True):
        torch.testing.assert_close(cache[:2], before)  # the live rows untouched

    # Now the bucket's graph replays: the same numbers. A group the failed bucket would hold
    # goes to the next larger one, its graph replayed: the same numbers again.
    torch.testing.assert_close(decoder.prefill(ids, lengths, 0), reference)
    one = ids[:1, :1].clone()
    assert plain._prefill_bucket(1, 1) == shapes[-1]
    assert decoder._prefill_bucket(1, 1) not in (shapes[-1], None)
    torch.testing.assert_close(
        decoder.prefill(one, torch.ones(1, dtype=torch.long), 0),
        plain.prefill(one, torch.ones(1, dtype=torch.long), 0),
    )
    assert len(captures) == captured + len(shapes)


@torch.inference_mode()
def test_decode_graphs_but_the_largest_batch_are_captured_in_idle_moments(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``capture_all(defer=True)``: each length bucket's largest batch graph now; until a
    smaller batch bucket's graph is captured (``capture_deferred``, decode graphs first, each
    with its warm-up) its steps replay the larger one, with transformers' logits; a deferred
    capture that fails leaves its steps to the larger graph. Under tensor parallelism every
    decode graph is captured at once (the ranks must run the same bucket)."""
    decoder = _decoder(v1)
    captures = _graphs_on_the_cpu(decoder, monkeypatch, fail=("decode", (1, decoder.lengths[0])))
    largest = decoder.batch_sizes[-1]
    decoder.capture_all(defer=True)
    assert sorted(decoder._graphs) == [(largest, length) for length in decoder.lengths]
    assert sorted(decoder._deferred_decode) == sorted(
        (size, length) for size in decoder.batch_sizes[:-1] for length in decoder.lengths
    )
    captured = len(captures)

    # One sequence in slot 0: its steps run in the largest batch's graph, no capture on the way.
    prompt = v1.encode(PROMPTS[0], add_special_tokens=True)
    sequence = list(prompt)
    logits = decoder.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), 0)
    decoder.admit(0, logits.argmax(-1), torch.tensor([len(prompt)]))
    sequence.append(int(logits.argmax(-1)))

    def step() -> None:
        out = decoder.decode(1, len(sequence) - 1)
        assert out.shape[0] == 1
        reference = v1.model(input_ids=torch.tensor([sequence])).logits[0, -1]
        torch.testing.assert_close(out[0], reference, rtol=1e-4, atol=1e-4)
        chosen = out.argmax(-1)
        decoder.advance(1, chosen)
        sequence.append(int(chosen))

    step()
    assert len(captures) == captured

    # Idle moments (the engine's: nothing active) capture the decode graphs first, each after
    # its warm-up step; batch 1's at the first length fails, is logged, and its steps stay
    # with the larger graph.
    with caplog.at_level(logging.ERROR, logger="metalserve.staticdecode"):
        while decoder._deferred_decode:
            decoder.capture_deferred()
    assert decoder.capture_deferred() is False  # no prefill graphs without bucketed prefill
    assert [c for c in captures[captured:] if c[0] == "prefill"] == []
    assert all(warm for *_, warm in captures[captured:])
    assert decoder._failed_decode == {(1, decoder.lengths[0])}
    assert f"decode graph {(1, decoder.lengths[0])} failed to capture" in caplog.text
    assert (2, decoder.lengths[0]) in decoder._graphs
    captured = len(captures)
    sequence[:] = prompt  # a new sequence in slot 0
    logits = decoder.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), 0)
    decoder.admit(0, logits.argmax(-1), torch.tensor([len(prompt)]))
    sequence.append(int(logits.argmax(-1)))
    step()
    assert len(captures) == captured

    parallel = _decoder(v1)
    _graphs_on_the_cpu(parallel, monkeypatch)
    parallel.tp = SimpleNamespace(rank=0, world=2)
    parallel.capture_all(defer=True)
    assert parallel._deferred_decode == []
    assert len(parallel._graphs) == len(parallel.batch_sizes) * len(parallel.lengths)


def test_the_engine_captures_deferred_graphs_only_while_idle(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine asks its batch for deferred captures between steps while no sequence is
    active, one at a time, until the batch says none is left; requests meanwhile are served
    (a submission waits for one capture at most). ``metalserve_deferred_graphs`` says how many
    are left, from the switch on."""
    calls: list[int] = []
    reported: list[float] = []

    def capture_deferred(self: StaticBatch) -> bool:
        calls.append(len(self))
        time.sleep(0.005)
        return len(calls) < 40

    def deferred_count(self: StaticBatch) -> int:
        return 40 - len(calls)

    monkeypatch.setattr(StaticBatch, "capture_deferred", capture_deferred)
    monkeypatch.setattr(StaticBatch, "deferred_count", deferred_count)
    metrics = Metrics()
    monkeypatch.setattr(
        metrics,
        "deferred_graphs",
        lambda count: (reported.append(count), metrics.graphs_deferred.set(count)),
    )
    eng = Engine(max_batch_size=4, decode_mode="static", observer=metrics)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        params = dataclasses.replace(GREEDY, max_tokens=8)
        _, sink = submit(eng, v1, PROMPTS[0], params)
        assert isinstance(sink.wait(), Finished)
        assert sink.text == alone(v1, PROMPTS[0], params)
        deadline = time.monotonic() + 10
        while len(calls) < 40:
            assert time.monotonic() < deadline, f"{len(calls)} captures asked for"
            time.sleep(0.01)
        time.sleep(3 * eng.idle_wait)
        assert len(calls) == 40, "asked again after the batch said none was left"
        assert set(calls) == {0}, "asked while sequences were active"
        assert reported == list(range(40, -1, -1))
        assert metrics.registry.get_sample_value("metalserve_deferred_graphs") == 0
    finally:
        eng.stop()


def test_deferred_work_that_fails_costs_the_engine_nothing(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the batch's deferred work (outside a step) is logged and not tried again;
    the engine thread lives on and serves."""
    calls: list[int] = []

    def capture_deferred(self: StaticBatch) -> bool:
        calls.append(len(self))
        raise RuntimeError("no more graphs")

    monkeypatch.setattr(StaticBatch, "capture_deferred", capture_deferred)
    eng = Engine(max_batch_size=4, decode_mode="static")
    eng.start()
    try:
        with caplog.at_level(logging.ERROR, logger="metalserve.engine"):
            eng.swap(v1).result(timeout=10)
            deadline = time.monotonic() + 10
            while not calls:
                assert time.monotonic() < deadline, "no deferred work asked for"
                time.sleep(0.01)
            time.sleep(3 * eng.idle_wait)
        assert calls == [0]
        assert "deferred work failed" in caplog.text
        assert eng.is_alive()
        params = dataclasses.replace(GREEDY, max_tokens=4)
        _, sink = submit(eng, v1, PROMPTS[0], params)
        assert isinstance(sink.wait(), Finished)
    finally:
        eng.stop()


def test_no_deferred_capture_runs_under_a_profile(
    v1: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """While a profile is asked for (its passes must be the served ones, as a switch ends one
    before capturing), the idle engine leaves its batch's deferred work alone; after it, on."""
    calls: list[float] = []

    def capture_deferred(self: StaticBatch) -> bool:
        calls.append(time.monotonic())
        time.sleep(0.002)
        return True  # always more: only the profile stops them

    monkeypatch.setattr(StaticBatch, "capture_deferred", capture_deferred)
    eng = Engine(max_batch_size=4, decode_mode="static")
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline, "no deferred work asked for"
            time.sleep(0.01)
        asked = time.monotonic()
        profile = eng.profile(passes=10, max_seconds=1.0, directory=tmp_path)
        # Its end as the engine thread ends it, before that thread's next capture.
        ended: list[float] = []
        profile.future.add_done_callback(lambda _: ended.append(time.monotonic()))
        with pytest.raises(RuntimeError, match="no forward pass ran"):
            profile.future.result(timeout=30)  # no request: it expires unrecorded
        deadline = time.monotonic() + 10
        while not ended:  # the callback runs after result() wakes
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ended[0] - asked >= 1.0
        # One capture may run after the profile was asked: the loop chose it just before (a
        # loaded host may start it late). Without the check, hundreds would.
        assert len([t for t in calls if asked < t < ended[0]]) <= 1
        resumed = len(calls)
        while len(calls) == resumed:
            assert time.monotonic() < deadline, "deferred work not resumed"
            time.sleep(0.01)
    finally:
        eng.stop()
