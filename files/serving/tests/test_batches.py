"""metalserve.engine.batches on the dynamic path (the static one: test_staticdecode): batch
invariance under continuous batching, seeded sampling, cancelled rows leaving."""

from __future__ import annotations

import dataclasses

from engine_helpers import GREEDY, PROMPTS, alone, submit
from metalserve.engine import Engine, Failed, Finished
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams


def test_batched_outputs_equal_solo_outputs(engine: Engine, v1: LoadedModel) -> None:
    expected = [alone(v1, p) for p in PROMPTS]

    # Three start together; the rest join while those are mid-generation (continuous batching,
    # different cache lengths), and the batch limit (4) makes two of them wait in the queue.
    first = [submit(engine, v1, p) for p in PROMPTS[:3]]
    first[0][1].first.wait(10)
    later = [submit(engine, v1, p) for p in PROMPTS[3:]]
    sinks = [s for _, s in first + later]
    for sink in sinks:
        assert isinstance(sink.wait(), Finished)

    assert [s.text for s in sinks] == expected
    sequential_passes = len(PROMPTS) * GREEDY.max_tokens
    assert engine.forward_passes < sequential_passes * 0.6


def test_seeded_sampling_does_not_depend_on_batch_mates(engine: Engine, v1: LoadedModel) -> None:
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    expected = alone(v1, PROMPTS[0], sampled)
    others = [
        submit(engine, v1, p, dataclasses.replace(sampled, seed=i))
        for i, p in enumerate(PROMPTS[1:4])
    ]
    _, target = submit(engine, v1, PROMPTS[0], sampled)
    target.wait()
    for _, sink in others:
        sink.wait()
    assert target.text == expected
    assert expected != alone(v1, PROMPTS[0], dataclasses.replace(sampled, seed=99))


def test_cancelled_sequence_is_dropped(v1: LoadedModel) -> None:
    eng = Engine(max_batch_size=4, step_delay=0.01)
    eng.start()
    try:
        eng.swap(v1).result(timeout=10)
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        seq, sink = submit(eng, v1, "Hi", long)
        _, short = submit(eng, v1, "Once", SamplingParams(max_tokens=3, temperature=0.0))
        sink.first.wait(10)
        seq.cancel()
        event = sink.wait(10)
        assert isinstance(event, Failed)
        assert event.status == 499
        assert len(seq.generated) < 100
        assert isinstance(short.wait(), Finished)
    finally:
        eng.stop()
