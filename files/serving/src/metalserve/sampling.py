"""Per-sequence sampling parameters and the batched token choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one request asked for (already validated by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Completions' logprobs: report each chosen token's log-probability and this many of the
    # most likely tokens at its position (None: nothing).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # Dividing logits by a tiny temperature overflows to inf; it means greedy anyway.
        return self.temperature < GREEDY_BELOW


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A private RNG per sequence: its samples depend on its seed only, never on batch mates."""
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """Pick the next token of every row of ``logits`` ([batch, vocab]); one host sync."""
    tokens: list[int] = choose_tokens_tensor(logits, params, generators).tolist()
    return tokens


# A chosen token's log-probability, and the most likely tokens of its position with theirs.
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprob | None]:
    """For the rows whose request asked for logprobs: the chosen token's log-probability under
    the model (before temperature and top-p) and the ``logprobs`` most likely tokens. Nothing is
    computed, and no host sync made, when no row asks."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return result
    import torch

    index = torch.tensor(rows, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = logprobs.gather(1, chosen.index_select(0, index)[:, None]).squeeze(1).tolist()
    k = max(1, *(params[i].logprobs or 0 for i in rows))
    top = logprobs.topk(k, dim=-1)
    values, ids = top.values.tolist(), top.indices.tolist()
    for n, row in enumerate(rows):
        wanted = params[row].logprobs or 0
        result[row] = (picked[n], tuple(zip(ids[n][:wanted], values[n][:wanted], strict=True)))
    return result


def choose_tokens_tensor(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """The next token of every row of ``logits`` ([batch, vocab]), as a tensor on its device.

    Greedy rows take the argmax (batched, on the device); sampled rows apply temperature and
    top-p with transformers' logits warpers and draw from their own generator. No host sync.
    """
    import torch

    chosen = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return chosen
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scores = TemperatureLogitsWarper(p.temperature)(None, logits[row : row + 1].float())
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        probs = torch.softmax(scores, dim=-1)
        # NaN/inf logits (e.g. a float16 overflow) must not fail the whole batch's step (on CUDA
        # an invalid distribution is a device-side assert that kills the context): such a row
        # falls back to its greedy token. torch.where keeps this free of host syncs.
        valid = torch.isfinite(probs).all() & (probs.sum() > 0)
        greedy_only = torch.nn.functional.one_hot(chosen[row : row + 1], probs.shape[-1])
        probs = torch.where(valid, torch.nan_to_num(probs, nan=0.0), greedy_only.to(probs.dtype))
        chosen[row] = torch.multinomial(probs, num_samples=1, generator=generator)[0, 0]
    return chosen
