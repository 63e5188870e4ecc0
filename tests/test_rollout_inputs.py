"""playbooks/rolling_update.yml refuses bad rollout settings before it touches any host.

The hosts of these inventories do not exist: the settings check is the play's first task and
runs on the controller, so a refusal here proves nothing was contacted, let alone drained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from repo_helpers import GOOD_GROUPS, GOOD_VARS, run_playbook, unreachable_inventory, write_inventory


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    return unreachable_inventory(tmp_path)


def rollout(inventory: Path, extra_vars: dict[str, object], *options: str) -> tuple[int, str]:
    result = run_playbook("playbooks/rolling_update.yml", inventory, "--extra-vars", json.dumps(extra_vars), *options)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("extra_vars", "named"),
    [
        ({"version_id": "8386b9ac7214", "rollout_serial": "0"}, "a host count or a percentage (got '0')"),
        ({"version_id": "8386b9ac7214", "rollout_serial": "150%"}, "(got '150%')"),
        ({"version_id": "8386b9ac7214", "rollout_canary_weight": 0}, "the canary weight 1-100"),
        ({"version_id": "8386b9ac7214", "rollout_canary_seconds": 1}, "its observation 5+ seconds"),
        ({"version_id": "8386b9ac7214", "rollout_canary_max_latency_ratio": 0.5}, "its latency ratio 1 or more"),
        ({"rollout_rollback": True, "rollout_ready_timeout": 2}, "rollout_ready_timeout 10+ seconds"),
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
    ("version_id", "named"),
    [
        ("latest", "version_id on gpu-a must be a version id or a unique prefix of 12+"),
        ("latest", "(got 'latest'; publish_model.yml prints it)"),
        ("8386b9ac", "(got '8386b9ac';"),
        ("8386B9AC7214", "lowercase hex"),
    ],
)
def test_a_bad_version_is_named_before_any_host_is_contacted(inventory: Path, version_id: str, named: str) -> None:
    code, output = rollout(inventory, {"version_id": version_id})
    assert code != 0
    assert named in output
    assert "UNREACHABLE" not in output


def test_the_target_defaults_to_the_inventory_pin(tmp_path: Path) -> None:
    # No version_id: the pin is the target, checked like one given with -e.
    bad_pin = write_inventory(
        tmp_path, GOOD_GROUPS, {**GOOD_VARS, "model_replica_version": "latest", "ansible_host": "x.invalid"}
    )
    code, output = rollout(bad_pin, {})
    assert code != 0
    assert "model_replica_version (the inventory pin; -e version_id overrides it) on gpu-a must be" in output
    assert "UNREACHABLE" not in output
    # An empty answer (an AWX survey left blank) means the pin too.
    code, output = rollout(unreachable_inventory(tmp_path), {"version_id": ""})
    assert code != 0
    assert "must be" not in output
    assert "UNREACHABLE" in output


@pytest.mark.parametrize(
    ("extra_vars", "named"),
    [
        (
            {"rollout_strategy": "blue-green"},
            "rollout_strategy must be one of: restart, reload, got: blue-green",
        ),
        ({"rollout_canary": "perhaps"}, "rollout_canary"),
        ({"rollout_canary_seconds": "soon"}, "rollout_canary_seconds"),
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
    code, output = rollout(inventory, {"version_id": "8386b9ac7214", "rollout_serial": "50%"})
    assert code != 0
    assert "Rollout settings are wrong" not in output
    assert "UNREACHABLE" in output


@pytest.fixture
def two_models(tmp_path: Path) -> Path:
    """gpu-a serves the default model (group all's), gpu-b another: a cluster of two models."""
    inventory = unreachable_inventory(tmp_path)
    content = yaml.safe_load(inventory.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"] = {"metalserve_model_name": "other-llama"}
    inventory.write_text(yaml.safe_dump(content))
    return inventory


def test_with_several_models_a_rollout_must_name_one(two_models: Path) -> None:
    code, output = rollout(two_models, {"version_id": "8386b9ac7214"})
    assert code != 0
    said = " ".join(output.split())
    assert (
        "The hosts of this run serve several models: name one of tiny-llama, other-llama with -e rollout_model" in said
    )
    assert "PLAY [Plan the rollout" not in output
    assert "UNREACHABLE" not in output
    code, output = rollout(two_models, {"version_id": "8386b9ac7214", "rollout_model": "nope"})
    assert code != 0
    assert "rollout_model nope is served by no host of this run" in " ".join(output.split())
    # Limited to one model's hosts, the run needs no name; to another's, it refuses.
    code, output = rollout(two_models, {"version_id": "latest"}, "--limit", "gpu-b")
    assert "version_id on gpu-b must be a version id" in output
    code, output = rollout(two_models, {"version_id": "latest", "rollout_model": "tiny-llama"}, "--limit", "gpu-b")
    assert "rollout_model tiny-llama is served by no host of this run" in " ".join(output.split())


def test_a_rollout_runs_on_its_models_hosts_only(two_models: Path) -> None:
    """The first check that names a host (the version's) names the model's host alone."""
    code, output = rollout(two_models, {"version_id": "latest", "rollout_model": "other-llama"})
    assert code != 0
    assert "version_id on gpu-b must be a version id" in output
    planned = output.split("PLAY [Plan the rollout", 1)[1].split("PLAY RECAP", 1)[0]
    assert "gpu-b" in planned
    assert "gpu-a" not in planned


def test_a_canary_whose_batches_could_mix_the_sides_of_a_split_is_refused(two_models: Path) -> None:
    """gpu-b serves variant b of the default model: with a canary, batches of two would mix the
    sides (its servers judged against another backend's); one host per batch is fine."""
    content = yaml.safe_load(two_models.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"] = {"metalserve_model_variant": "b"}
    two_models.write_text(yaml.safe_dump(content))
    settings = {"version_id": "8386b9ac7214", "rollout_canary": True}
    code, output = rollout(two_models, {**settings, "rollout_serial": 2})
    assert code != 0
    assert "could mix the sides of an A/B split (tiny-llama, tiny-llama:b)" in " ".join(output.split())
    assert "UNREACHABLE" not in output
    code, output = rollout(two_models, {**settings, "rollout_serial": 1})
    assert "could mix the sides" not in output
    assert "UNREACHABLE" in output  # past the controller's checks, on to the hosts
