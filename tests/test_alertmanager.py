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


def render_silence(work: Path, **overrides: object) -> dict[str, object]:
    silence = work / "silence.json"
    render_role_templates("rollout", {"silence.json.j2": silence}, overrides, work)
    return json.loads(silence.read_text())  # type: ignore[no-any-return]


def test_a_rollout_silence_names_its_host_for_a_bounded_time(tmp_path: Path) -> None:
    """What the rollout POSTs to /api/v2/silences (its delivery is tested in the cluster scenario,
    cases a and d: Debian's Alertmanager reads its templates from /usr/share, so it does not run
    here)."""
    body = render_silence(tmp_path, __rollout_silence_from=1_800_000_000)
    assert body["matchers"] == [{"name": "host", "value": "localhost", "isRegex": False, "isEqual": True}]
    assert body["startsAt"] == "2027-01-15T07:59:00Z"  # a minute back: the controller's clock may lead
    # The default bound: the drain (request timeout 300 + 10), a start (300), no canary, 300 more.
    assert body["endsAt"] == "2027-01-15T08:15:10Z"
    assert body["createdBy"] == "metalserve rollout"
    assert "localhost" in body["comment"]


def test_a_rollout_silence_leaves_out_the_alerts_already_paging(tmp_path: Path) -> None:
    """Silenced, they would resolve without a "resolved" notification, and Alertmanager would hold
    their next page back for repeat_interval."""
    body = render_silence(
        tmp_path,
        __rollout_silence_from=1_800_000_000,
        __rollout_silence_except=["MetalserveReplicaDown", "Odd.Name"],
    )
    assert body["matchers"][1] == {
        "name": "alertname",
        "value": "MetalserveReplicaDown|Odd\\.Name",
        "isRegex": True,
        "isEqual": False,
    }
