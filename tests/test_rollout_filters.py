"""roles/rollout/filter_plugins/metalserve_rollout.py: `show stat`, the canary verdict, the record.

The fixture tests/fixtures/haproxy/show_stat.csv is the real runtime API answer of the lab's
lb1 (HAProxy 2.6, four replicas in metalserve_replicas) after a rolling update under load;
the "after" samples add responses to its counters the way HAProxy would.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest

from repo_helpers import REPO

sys.path.insert(0, str(REPO / "roles" / "rollout" / "filter_plugins"))
import metalserve_rollout as mh

STAT = (REPO / "tests" / "fixtures" / "haproxy" / "show_stat.csv").read_text()
BACKEND = "metalserve_replicas"
CANARY = ["gpu1-0", "gpu1-1"]


def answered(rows: list[dict[str, Any]], **per_server: dict[str, int]) -> list[dict[str, Any]]:
    """A later sample: each named server's counters grown by the given amounts."""
    later = copy.deepcopy(rows)
    for row in later:
        for field, amount in per_server.get(row["svname"].replace("-", "_"), {}).items():
            row[field] += amount
    return later


def verdict(before: list[dict[str, Any]], after: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"backend": BACKEND, "canary": CANARY, "threshold": 0.02, "min_requests": 20}
    options.update(kw)
    return mh.metalserve_canary_verdict(before, after, **options)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return mh.metalserve_haproxy_stat(STAT)


def test_parse_reads_every_proxy_and_server_with_numbers(rows: list[dict[str, Any]]) -> None:
    servers = [r["svname"] for r in rows if r["pxname"] == BACKEND]
    assert servers == ["gpu1-0", "gpu1-1", "gpu2-0", "gpu2-1", "BACKEND"]
    gpu = next(r for r in rows if r["svname"] == "gpu1-0")
    assert gpu["status"] == "UP"
    assert gpu["weight"] == 100
    assert isinstance(gpu["hrsp_2xx"], int) and gpu["hrsp_2xx"] > 0
    assert gpu["check_status"] == "L7OK"
    assert {r["pxname"] for r in rows} == {"stats", "api", "per_key_rate", BACKEND}


def test_parse_rejects_what_is_not_show_stat() -> None:
    with pytest.raises(mh.HaproxyStatError, match="not 'show stat' output"):
        mh.metalserve_haproxy_stat("Unknown command: 'show stats'\n")
    with pytest.raises(mh.HaproxyStatError):
        mh.metalserve_haproxy_stat("")


def test_a_healthy_canary_passes(rows: list[dict[str, Any]]) -> None:
    ok = {"hrsp_2xx": 100}
    after = answered(rows, gpu1_0=ok, gpu1_1=ok, gpu2_0=ok, gpu2_1=ok)
    result = verdict(rows, after)
    assert result["passed"] is True
    assert result["problems"] == []
    assert result["canary"] == {"servers": CANARY, "responses": 200, "errors": 0, "rate": 0.0}
    assert result["baseline"]["servers"] == ["gpu2-0", "gpu2-1"]
    assert result["baseline"]["responses"] == 200


def test_behind_a_virtual_ip_the_load_balancers_are_judged_together(rows: list[dict[str, Any]]) -> None:
    """canary.yml concatenates every load balancer's rows: the one holding the virtual IP took
    all the clients, the other none; together the canary answered enough, alone the idle one
    would fail it for too little traffic."""
    ok = {"hrsp_2xx": 15}
    holder_after = answered(rows, gpu1_0=ok, gpu1_1=ok, gpu2_0=ok, gpu2_1=ok)
    idle_before, idle_after = copy.deepcopy(rows), copy.deepcopy(rows)
    together = verdict(rows + idle_before, holder_after + idle_after)
    assert together["passed"] is True, together["problems"]
    assert together["canary"]["responses"] == 30
    assert verdict(idle_before, idle_after)["passed"] is False


def test_a_canary_refusing_requests_fails(rows: list[dict[str, Any]]) -> None:
    bad = {"hrsp_2xx": 60, "hrsp_4xx": 40}
    ok = {"hrsp_2xx": 100}
    after = answered(rows, gpu1_0=bad, gpu1_1=bad, gpu2_0=ok, gpu2_1=ok)
    result = verdict(rows, after)
    assert result["passed"] is False
    assert result["canary"]["rate"] == 0.4
    assert result["problems"] == [
        "the canary's error rate 40.00% (80/200) exceeds the baseline's 0.00% by more than 2.00%"
    ]


def test_server_errors_and_broken_responses_count(rows: list[dict[str, Any]]) -> None:
    after = answered(rows, gpu1_0={"hrsp_2xx": 90, "hrsp_5xx": 10, "eresp": 5}, gpu2_0={"hrsp_2xx": 100})
    result = verdict(rows, after, canary=["gpu1-0"])
    assert result["canary"] == {"servers": ["gpu1-0"], "responses": 100, "errors": 15, "rate": 0.15}
    assert result["passed"] is False


def test_errors_every_server_gets_cancel_out(rows: list[dict[str, Any]]) -> None:
    # Clients' own bad requests reach every replica alike: not the canary's fault.
    same = {"hrsp_2xx": 90, "hrsp_4xx": 10}
    after = answered(rows, gpu1_0=same, gpu1_1=same, gpu2_0=same, gpu2_1=same)
    result = verdict(rows, after)
    assert result["canary"]["rate"] == result["baseline"]["rate"] == 0.1
    assert result["passed"] is True


def test_too_little_traffic_proves_nothing(rows: list[dict[str, Any]]) -> None:
    after = answered(rows, gpu1_0={"hrsp_2xx": 5}, gpu2_0={"hrsp_2xx": 100})
    result = verdict(rows, after, min_requests=20)
    assert result["passed"] is False
    assert result["problems"] == ["the canary answered 5 requests, fewer than the 20 needed to judge it"]
    assert verdict(rows, after, min_requests=0)["passed"] is True


def test_unknown_canary_server_and_restarted_counters_are_errors(rows: list[dict[str, Any]]) -> None:
    with pytest.raises(mh.HaproxyStatError, match=r"has no server \['gpu9-0'\]"):
        verdict(rows, rows, canary=["gpu9-0"])
    restarted = answered(rows, gpu1_0={"hrsp_2xx": -1000})
    with pytest.raises(mh.HaproxyStatError, match="went back"):
        verdict(rows, restarted)


# Prometheus' answer to canary.yml's query (histogram_quantile by side), as its HTTP API gives it.
def p95_answer(canary: str, baseline: str) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"side": "canary"}, "value": [1764770000.5, canary]},
                {"metric": {}, "value": [1764770000.5, baseline]},
            ],
        },
    }


def test_prometheus_p95_reads_each_side_and_no_figure_as_none() -> None:
    assert mh.metalserve_prometheus_p95(p95_answer("0.25", "0.1")) == {"canary": 0.25, "baseline": 0.1}
    # histogram_quantile over no request is NaN; no answer at all (monitoring down) is nothing.
    assert mh.metalserve_prometheus_p95(p95_answer("NaN", "0.1")) == {"canary": None, "baseline": 0.1}
    assert mh.metalserve_prometheus_p95(None) == {"canary": None, "baseline": None}
    assert mh.metalserve_prometheus_p95({"status": "error", "error": "bad query"}) == {"canary": None, "baseline": None}


@pytest.mark.parametrize(
    ("canary_p95", "baseline_p95", "passed"),
    [
        ("0.10", "0.10", True),
        ("0.19", "0.10", True),  # under 0.10 x 1.5 + 0.05
        ("0.21", "0.10", False),
        ("1.5", "1.0", True),
        ("1.6", "1.0", False),
    ],
)
def test_a_slow_canary_fails_on_the_pools_latency(
    rows: list[dict[str, Any]], canary_p95: str, baseline_p95: str, passed: bool
) -> None:
    ok = {"hrsp_2xx": 100}
    after = answered(rows, gpu1_0=ok, gpu1_1=ok, gpu2_0=ok, gpu2_1=ok)
    latency = mh.metalserve_prometheus_p95(p95_answer(canary_p95, baseline_p95))
    result = verdict(rows, after, latency=latency, latency_ratio=1.5, latency_slack=0.05)
    assert result["passed"] is passed, result
    assert result["canary"]["p95_seconds"] == float(canary_p95)
    assert result["baseline"]["p95_seconds"] == float(baseline_p95)
    assert any("p95 latency" in p for p in result["problems"]) is not passed
    assert result["notes"] == []


def test_latency_without_a_figure_is_noted_not_judged(rows: list[dict[str, Any]]) -> None:
    ok = {"hrsp_2xx": 100}
    after = answered(rows, gpu1_0=ok, gpu1_1=ok, gpu2_0=ok, gpu2_1=ok)
    no_canary = verdict(rows, after, latency=mh.metalserve_prometheus_p95(p95_answer("NaN", "0.1")))
    assert no_canary["passed"] is True
    assert no_canary["notes"] == ["latency not judged: Prometheus has no p95 of the canary"]
    assert verdict(rows, after)["notes"] == ["latency not judged: no monitoring host"]


def test_ansible_finds_the_filters() -> None:
    filters = mh.FilterModule().filters()
    assert filters["metalserve_haproxy_stat"] is mh.metalserve_haproxy_stat
    assert filters["metalserve_canary_verdict"] is mh.metalserve_canary_verdict
    assert filters["metalserve_prometheus_p95"] is mh.metalserve_prometheus_p95
    assert filters["metalserve_rollback_target"] is mh.metalserve_rollback_target
    assert filters["metalserve_record_done"] is mh.metalserve_record_done


# --- the host record and rollback ------------------------------------------------------

A, B, C = "a" * 64, "b" * 64, "c" * 64


def rolled_out(*versions: str) -> dict[str, Any]:
    """The record of a host deployed on the first version, then rolled out to each next one."""
    record: dict[str, Any] = {}
    for version in versions:
        record = mh.metalserve_record_done(record, version)
    return record


def test_a_rollout_keeps_every_version_that_passed_its_gates() -> None:
    record = rolled_out(A, B, C)
    assert record["current_version"] == C
    assert record["previous_version"] == B
    assert record["good_versions"] == [A, B, C]
    assert record["state"] == "done"
    assert record["rolled_back"] == []


def test_two_rollbacks_go_further_back_never_to_the_version_rolled_back() -> None:
    record = rolled_out(A, B, C)
    first = mh.metalserve_rollback_target(record)
    assert first == B
    record = mh.metalserve_record_done(record, first, rollback=True, reason="latency", at="t1")
    assert record["rolled_back"] == [C]
    assert record["last_rollback"] == {"from": C, "to": B, "reason": "latency", "at": "t1"}
    second = mh.metalserve_rollback_target(record)
    assert second == A  # not C: that one was rolled back
    record = mh.metalserve_record_done(record, second, rollback=True)
    assert record["rolled_back"] == [C, B]
    assert mh.metalserve_rollback_target(record) == ""  # nothing older: the play says so


def test_rolling_out_a_rolled_back_version_on_purpose_clears_it() -> None:
    record = rolled_out(A, B)
    record = mh.metalserve_record_done(record, A, rollback=True)
    assert mh.metalserve_rollback_target(record) == ""
    record = mh.metalserve_record_done(record, B)
    assert record["rolled_back"] == []
    assert mh.metalserve_rollback_target(record) == A


def test_an_unfinished_switch_rolls_back_to_the_current_version() -> None:
    record = {**rolled_out(A, B), "target_version": C, "state": "switching"}
    assert mh.metalserve_rollback_target(record) == B
    assert mh.metalserve_rollback_target({**record, "state": "pending"}) == B


def test_records_from_before_good_versions_still_roll_back() -> None:
    old = {"current_version": B, "previous_version": A, "state": "done"}
    assert mh.metalserve_rollback_target(old) == A
    assert mh.metalserve_rollback_target({"current_version": A, "state": "done"}) == ""
    assert mh.metalserve_record_done(old, C)["good_versions"] == [A, B, C]


def test_recording_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no version"):
        mh.metalserve_record_done({}, "")
