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

    Greedy rows take the argmax. Sampled rows, together: temperature and top-p as transformers'
    ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` apply them, then a draw by the
    exponential race (the argmax of each probability over an Exp(1) sample: token ``k`` with
    probability ``p_k``), each row's samples from its own generator, so that a row's draws
    depend on its seed only, never on its batch mates. No host sync: ``torch.multinomial``
    would wait for the device twice a row (its checks read values back), and the warpers per
    row launched a dozen kernels each.
    """
    import torch

    from metalserve import devices

    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen
    device = logits.device
    index = devices.upload(torch.tensor(rows), device)
    temperature = devices.upload(torch.tensor([params[i].temperature for i in rows]), device)
    scores = logits.index_select(0, index).float() / temperature[:, None]
    top_p = [params[i].top_p for i in rows]
    if min(top_p) < 1.0:
        kept = devices.upload(torch.tensor(top_p, dtype=torch.float32), device)
        ascending, order = scores.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        dropped = cumulative <= (1 - kept)[:, None]
        dropped[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(dropped.scatter(1, order, dropped), -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs)
    for n, row in enumerate(rows):
        race[n].exponential_(generator=generators[row])
    drawn = (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(dim=-1)
    # NaN/inf logits (e.g. a float16 overflow) must not fail the whole batch's step: such a
    # row falls back to its greedy token (torch.where: no host sync).
    valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    return chosen.index_copy(0, index, torch.where(valid, drawn, chosen.index_select(0, index)))
