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


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
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
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick the next token of every row of ``logits`` ([batch, vocab]); one host sync."""
    tokens: list[int] = choose_tokens_tensor(logits, params, generators).tolist()
    return tokens


# A chosen token's log-probability, and the most likely tokens of its position with theirs.
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


class Logprobs:
    """The log-probabilities a step's rows asked for (``token_logprobs``): computed on the
    device when launched, brought to the host by ``read`` in one copy. Read after the step's
    tokens are on the host, the copy waits for nothing else: the step keeps one wait."""

    def __init__(
        self, rows: int, asked: dict[int, int], packed: torch.Tensor | None = None
    ) -> None:
        self._rows, self._asked, self._packed = rows, asked, packed

    def read(self) -> list[TokenLogprob | None]:
        result: list[TokenLogprob | None] = [None] * self._rows
        if self._packed is None:
            return result
        # Per asking row: its token's log-probability, then the k best values, then their ids.
        packed: list[list[float]] = self._packed.tolist()
        k = (len(packed[0]) - 1) // 2
        for values, (row, wanted) in zip(packed, self._asked.items(), strict=True):
            best = zip(values[1 + k : 1 + k + wanted], values[1 : 1 + wanted], strict=True)
            result[row] = (values[0], tuple((int(token), value) for token, value in best))
        return result


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, params: Sequence[SamplingParams]
) -> Logprobs:
    """For the rows whose request asked for logprobs: the chosen token's log-probability under
    the model (before temperature and top-p) and the ``logprobs`` most likely tokens. Nothing is
    computed when no row asks; otherwise launched here, without a host sync, and read later."""
    asked = {i: p.logprobs for i, p in enumerate(params) if p.logprobs is not None}
    if not asked:
        return Logprobs(len(params), {})
    import torch

    from metalserve import devices

    index = devices.upload(torch.tensor(list(asked)), logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = logprobs.gather(1, chosen.index_select(0, index)[:, None])
    top = logprobs.topk(max(1, *asked.values()), dim=-1)
    # One tensor, one copy to the host: float64 holds every token id exactly.
    packed = torch.cat([picked.double(), top.values.double(), top.indices.double()], dim=1)
    return Logprobs(len(params), asked, packed)


def choose_tokens_tensor(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row of ``logits`` ([batch, vocab]), as a tensor on its device.

    Greedy rows take the argmax. Sampled rows, together: temperature and top-p as transformers'
    ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` apply them, then a draw by the
    exponential race (the argmax of each probability over an Exp(1) sample: token ``k`` with
    probability ``p_k``), each row's samples from its own generator, so that a row's draws
    depend on its seed only, never on its batch mates. No host sync: ``torch.multinomial``
    would wait for the device twice a row (its checks read values back), and the warpers per
    row launched a dozen kernels each. A greedy row needs no generator (``None``).
    """
    import torch

    from metalserve import devices

    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return chosen
    drawing = [generators[i] for i in rows]
    if any(g is None for g in drawing):
        raise ValueError("a sampled row needs its generator")
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
    for n, generator in enumerate(drawing):
        race[n].exponential_(generator=generator)
    drawn = (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(dim=-1)
    # NaN/inf logits (e.g. a float16 overflow) must not fail the whole batch's step: such a
    # row falls back to its greedy token (torch.where: no host sync).
    valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    return chosen.index_copy(0, index, torch.where(valid, drawn, chosen.index_select(0, index)))
