"""What the two processes of a replica send each other (pickled over one socket pair)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metalserve.engine import Event
from metalserve.loader import ModelView
from metalserve.sampling import SamplingParams
from metalserve.settings import ServeSettings

# The observer calls the engine's process forwards (``metalserve.metrics.Metrics`` methods).
OBSERVED = frozenset(
    {
        "forward_pass",
        "engine_state",
        "request_queued",
        "prefix_cache",
        "first_token",
        "sequence_finished",
        "cache_load",
        "gc_pause",
        "deferred_graphs",
    }
)
# The calls the engine's process answers (``process.Core``'s ``call_<name>`` methods; ``swap``
# on its reader thread, in order with the sequences around it).
CALLS = frozenset({"start", "load", "swap", "abort_all", "wedge", "profile", "stop"})


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What ``/version`` tells of the engine's decode path, once a model went live (the
    ``Engine`` properties of the same names)."""

    decode_path: str | None
    decode_compiled: bool
    decode_gemm_tuning: list[dict[str, Any]]
    prefix_cache_tokens_held: int
    weight_bytes: int | None
    batch_slots: int
    modeling: str | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    """API -> engine, first: what to serve and how."""

    settings: ServeSettings
    idle_wait: float
    reload_headroom: bool


@dataclass(frozen=True, slots=True)
class Submit:
    """API -> engine: one sequence, prepared for ``version_id``."""

    rid: int
    version_id: str
    prompt_ids: list[int]
    params: SamplingParams
    endpoint: str
    created_at: float  # monotonic: one clock for both processes


@dataclass(frozen=True, slots=True)
class Cancel:
    rid: int


@dataclass(frozen=True, slots=True)
class Call:
    """API -> engine: a call by name (``CALLS``), answered by a ``Reply`` with its ``cid``."""

    cid: int
    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    cid: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """A sequence's phase times and tokens once it ended (tracing's spans)."""

    admitted_at: float | None
    first_token_at: float | None
    finished_at: float | None
    generated: list[int]


@dataclass(frozen=True, slots=True)
class Step:
    """Engine -> API, after each engine iteration (and each heartbeat) with anything to say:
    events by sequence, the ended sequences, and observer calls (name, arguments), in the order
    they happened."""

    # A text delta as its text alone: unpickling a str is a tenth of a dataclass's (32 deltas:
    # 2 us against 31 us of the API process's time, every engine step).
    events: list[tuple[int, str | Event]]
    ended: list[tuple[int, Ended]]
    observed: list[tuple[str, tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class Loaded:
    """Engine -> API: a version loaded and verified, before its warm-up (the start or load call
    answers once it is warm and live): the API builds its tokenizer meanwhile."""

    view: ModelView


@dataclass(frozen=True, slots=True)
class Live:
    """Engine -> the other API processes (``serve --api-processes``): from now on sequences are
    prepared for ``view``'s version (it was told ``Loaded`` before); each answers ``Switched``.
    The first API process learns it from its own start or swap call."""

    view: ModelView


@dataclass(frozen=True, slots=True)
class Switched:
    """Another API process -> engine, after ``Live``: every sequence it prepared for an earlier
    version came before this on its socket (a swap waits for it)."""

    version_id: str


@dataclass(frozen=True, slots=True)
class Beat:
    """Engine -> API: the engine loop's last sign of progress (monotonic)."""

    at: float
