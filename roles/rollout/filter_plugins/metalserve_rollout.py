"""Filters of the rollout role: HAProxy's runtime API, the canary verdict, the host record.

Pure functions, typed, importable without Ansible (tests/test_rollout_filters.py imports this
file directly). Ansible finds them in the role's filter_plugins/ while the role runs.

    metalserve_haproxy_stat(text) -> rows of ``show stat`` (CSV) as dicts, numbers as ints
    metalserve_canary_verdict(before, after, backend=..., canary=..., threshold=..., min_requests=...,
                              latency=..., latency_ratio=..., latency_slack=...)
        -> the canary's and the baseline's error rates between two ``show stat`` samples, their
           p95 latencies (from Prometheus' query of the pools' histogram, when given), and
           whether the canary passes
    metalserve_prometheus_p95(answer) -> {"canary": s, "baseline": s} from that query's answer
    metalserve_rollback_target(record) -> the version a rollback returns the host to ('' if none)
    metalserve_record_done(record, version, rollback=..., reason=..., at=...)
        -> the host record once ``version`` passed its gates there
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from typing import Any

# Answers a replica itself gave that count as errors: 4xx (the replica refused a request
# the baseline accepts, e.g. a shorter context) and 5xx, plus responses that broke off.
ERROR_FIELDS = ("hrsp_4xx", "hrsp_5xx", "eresp")
RESPONSE_FIELDS = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")


class HaproxyStatError(ValueError):
    """Runtime API output that is not ``show stat`` CSV."""


def metalserve_haproxy_stat(text: str) -> list[dict[str, Any]]:
    """Parse ``show stat`` output (a ``# pxname,svname,...`` header, then CSV rows)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# pxname,svname,"):
        raise HaproxyStatError(f"not 'show stat' output (expected a '# pxname,svname,...' header): {text[:200]!r}")
    header = lines[0][2:].rstrip(",").split(",")
    rows = []
    for record in csv.reader(io.StringIO("\n".join(lines[1:]))):
        row: dict[str, Any] = {}
        for name, value in zip(header, record, strict=False):
            row[name] = int(value) if value.isdigit() else value
        rows.append(row)
    return rows


def _totals(rows: Iterable[dict[str, Any]], fields: Iterable[str]) -> int:
    names = tuple(fields)
    return sum(int(row.get(name) or 0) for row in rows for name in names)


def _window(
    before: list[dict[str, Any]], after: list[dict[str, Any]], backend: str, servers: set[str]
) -> dict[str, Any]:
    def pick(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r.get("pxname") == backend and r.get("svname") in servers]

    first, last = pick(before), pick(after)
    responses = _totals(last, RESPONSE_FIELDS) - _totals(first, RESPONSE_FIELDS)
    errors = _totals(last, ERROR_FIELDS) - _totals(first, ERROR_FIELDS)
    if responses < 0 or errors < 0:
        # Counters only fall when HAProxy restarted between the samples.
        raise HaproxyStatError("HAProxy's counters went back between the samples (a restart?)")
    return {
        "servers": sorted(servers),
        "responses": responses,
        "errors": errors,
        "rate": round(errors / responses, 4) if responses else 0.0,
    }


def metalserve_prometheus_p95(answer: dict[str, Any] | None) -> dict[str, float | None]:
    """The canary's and the baseline's p95 from canary.yml's instant query (one series per
    side: ``side="canary"``, the rest without the label); None for a side Prometheus could
    not tell (no answer, no requests: NaN)."""
    sides: dict[str, float | None] = {"canary": None, "baseline": None}
    if not answer or answer.get("status") != "success":
        return sides
    for series in answer.get("data", {}).get("result", []):
        side = "canary" if series.get("metric", {}).get("side") == "canary" else "baseline"
        value = float(series["value"][1])
        sides[side] = None if value != value or value in (float("inf"), float("-inf")) else value
    return sides


def metalserve_canary_verdict(
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    backend: str,
    canary: list[str],
    threshold: float,
    min_requests: int,
    latency: dict[str, float | None] | None = None,
    latency_ratio: float = 1.5,
    latency_slack: float = 0.05,
) -> dict[str, Any]:
    """Compare the canary servers' error rate, and their latency, with the rest of the backend's.

    The canary fails when its rate exceeds the baseline's by more than ``threshold`` (errors
    every server gets, such as clients' bad requests, cancel out), or when it answered fewer
    than ``min_requests`` requests: too little traffic proves nothing. Given ``latency`` (each
    side's p95 in seconds over the observation, from the replicas' histogram that the pools'
    recording rules read), it also fails when its p95 exceeds the baseline's times
    ``latency_ratio`` plus ``latency_slack`` seconds; a side without a figure is noted, not
    judged (no monitoring, or no request of that side in Prometheus' window).
    """
    wanted = set(canary)
    every = {
        r["svname"] for r in after if r.get("pxname") == backend and r.get("svname") not in ("FRONTEND", "BACKEND")
    }
    missing = wanted - every
    if missing:
        raise HaproxyStatError(f"backend {backend} has no server {sorted(missing)}")
    canary_window = _window(before, after, backend, wanted)
    baseline = _window(before, after, backend, every - wanted)
    problems = []
    if canary_window["responses"] < min_requests:
        problems.append(
            f"the canary answered {canary_window['responses']} requests, fewer than the "
            f"{min_requests} needed to judge it"
        )
    excess = canary_window["rate"] - baseline["rate"]
    if excess > threshold:
        problems.append(
            f"the canary's error rate {canary_window['rate']:.2%} ({canary_window['errors']}/"
            f"{canary_window['responses']}) exceeds the baseline's {baseline['rate']:.2%} by "
            f"more than {threshold:.2%}"
        )
    notes = []
    if latency is None:
        notes.append("latency not judged: no monitoring host")
    else:
        canary_window["p95_seconds"] = latency.get("canary")
        baseline["p95_seconds"] = latency.get("baseline")
        mine, theirs = latency.get("canary"), latency.get("baseline")
        if mine is None or theirs is None:
            notes.append(
                "latency not judged: Prometheus has no p95 of " + ("the canary" if mine is None else "the baseline")
            )
        elif mine > theirs * latency_ratio + latency_slack:
            problems.append(
                f"the canary's p95 latency {mine:.3f} s exceeds the baseline's {theirs:.3f} s "
                f"times {latency_ratio:g} plus {latency_slack:g} s"
            )
    return {
        "canary": canary_window,
        "baseline": baseline,
        "passed": not problems,
        "problems": problems,
        "notes": notes,
    }


# The host record (ansible_local.metalserve_rollout) says where a GPU node is:
#   current_version   what its replicas were last switched to and passed the gates on
#   previous_version  what they ran before that
#   target_version    where a rollout is taking them; state: pending (not reached, or undone
#                     by the canary) | switching (being switched, or a switch that failed) | done
#   good_versions     every version that passed the gates there, oldest first
#   rolled_back       versions a rollback moved the host away from: never a rollback's target
#   last_rollback     {from, to, reason, at} of the latest rollback
# Records written before good_versions existed are read as good_versions = [previous, current].


def _good_versions(record: dict[str, Any]) -> list[str]:
    if "good_versions" in record:
        return [str(v) for v in record["good_versions"] if v]
    return [str(v) for v in (record.get("previous_version"), record.get("current_version")) if v]


def metalserve_rollback_target(record: dict[str, Any]) -> str:
    """The version a rollback returns the host to, or '' when it has none.

    A host the last rollout did not bring to its target (state pending: not reached, or undone
    by the canary) or left half-switched (switching) goes back to (or stays on) its current
    version, the last one that passed its gates there. A host whose last switch finished goes to
    the newest other version that passed its gates there and was never rolled back from, so a
    second rollback goes further back instead of flipping to the bad version.
    """
    current = str(record.get("current_version") or "")
    if record.get("state", "done") != "done":
        return current
    excluded = {current, *map(str, record.get("rolled_back") or [])}
    candidates = [v for v in _good_versions(record) if v not in excluded]
    return candidates[-1] if candidates else ""


def metalserve_record_done(
    record: dict[str, Any], version: str, rollback: bool = False, reason: str = "", at: str = ""
) -> dict[str, Any]:
    """The host record once ``version`` passed its gates on the host.

    A rollout that chose a version on purpose takes it off the rolled-back list; a rollback
    puts the version it leaves on it, with the reason.
    """
    if not version:
        raise ValueError("no version to record")
    current = str(record.get("current_version") or "")
    good = [v for v in _good_versions(record) if v != version] + [version]
    rolled_back = [str(v) for v in record.get("rolled_back") or [] if v != version]
    changes: dict[str, Any] = {
        "current_version": version,
        "previous_version": current if current and current != version else record.get("previous_version"),
        "target_version": version,
        "state": "done",
        "good_versions": good,
        "rolled_back": rolled_back,
    }
    if rollback and current and current != version:
        changes["rolled_back"] = [*rolled_back, current]
        changes["last_rollback"] = {"from": current, "to": version, "reason": reason, "at": at}
    return {**record, **changes}


class FilterModule:
    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "metalserve_haproxy_stat": metalserve_haproxy_stat,
            "metalserve_canary_verdict": metalserve_canary_verdict,
            "metalserve_prometheus_p95": metalserve_prometheus_p95,
            "metalserve_rollback_target": metalserve_rollback_target,
            "metalserve_record_done": metalserve_record_done,
        }
