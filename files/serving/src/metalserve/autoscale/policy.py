"""The autoscaler's decision: pure, deterministic, and the only place its rules live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["promote", "retire", "hold"]


@dataclass(frozen=True)
class Policy:
    """When to act. ``scale_up_at`` > ``scale_down_at`` (hysteresis: between the two nothing
    changes), each crossed for ``up_after``/``down_after`` consecutive evaluations, at most one
    action per ``cooldown_s``; the replicas in rotation stay within ``min_active..max_active``."""

    scale_up_at: float
    scale_down_at: float
    up_after: int = 2
    down_after: int = 6
    cooldown_s: float = 60.0
    min_active: int = 1
    max_active: int | None = None
    ttft_p99_up_at: float | None = None  # seconds; None: the TTFT is not a signal

    def __post_init__(self) -> None:
        if self.scale_down_at >= self.scale_up_at:
            raise ValueError(
                f"scale_down_at ({self.scale_down_at}) must be below scale_up_at "
                f"({self.scale_up_at}): the gap between them is the hysteresis"
            )
        if self.up_after < 1 or self.down_after < 1:
            raise ValueError("up_after and down_after must be at least 1")
        if self.min_active < 1:
            raise ValueError("min_active must be at least 1")
        if self.max_active is not None and self.max_active < self.min_active:
            raise ValueError(
                f"max_active ({self.max_active}) is below min_active ({self.min_active})"
            )


@dataclass(frozen=True)
class Observation:
    """One evaluation's view: servers in rotation and idle standbys (names; healthy only), the
    requests running and waiting on the servers in rotation, and the TTFT p99 if measured."""

    active: tuple[str, ...]
    standbys: tuple[str, ...]  # healthy, weight 0 now, weight 0 in the configuration
    promoted: tuple[str, ...]  # in rotation now, weight 0 in the configuration (may retire)
    requests: float | None  # running + waiting over the servers in rotation; None: unknown
    ttft_p99_s: float | None = None

    @property
    def load(self) -> float | None:
        """Requests per server in rotation."""
        if self.requests is None or not self.active:
            return None
        return self.requests / len(self.active)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    server: str | None = None


@dataclass
class State:
    """What the policy remembers between evaluations."""

    above: int = 0  # consecutive evaluations over the scale-up signal
    below: int = 0  # consecutive evaluations under the scale-down threshold
    last_action_at: float | None = None


def decide(policy: Policy, state: State, seen: Observation, now: float) -> Decision:
    """The decision for ``seen`` at monotonic time ``now``; updates ``state``."""
    load = seen.load
    if load is None:
        state.above = state.below = 0
        return Decision("hold", "no load figure for the servers in rotation")
    hot = load > policy.scale_up_at or (
        policy.ttft_p99_up_at is not None
        and seen.ttft_p99_s is not None
        and seen.ttft_p99_s > policy.ttft_p99_up_at
    )
    cold = load < policy.scale_down_at and not hot
    state.above = state.above + 1 if hot else 0
    state.below = state.below + 1 if cold else 0
    figures = f"load {load:.1f} per server in rotation ({len(seen.active)})"
    if seen.ttft_p99_s is not None:
        figures += f", TTFT p99 {seen.ttft_p99_s:.3f}s"
    cooling = state.last_action_at is not None and now - state.last_action_at < policy.cooldown_s
    if hot and state.above >= policy.up_after:
        if policy.max_active is not None and len(seen.active) >= policy.max_active:
            return Decision("hold", f"{figures}: at max_active")
        if not seen.standbys:
            return Decision("hold", f"{figures}: no healthy standby left")
        if cooling:
            return Decision("hold", f"{figures}: cooling down")
        return _act(state, now, Decision("promote", figures, sorted(seen.standbys)[0]))
    if cold and state.below >= policy.down_after:
        if len(seen.active) <= policy.min_active:
            return Decision("hold", f"{figures}: at min_active")
        if not seen.promoted:
            return Decision("hold", f"{figures}: no promoted standby to retire")
        if cooling:
            return Decision("hold", f"{figures}: cooling down")
        return _act(state, now, Decision("retire", figures, sorted(seen.promoted)[-1]))
    return Decision("hold", figures)


def _act(state: State, now: float, decision: Decision) -> Decision:
    state.last_action_at = now
    state.above = state.below = 0
    return decision
