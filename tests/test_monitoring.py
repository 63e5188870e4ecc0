"""The monitoring content: alert rules (promtool check and unit tests) and the Grafana dashboard.

The rules are roles/monitoring/templates/metalserve.rules.yml.j2 rendered by Ansible with the
role's defaults, as the role installs them. Every metric the rules and the dashboard query must be
one the project exports: the replica's registry, a real HAProxy's Prometheus exporter started here
on loopback, the DCGM fields of role nvidia_dcgm's counter set, node_exporter's systemd restart
counter and Prometheus' own `up`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from repo_helpers import REPO, free_port, render_role_templates, run_keepalived_notify

ROLE = REPO / "roles" / "monitoring"
RULES_TEST = ROLE / "tests" / "metalserve.rules.test.yml"
DASHBOARD = REPO / "files" / "grafana" / "metalserve.json"
DCGM_COUNTERS = REPO / "roles" / "nvidia_dcgm" / "files" / "metalserve-counters.csv"
PROMTOOL = Path(os.environ.get("PROMTOOL", REPO / ".cache" / "promtool" / "usr" / "bin" / "promtool"))
# One backend per model, named role metalserve's prefix and the model's name.
HAPROXY_BACKEND_PREFIX = yaml.safe_load((REPO / "roles" / "metalserve" / "defaults" / "main.yml").read_text())[
    "metalserve_haproxy_backend_prefix"
]
HAPROXY_BACKEND = HAPROXY_BACKEND_PREFIX + "tiny-llama"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.is_file():
        pytest.fail(f"promtool is missing at {PROMTOOL}: `make deps` unpacks it from Debian's prometheus package")
    return subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def render_rules(dest: Path, **overrides: object) -> Path:
    """Render the rules template with the role's defaults (and overrides), through Ansible."""
    render_role_templates("monitoring", {"metalserve.rules.yml.j2": dest / "metalserve.rules.yml"}, overrides, dest)
    shutil.copy(RULES_TEST, dest / RULES_TEST.name)
    return dest / "metalserve.rules.yml"


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_rules(tmp_path_factory.mktemp("rules"))


def test_rules_pass_promtool_check(rules: Path) -> None:
    result = promtool("check", "rules", rules.name, cwd=rules.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 20 rules found" in result.stdout


def test_every_alert_passes_its_unit_tests(rules: Path) -> None:
    result = promtool("test", "rules", RULES_TEST.name, cwd=rules.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    tested |= {metric_names(case["expr"]).pop() for test in tests for case in test.get("promql_expr_test", [])}
    rules_ = set(rule_exprs(rules))
    assert tested == rules_, f"rules without a unit test: {sorted(rules_ - tested)}"


def test_unit_tests_hold_the_thresholds(tmp_path: Path) -> None:
    """A changed threshold fails the unit tests: they pin the defaults, not just the syntax."""
    render_rules(
        tmp_path,
        monitoring_alert_error_rate=0.2,
        monitoring_alert_version_skew_for="1h",
        monitoring_alert_replica_restart_window="2m",
    )
    result = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "alertname: MetalserveReplicaRestarted" in result.stdout + result.stderr
    assert "alertname: MetalserveHighErrorRate" in result.stdout + result.stderr
    assert "alertname: MetalserveVersionSkew" in result.stdout + result.stderr


def test_scrape_config_reads_the_replicas_targets_file(tmp_path: Path) -> None:
    """The replicas are file_sd targets (deploy.yml rewrites the file when a host moves to another
    backend): Prometheus' own discovery finds each, labelled with its host, name and pool's
    backend. node_exporter may have an interval of its own (the lab's: fewer collector runs)."""
    targets = tmp_path / "metalserve-replicas.json"
    endpoint = {"name": "localhost-0", "address": "198.18.0.32", "port": 8000, "metrics_port": 9500}
    render_role_templates(
        "monitoring",
        {"prometheus.yml.j2": tmp_path / "prometheus.yml", "replica_targets.json.j2": targets},
        {
            "monitoring_replica_group": "all",
            "monitoring_node_groups": ["all"],
            "metalserve_address": "198.18.0.32",
            "monitoring_node_scrape_interval": "10s",
            "__monitoring_replica_targets": str(targets),
            "__monitoring_rules_dir": str(tmp_path / "rules"),
            "monitoring_targets_from_deploy": True,
            "model_replica_endpoints": [
                {**endpoint, "model": "tiny-chat", "variant": "b"},
                {**endpoint, "name": "localhost-1", "port": 8001, "metrics_port": 9501, "model": "tiny-llama"},
            ],
        },
        tmp_path,
    )
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["metalserve"]
    assert job["file_sd_configs"] == [{"files": [str(targets)]}]
    assert "scrape_interval" not in job  # the global one
    assert jobs["node"]["scrape_interval"] == "10s"
    assert jobs["node"]["static_configs"] == [{"targets": ["198.18.0.32:9100"], "labels": {"host": "localhost"}}]
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Prometheus' own file discovery reads the file: the targets as it would scrape them.
    result = promtool("check", "service-discovery", "--timeout=5s", "prometheus.yml", "metalserve", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    labels = [target["labels"] for target in json.loads(result.stdout)]
    found = {(one["instance"], one["host"], one["replica"], one["backend"]) for one in labels}
    assert found == {
        ("198.18.0.32:9500", "localhost", "localhost-0", f"{HAPROXY_BACKEND_PREFIX}tiny-chat:b"),
        ("198.18.0.32:9501", "localhost", "localhost-1", HAPROXY_BACKEND),
    }


def test_the_targets_file_reads_the_hosts_records_not_a_cached_fact(tmp_path: Path) -> None:
    """monitoring.yml lists each host's record gathered in its run: a fact cache's older
    model_replica_endpoints (the host moved since, by a run without that cache) must not win."""
    targets = tmp_path / "metalserve-replicas.json"
    record = {"name": "localhost-0", "address": "198.18.0.32", "port": 8000, "metrics_port": 9500}
    render_role_templates(
        "monitoring",
        {"replica_targets.json.j2": targets},
        {
            "monitoring_replica_group": "all",
            "ansible_local": {"metalserve_endpoints": {"endpoints": [{**record, "model": "tiny-chat"}]}},
            "model_replica_endpoints": [{**record, "model": "tiny-llama"}],
        },
        tmp_path,
    )
    (target,) = json.loads(targets.read_text())
    assert target["labels"]["backend"] == f"{HAPROXY_BACKEND_PREFIX}tiny-chat"


# --- metric names -------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"} | {"and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        followed_by_call = expr[match.end() :].lstrip().startswith("(")
        if not followed_by_call and match.group().lower() not in _KEYWORDS and not match.group().startswith("$"):
            names.add(match.group())
    return names


def test_metric_name_extraction() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"/v1/.+"}[5m]))) / on (j) b_total > bool 3'
    assert metric_names(expr) == {"a_bucket", "b_total"}


def replica_metric_names() -> set[str]:
    from metalserve.metrics import Metrics

    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
    }
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


@pytest.fixture(scope="module")
def haproxy_metric_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Start a real HAProxy (the host's) with the role's backend name and read its exporter."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed: `make deps` installs it (HOST_PACKAGES)")
    tmp = tmp_path_factory.mktemp("haproxy")
    port, backend_port = free_port(), free_port()
    (tmp / "haproxy.cfg").write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n"
        f"frontend stats\n  bind 127.0.0.1:{port}\n"
        "  http-request use-service prometheus-exporter if { path /metrics }\n"
        f"backend {HAPROXY_BACKEND}\n  server r1 127.0.0.1:{backend_port} check\n"
    )
    process = subprocess.Popen(
        [haproxy, "-db", "-f", str(tmp / "haproxy.cfg")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    finally:
        process.terminate()
        process.wait(timeout=10)


def consistency_metric_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """What the periodic consistency check writes for node_exporter's textfile collector."""
    from metalserve.consistency import ReplicaAnswer, ReplicaResult, Report, write_textfile

    path = tmp_path_factory.mktemp("textfile") / "consistency.prom"
    answer = ReplicaAnswer("https://gpu1:8000", "1" * 64, "text")
    write_textfile(Report(["p"], [[answer]], [ReplicaResult(answer.url)]), path, "tiny-llama")
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {line.split("{")[0].split(" ")[0] for line in lines}


def keepalived_metric_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    text = run_keepalived_notify(tmp_path_factory.mktemp("keepalived"), "MASTER")
    return {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}


def dcgm_metric_names() -> set[str]:
    lines = (line.strip() for line in DCGM_COUNTERS.read_text().splitlines())
    return {line.split(",")[0].strip() for line in lines if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def exported(haproxy_metric_names: set[str], tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return (
        replica_metric_names()
        | haproxy_metric_names
        | dcgm_metric_names()
        | consistency_metric_names(tmp_path_factory)
        | keepalived_metric_names(tmp_path_factory)
        | {"up"}
        # node_exporter's systemd collector, with the flags role monitoring sets: the cluster
        # scenario checks Prometheus holds it for every replica's unit.
        | {"node_systemd_service_restart_total"}
    )


def rule_exprs(rules: Path) -> dict[str, str]:
    groups = yaml.safe_load(rules.read_text())["groups"]
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def test_rules_read_only_exported_metrics(rules: Path, exported: set[str]) -> None:
    for alert, expr in rule_exprs(rules).items():
        names = metric_names(expr)
        assert names, f"{alert}: no metric found in {expr!r}"
        assert names <= exported, f"{alert} reads metrics nobody exports: {sorted(names - exported)}"


# --- dashboard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dashboard: dict) -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard["panels"]}


def test_dashboard_structure(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["backend"]["query"] == HAPROXY_BACKEND_PREFIX + ".+", "the dashboard watches other backends"
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        title = panel.get("title")
        assert title, panel
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        assert panel["type"] in {"timeseries", "stat", "table", "state-timeline", "gauge", "bargauge"}, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("x", "y", "w", "h")), title
        assert grid["x"] + grid["w"] <= 24, f"{title} is wider than the 24-column grid"
        own = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not own & cells, f"{title} overlaps another panel"
        cells |= own
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{title}: targets need unique refIds"
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in variables or var.startswith("__"), f"{title} uses undeclared ${var}"


def test_dashboard_queries_only_exported_metrics(dashboard: dict, exported: set[str]) -> None:
    for title, exprs in dashboard_exprs(dashboard).items():
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{title}: no metric found in {expr!r}"
            assert names <= exported, f"{title} queries metrics nobody exports: {sorted(names - exported)}"


def test_dashboard_covers_what_operators_watch(dashboard: dict) -> None:
    used = {name for exprs in dashboard_exprs(dashboard).values() for expr in exprs for name in metric_names(expr)}
    wanted = {
        "metalserve_requests_total",  # requests
        "metalserve_request_duration_seconds_bucket",  # latency percentiles
        "metalserve_time_to_first_token_seconds_bucket",
        "metalserve_generated_tokens_total",  # tokens/s
        "metalserve_batch_size_bucket",  # batch sizes
        "metalserve_forward_pass_part_seconds_sum",  # where a pass's time goes
        "metalserve_num_requests_running",  # engine state (vLLM's names)
        "metalserve_num_requests_waiting",
        "metalserve_kv_cache_usage_perc",
        "metalserve_model_info",  # versions per replica
        "haproxy_server_status",  # HAProxy server states
    }
    assert wanted <= used, f"missing from the dashboard: {sorted(wanted - used)}"
