from __future__ import annotations

import pytest
import torch

from metalserve.sampling import SamplingParams, choose_tokens, make_generator, token_logprobs

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


def test_greedy_rows_need_no_generator_and_sampled_rows_do() -> None:
    """A greedy sequence gets no generator (``Sequence.start``): its row is the argmax with
    ``None`` in its place; a sampled row without one is refused, not drawn from a shared RNG."""
    values = logits()
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sampled = SamplingParams(max_tokens=1, temperature=1.0)
    assert choose_tokens(values, [greedy] * 3, [None] * 3) == values.argmax(-1).tolist()
    mixed = [greedy, sampled, greedy]
    tokens = choose_tokens(values, mixed, [None, make_generator(CPU, 5), None])
    assert tokens[0::2] == values[0::2].argmax(-1).tolist()
    with pytest.raises(ValueError, match="generator"):
        choose_tokens(values, mixed, [None, None, None])


def test_non_finite_logits_fall_back_to_greedy() -> None:
    values = logits()
    values[1, 7] = float("inf")
    values[2] = float("nan")
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=1)] * 3
    tokens = choose_tokens(values, params, [make_generator(CPU, 1) for _ in range(3)])
    assert tokens[1] == 7
    assert 0 <= tokens[2] < 50


def test_logprobs_only_for_the_rows_that_ask() -> None:
    values = logits()
    params = [
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=0),
    ]
    chosen = values.argmax(-1)
    result = token_logprobs(values, chosen, params).read()
    expected = torch.log_softmax(values, dim=-1)
    assert result[1] is None
    first, third = result[0], result[2]
    assert first is not None
    assert third is not None
    assert first[0] == pytest.approx(expected[0, chosen[0]].item(), abs=1e-6)
    assert [token for token, _ in first[1]] == expected[0].topk(3).indices.tolist()
    assert all(type(token) is int for token, _ in first[1])
    assert [value for _, value in first[1]] == pytest.approx(
        expected[0].topk(3).values.tolist(), abs=1e-6
    )
    assert third[1] == ()
    assert token_logprobs(values, chosen, [params[1]] * 3).read() == [None] * 3


def test_logprobs_keep_token_ids_beyond_float32s_integers() -> None:
    """The ids travel to the host beside the values in one float64 tensor: exact up to 2**53
    (float32 would round 2**24 + 3 to its neighbour)."""
    values = torch.zeros(1, 2**24 + 4)
    values[0, 2**24 + 3] = 5.0
    chosen = values.argmax(-1)
    params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=1)]
    result = token_logprobs(values, chosen, params).read()[0]
    assert result is not None
    assert result[1][0][0] == 2**24 + 3


def _draw_counts(values: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """How often each token of ``values`` ([vocab]) was drawn in ``draws`` rows, each row with
    its own seeded generator (one batch)."""
    batch = values.expand(draws, -1)
    tokens = choose_tokens(batch, [params] * draws, [make_generator(CPU, i) for i in range(draws)])
    return torch.bincount(torch.tensor(tokens), minlength=values.numel()).float()


def _warped(values: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities transformers' own warpers give (what sampling must draw from)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(params.temperature)(None, values[None])
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_draws_follow_transformers_warped_distribution(temperature: float, top_p: float) -> None:
    """Temperature and top-p as transformers' warpers, and draws at their probabilities: every
    token's share of 20,000 draws within 4.5 standard deviations, none outside top-p's set."""
    torch.manual_seed(3)
    values = torch.randn(12) * 1.5
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    expected = _warped(values, params)
    draws = 20_000
    counts = _draw_counts(values, params, draws)
    assert counts[expected == 0].sum() == 0, "a token top-p removed was drawn"
    sigma = (draws * expected * (1 - expected)).sqrt()
    assert ((counts - draws * expected).abs() <= 4.5 * sigma + 1).all(), (counts, draws * expected)
    if top_p < 1.0:
        assert (expected == 0).any(), "the case must remove tokens to test top-p"
