"""Alertmanager as the roles configure it: the monitoring role's routes (amtool), and the
rollout's silence (roles/rollout/templates/silence.json.j2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from repo_helpers import REPO, render_role_templates

TOOLS = REPO / ".cache" / "promtool" / "usr" / "bin"
AMTOOL = TOOLS / "amtool"


def tool(path: Path) -> str:
    if not path.is_file():
        pytest.fail(f"{path.name} is missing at {path}: `make deps` unpacks it from Debian's prometheus-alertmanager")
    return str(path)


def render_config(work: Path, receivers: list[dict[str, object]]) -> Path:
    config = work / "alertmanager.yml"
    overrides = {
        "monitoring_alertmanager_receivers": receivers,
        "monitoring_alertmanager_group_wait": "1s",
        "monitoring_alertmanager_group_interval": "1s",
    }
    render_role_templates("monitoring", {"alertmanager.yml.j2": config}, overrides, work)
    return config


def test_alerts_reach_the_receivers_that_take_their_severity(tmp_path: Path) -> None:
    config = render_config(
        tmp_path,
        [
            {"name": "oncall", "webhook_urls": ["https://pager.example/hook"], "severities": ["critical"]},
            {
                "name": "team",
                "webhook_urls": ["http://chat.example/a", "http://chat.example/b"],
                "severities": ["warning", "critical"],
            },
        ],
    )
    checked = subprocess.run([tool(AMTOOL), "check-config", str(config)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    def receivers(*labels: str) -> str:
        argv = [tool(AMTOOL), "config", "routes", "test", f"--config.file={config}", *labels]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    assert receivers("severity=critical", "alertname=MetalserveReplicaDown") == "oncall,team"
    assert receivers("severity=warning", "alertname=MetalserveReplicaNotReady") == "team"
    assert receivers("severity=info") == "nobody"  # kept in Alertmanager, sent nowhere


def test_a_rollout_silence_names_its_host_for_a_bounded_time(tmp_path: Path) -> None:
    """What the rollout POSTs to /api/v2/silences (its delivery is tested in the cluster scenario,
    case a: Debian's Alertmanager reads its templates from /usr/share, so it does not run here)."""
    silence = tmp_path / "silence.json"
    started = 1_800_000_000
    render_role_templates("rollout", {"silence.json.j2": silence}, {"__rollout_silence_from": started}, tmp_path)
    body = json.loads(silence.read_text())
    assert body["matchers"] == [{"name": "host", "value": "localhost", "isRegex": False, "isEqual": True}]
    assert body["startsAt"] == "2027-01-15T08:00:00Z"
    assert body["endsAt"] == "2027-01-15T09:00:00Z"  # rollout_silence_seconds: 3600
    assert body["createdBy"] == "metalserve rollout"
    assert "localhost" in body["comment"]
