"""playbooks/rolling_update.yml refuses bad rollout settings before it touches any host.

The hosts of these inventories do not exist: the settings check is the play's first task and
runs on the controller, so a refusal here proves nothing was contacted, let alone drained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from repo_helpers import run_playbook

GOOD_VARS = {
    "metalserve_model_name": "tiny-llama",
    "metalserve_store_export": "/srv/models",
    "metalserve_store_mount": "/mnt/models",
    "model_replica_version": "8386b9ac7214",
    # Unresolvable on purpose: any connection attempt fails the run differently.
    "ansible_host": "metalserve-test-host.invalid",
}


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    groups = {"gpu_nodes": ["gpu-a", "gpu-b"], "loadbalancers": ["lb-a"], "model_store": ["nfs-a"]}
    children = {name: {"hosts": dict.fromkeys(hosts)} for name, hosts in groups.items()}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": children, "vars": GOOD_VARS}}))
    return path


def rollout(inventory: Path, extra_vars: dict[str, object]) -> tuple[int, str]:
    result = run_playbook("playbooks/rolling_update.yml", inventory, "--extra-vars", json.dumps(extra_vars))
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("extra_vars", "named"),
    [
        ({}, "version_id must be a version id or a unique prefix of 12+"),
        ({"version_id": "latest"}, "(got 'latest'; publish_model.yml prints it)"),
        ({"version_id": "8386b9ac"}, "(got '8386b9ac';"),
        ({"version_id": "8386b9ac7214", "rolling_update_strategy": "blue-green"}, "(got 'blue-green')"),
        ({"version_id": "8386b9ac7214", "rolling_update_serial": "0"}, "a host count or a percentage (got '0')"),
        ({"version_id": "8386b9ac7214", "rolling_update_serial": "150%"}, "(got '150%')"),
        ({"version_id": "8386b9ac7214", "rolling_update_canary_weight": 0}, "the canary weight 1-100"),
        ({"version_id": "8386b9ac7214", "rolling_update_canary_seconds": 1}, "its observation 5+ seconds"),
    ],
)
def test_bad_settings_are_named_before_any_host_is_contacted(
    inventory: Path, extra_vars: dict[str, object], named: str
) -> None:
    code, output = rollout(inventory, extra_vars)
    assert code != 0
    assert "Rollout settings are wrong" in output
    assert named in output
    assert "UNREACHABLE" not in output


def test_good_settings_pass_the_check_and_only_then_reach_hosts(inventory: Path) -> None:
    # The same inventory with good settings gets past the check: the first host contact
    # (reading the version records) is what fails, so the refusals above came first.
    code, output = rollout(inventory, {"version_id": "8386b9ac7214", "rolling_update_serial": "50%"})
    assert code != 0
    assert "Rollout settings are wrong" not in output
    assert "UNREACHABLE" in output
