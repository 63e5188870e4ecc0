"""playbooks/rolling_update.yml refuses bad rollout settings before it touches any host.

The hosts of these inventories do not exist: the settings check is the play's first task and
runs on the controller, so a refusal here proves nothing was contacted, let alone drained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repo_helpers import run_playbook, unreachable_inventory


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    return unreachable_inventory(tmp_path)


def rollout(inventory: Path, extra_vars: dict[str, object]) -> tuple[int, str]:
    result = run_playbook("playbooks/rolling_update.yml", inventory, "--extra-vars", json.dumps(extra_vars))
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("extra_vars", "named"),
    [
        ({}, "version_id must be a version id or a unique prefix of 12+"),
        ({"version_id": "latest"}, "(got 'latest'; publish_model.yml prints it)"),
        ({"version_id": "8386b9ac"}, "(got '8386b9ac';"),
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


@pytest.mark.parametrize(
    ("extra_vars", "named"),
    [
        (
            {"rolling_update_strategy": "blue-green"},
            "rolling_update_strategy must be one of: restart, reload, got: blue-green",
        ),
        ({"rolling_update_canary": "perhaps"}, "rolling_update_canary"),
        ({"rolling_update_canary_seconds": "soon"}, "rolling_update_canary_seconds"),
    ],
)
def test_wrong_types_and_choices_are_named_before_any_host_is_contacted(
    inventory: Path, extra_vars: dict[str, object], named: str
) -> None:
    code, output = rollout(inventory, {"version_id": "8386b9ac7214", **extra_vars})
    assert code != 0
    assert "Validation of arguments failed" in output
    assert named in output
    assert "UNREACHABLE" not in output


def test_good_settings_pass_the_check_and_only_then_reach_hosts(inventory: Path) -> None:
    # The same inventory with good settings gets past the check: the first host contact
    # (reading the version records) is what fails, so the refusals above came first.
    code, output = rollout(inventory, {"version_id": "8386b9ac7214", "rolling_update_serial": "50%"})
    assert code != 0
    assert "Rollout settings are wrong" not in output
    assert "UNREACHABLE" in output
