"""metalserve.engine.sequence: finish reasons, usage, stop strings and EOS of one sequence."""

from __future__ import annotations

from engine_helpers import GREEDY, alone, submit
from metalserve.engine import Engine, Event, Finished, Sequence
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams


def test_finish_reasons_and_usage(engine: Engine, v1: LoadedModel) -> None:
    _, sink = submit(
        engine, v1, "Hi", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    )
    finished = sink.wait()
    assert finished == Finished("length", len(v1.encode("Hi", add_special_tokens=True)), 5)

    full = alone(v1, "Hi", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop = full[5:8]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    _, sink = submit(
        engine,
        v1,
        "Hi",
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,), ignore_eos=True),
    )
    finished = sink.wait()
    assert isinstance(finished, Finished)
    assert finished.reason == "stop"
    assert sink.text == full[: full.index(stop)]


def test_eos_ends_a_sequence(v1: LoadedModel) -> None:
    eos = next(iter(v1.eos_token_ids))
    events: list[Event] = []
    params = SamplingParams(max_tokens=5, temperature=0.0)
    seq = Sequence(bundle=v1, prompt_ids=[1], params=params, sink=events.append)
    seq.start()
    seq.append(eos, None)
    assert events == [Finished("stop", 1, 1)]

    # ignore_eos (benchmarks): the EOS token is just another token.
    events.clear()
    seq = Sequence(bundle=v1, prompt_ids=[1], params=GREEDY, sink=events.append)
    seq.start()
    seq.append(eos, None)
    assert not seq.done
