"""Cross-replica consistency check: the same greedy requests must give the same text everywhere.

Run after a rolling update, and periodically (a systemd timer on the load balancers): replicas
that disagree serve different weights (or a different tokenizer, template or code), whatever their
/version claims.

Greedy output is not bit-exact across batch sizes: a replica batching live traffic may add in
another order than one running alone, and in bfloat16 two nearly equal candidates can then swap.
So each answer comes with the tokens' log-probabilities (``logprobs=2``), and two texts that part
where both replicas saw the two tokens within ``tolerance`` nats of each other are a tie, counted
apart and never a difference; past that point the texts say nothing more. A replica with other
weights parts from the others where one candidate leads by far, or already differs in what it
ranks as the two best.
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEFAULT_PROMPT = "The quick brown fox"
DEFAULT_MAX_TOKENS = 32
# Nats between the two best candidates under which a swap is a numerical tie. bfloat16 keeps 8
# bits of mantissa: logits of 10 to 30 move by up to about 0.1 with the summation order.
DEFAULT_TOLERANCE = 0.25
# The periodic check's prompts (``--prompts K`` takes the first K; the first is DEFAULT_PROMPT):
# varied openings, so that one check covers more of the vocabulary and the weights.
PROMPTS = (
    DEFAULT_PROMPT,
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "Water boils at",
    "The three primary colors are",
    "Dear customer, thank you for",
)


class Verdict(Enum):
    SAME = "same"
    TIE = "tie"  # parted on a numerical tie: not a difference
    DIFFERENT = "different"


@dataclass(frozen=True, slots=True)
class ReplicaAnswer:
    url: str
    version_id: str | None
    text: str | None
    error: str | None = None
    # Per generated token: its text, its log-probability, the two best candidates with theirs.
    tokens: tuple[str, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[dict[str, float], ...] = ()
    model: str | None = None  # as /version names it

    @property
    def ok(self) -> bool:
        return self.error is None


def ask(
    client: httpx.Client,
    url: str,
    prompt: str,
    *,
    model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ReplicaAnswer:
    base = url.rstrip("/")
    version_id = None
    try:
        version = client.get(f"{base}/version")
        version.raise_for_status()
        info = version.json()
        version_id = info.get("version_id")
        response = client.post(
            f"{base}/v1/completions",
            json={
                "model": model or info["model"],
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "seed": 0,
                "logprobs": 2,
            },
        )
        response.raise_for_status()
        choice = response.json()["choices"][0]
        logprobs = choice.get("logprobs") or {}
        return ReplicaAnswer(
            url,
            version_id,
            str(choice["text"]),
            tokens=tuple(logprobs.get("tokens", ())),
            token_logprobs=tuple(logprobs.get("token_logprobs", ())),
            top_logprobs=tuple(logprobs.get("top_logprobs", ())),
            model=info.get("model"),
        )
    except httpx.HTTPStatusError as exc:
        return ReplicaAnswer(url, version_id, None, f"HTTP {exc.response.status_code}")
    except httpx.HTTPError as exc:
        return ReplicaAnswer(url, version_id, None, f"unreachable: {type(exc).__name__}")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return ReplicaAnswer(url, version_id, None, f"bad response: {exc}")


def _gap(answer: ReplicaAnswer, position: int, other: str) -> float | None:
    """How far, in nats, ``answer``'s token at ``position`` led ``other`` there (None: ``other``
    was not among its two best)."""
    top = answer.top_logprobs[position] if position < len(answer.top_logprobs) else {}
    if other not in top or position >= len(answer.token_logprobs):
        return None
    return answer.token_logprobs[position] - top[other]


def compare(a: ReplicaAnswer, b: ReplicaAnswer, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Two answers to one greedy prompt: the same text, a tie where they part, or different."""
    if a.text == b.text:
        return Verdict.SAME
    for position, (mine, theirs) in enumerate(zip(a.tokens, b.tokens, strict=False)):
        if mine == theirs:
            continue
        gaps = (_gap(a, position, theirs), _gap(b, position, mine))
        if all(gap is not None and gap <= tolerance for gap in gaps):
            return Verdict.TIE
        return Verdict.DIFFERENT
    # One stopped early, or the texts differ without any token that does (no logprobs).
    return Verdict.DIFFERENT


@dataclass
class ReplicaResult:
    url: str
    version_id: str | None = None
    same: int = 0
    ties: int = 0
    different: int = 0
    errors: int = 0
    first_error: str | None = None

    @property
    def consistent(self) -> bool:
        return self.different == 0 and self.errors == 0


@dataclass
class Report:
    """The answers to each prompt, and each replica's verdicts against the most common answer."""

    prompts: list[str]
    answers: list[list[ReplicaAnswer]]  # [prompt][replica]
    replicas: list[ReplicaResult] = field(default_factory=list)
    # Prompts on which some replica failed or answered differently.
    differing_prompts: int = 0

    @property
    def consistent(self) -> bool:
        return all(r.consistent for r in self.replicas)

    @property
    def difference_rate(self) -> float:
        return self.differing_prompts / len(self.prompts) if self.prompts else 0.0


def _groups(answers: Sequence[ReplicaAnswer]) -> list[str | None]:
    return [text for text, _ in Counter(a.text for a in answers if a.ok).most_common()]


def _reference(answers: Sequence[ReplicaAnswer]) -> ReplicaAnswer | None:
    """The first answer with the most common text (ties: the earliest replica's)."""
    counts = Counter(a.text for a in answers if a.ok)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a.ok and counts[a.text] == top)


def check(
    urls: Sequence[str],
    prompts: Sequence[str] = (DEFAULT_PROMPT,),
    *,
    model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout: float = 60.0,
    tolerance: float = DEFAULT_TOLERANCE,
    verify: ssl.SSLContext | bool = True,
    per_version: bool = False,
) -> Report:
    """Ask every replica every prompt, one request at a time; compare each with the most
    common answer (``per_version``: the most common among the replicas that report its version,
    for the periodic check, which runs while a rollout or a split serves two versions by design).
    ``verify``: the TLS context of https replicas (the cluster CA, a client certificate)."""
    report = Report(list(prompts), [], [ReplicaResult(u) for u in urls])
    with httpx.Client(timeout=timeout, verify=verify) as client:
        for prompt in prompts:
            answers = [ask(client, u, prompt, model=model, max_tokens=max_tokens) for u in urls]
            report.answers.append(answers)
            references = {
                version: _reference(
                    [a for a in answers if a.version_id == version] if per_version else answers
                )
                for version in {a.version_id for a in answers}
            }
            differs = False
            for result, answer in zip(report.replicas, answers, strict=True):
                result.version_id = answer.version_id or result.version_id
                reference = references[answer.version_id]
                if not answer.ok or reference is None:
                    result.errors += 1
                    result.first_error = result.first_error or answer.error
                    differs = True
                    continue
                verdict = compare(reference, answer, tolerance)
                if verdict is Verdict.SAME:
                    result.same += 1
                elif verdict is Verdict.TIE:
                    result.ties += 1
                else:
                    result.different += 1
                    differs = True
            report.differing_prompts += differs
    return report


def render_table(answers: Sequence[ReplicaAnswer]) -> str:
    """One row per replica; identical outputs share a group letter (A is the most common)."""
    groups = {text: chr(ord("A") + i) for i, text in enumerate(_groups(answers))}
    rows = [("replica", "version", "group", "output")]
    for a in answers:
        output = repr(a.text)[:60] if a.ok else a.error or "?"
        rows.append(
            (a.url, (a.version_id or "?")[:12], groups.get(a.text, "-") if a.ok else "FAIL", output)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        for row in rows
    )


def render_summary(report: Report) -> str:
    """Per replica, its verdicts over every prompt (the periodic check's table)."""
    rows = [("replica", "version", "same", "ties", "different", "errors")]
    for r in report.replicas:
        rows.append(
            (
                r.url,
                (r.version_id or "?")[:12],
                str(r.same),
                str(r.ties),
                str(r.different),
                str(r.errors) + (f" ({r.first_error})" if r.first_error else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def _run_gauges(registry: CollectorRegistry, model: str, skipped: bool) -> None:
    """Every run's: when it ended, and whether it compared anything."""
    from prometheus_client import Gauge

    Gauge(
        "metalserve_consistency_skipped",
        "1 when the last run found a replica drained (a change under way) and compared nothing",
        ["model"],
        registry=registry,
    ).labels(model).set(int(skipped))
    Gauge(
        "metalserve_consistency_last_run_timestamp_seconds",
        "When the last consistency check ended",
        ["model"],
        registry=registry,
    ).labels(model).set_to_current_time()


def write_skipped(path: Path, model: str) -> None:
    """A run that compared nothing: no comparison gauges (no stale verdict stays exported)."""
    from prometheus_client import CollectorRegistry, write_to_textfile

    registry = CollectorRegistry()
    _run_gauges(registry, model, skipped=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def write_textfile(report: Report, path: Path, model: str) -> None:
    """The result for node_exporter's textfile collector (written atomically)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    _run_gauges(registry, model, skipped=False)
    labels = ["model"]
    Gauge(
        "metalserve_consistency_prompts",
        "Prompts the last consistency check sent every replica",
        labels,
        registry=registry,
    ).labels(model).set(len(report.prompts))
    Gauge(
        "metalserve_consistency_difference_rate",
        "Share of the last check's prompts on which some replica failed or answered differently",
        labels,
        registry=registry,
    ).labels(model).set(report.difference_rate)
    per_replica = {
        "different": ("metalserve_consistency_replica_different", "Prompts answered differently"),
        "ties": ("metalserve_consistency_replica_ties", "Prompts parted on a numerical tie"),
        "errors": ("metalserve_consistency_replica_errors", "Prompts without an answer"),
    }
    for attribute, (name, help_text) in per_replica.items():
        gauge = Gauge(name, help_text, ["model", "replica"], registry=registry)
        for r in report.replicas:
            gauge.labels(model, r.url).set(getattr(r, attribute))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
