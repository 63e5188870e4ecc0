from __future__ import annotations

import torch

from metalserve.sampling import SamplingParams, choose_tokens, make_generator

CPU = torch.device("cpu")


def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 50)


def test_greedy_rows_take_the_argmax() -> None:
    values = logits()
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 3
    tokens = choose_tokens(values, params, [make_generator(CPU, 0)] * 3)
    assert tokens == values.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_row_independent() -> None:
    values = logits()
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=5)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    draws = [
        choose_tokens(
            values,
            [greedy, sampled, greedy],
            [make_generator(CPU, None), make_generator(CPU, 5), make_generator(CPU, None)],
        )[1]
        for _ in range(5)
    ]
    alone = choose_tokens(values[1:2], [sampled], [make_generator(CPU, 5)])[0]
    assert set(draws) == {alone}


def test_tiny_top_p_means_argmax() -> None:
    values = logits()
    params = [SamplingParams(max_tokens=1, temperature=1.5, top_p=1e-6)] * 3
    generators = [make_generator(CPU, i) for i in range(3)]
    assert choose_tokens(values, params, generators) == values.argmax(-1).tolist()


def test_unseeded_generators_differ() -> None:
    values = torch.zeros(1, 1000)
    params = [SamplingParams(max_tokens=1, temperature=1.0)]
    draws = {choose_tokens(values, params, [make_generator(CPU, None)])[0] for _ in range(5)}
    assert len(draws) > 1


def test_tiny_temperature_is_greedy() -> None:
    values = logits()
    params = [SamplingParams(max_tokens=1, temperature=5e-324)] * 3
    generators = [make_generator(CPU, i) for i in range(3)]
    assert choose_tokens(values, params, generators) == values.argmax(-1).tolist()


def test_non_finite_logits_fall_back_to_greedy() -> None:
    values = logits()
    values[1, 7] = float("inf")
    values[2] = float("nan")
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=1)] * 3
    tokens = choose_tokens(values, params, [make_generator(CPU, 1) for _ in range(3)])
    assert tokens[1] == 7
    assert 0 <= tokens[2] < 50
