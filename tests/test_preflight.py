"""playbooks/preflight.yml stops a broken inventory with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from repo_helpers import GOOD_GROUPS, GOOD_VARS, REPO, run_playbook, write_inventory


def good_groups() -> dict[str, list[str]]:
    return {name: list(hosts) for name, hosts in GOOD_GROUPS.items()}


@pytest.mark.parametrize("inventory", ["inventories/lab", "inventories/example"])
def test_shipped_inventories_pass(inventory: str) -> None:
    result = run_playbook("playbooks/preflight.yml", REPO / inventory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_minimal_inventory_passes(tmp_path: Path) -> None:
    result = run_playbook("playbooks/preflight.yml", write_inventory(tmp_path, good_groups(), GOOD_VARS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_group_is_named(tmp_path: Path) -> None:
    groups = good_groups()
    del groups["gpu_nodes"]
    result = run_playbook("playbooks/preflight.yml", write_inventory(tmp_path, groups, GOOD_VARS))
    assert result.returncode != 0
    assert "Inventory group 'gpu_nodes' is missing" in result.stdout


def test_empty_group_is_named(tmp_path: Path) -> None:
    groups = good_groups()
    groups["loadbalancers"] = []
    result = run_playbook("playbooks/preflight.yml", write_inventory(tmp_path, groups, GOOD_VARS))
    assert result.returncode != 0
    assert "Inventory group 'loadbalancers' is empty" in result.stdout


def test_missing_variable_names_variable_and_hosts(tmp_path: Path) -> None:
    all_vars = {k: v for k, v in GOOD_VARS.items() if k != "metalserve_store_mount"}
    result = run_playbook("playbooks/preflight.yml", write_inventory(tmp_path, good_groups(), all_vars))
    assert result.returncode != 0
    assert "Variable 'metalserve_store_mount' is not set for host(s) " in result.stdout
    for host in ("gpu-a", "gpu-b", "lb-a", "nfs-a"):
        assert host in result.stdout


def test_an_engine_process_over_several_gpus_is_named(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, good_groups(), GOOD_VARS)
    content = yaml.safe_load(inventory.read_text())
    hosts = content["all"]["children"]["gpu_nodes"]["hosts"]
    hosts["gpu-a"] = {"model_replica_engine_process": True, "model_replica_gpus_per_replica": 1}
    hosts["gpu-b"] = {"model_replica_engine_process": True, "model_replica_gpus_per_replica": 2}
    inventory.write_text(yaml.safe_dump(content))
    result = run_playbook("playbooks/preflight.yml", inventory)
    assert result.returncode != 0
    assert "model_replica_engine_process is true on gpu-b, whose replicas span" in " ".join(result.stdout.split())
    hosts["gpu-b"]["model_replica_gpus_per_replica"] = 1
    inventory.write_text(yaml.safe_dump(content))
    result = run_playbook("playbooks/preflight.yml", inventory)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"model_replica_api_processes": 2, "model_replica_engine_process": False}, True),
        ({"model_replica_api_processes": 2, "model_replica_device": "cpu"}, True),
        ({"model_replica_api_processes": 2, "model_replica_gpus_per_replica": 2}, True),
        ({"model_replica_api_processes": 2}, False),  # CUDA, one GPU: the server's default
        (
            {"model_replica_api_processes": 2, "model_replica_device": "cpu", "model_replica_engine_process": True},
            False,
        ),
    ],
)
def test_several_api_processes_without_an_engine_process_are_named(
    tmp_path: Path, settings: dict[str, object], refused: bool
) -> None:
    inventory = write_inventory(tmp_path, good_groups(), GOOD_VARS)
    content = yaml.safe_load(inventory.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"] = settings
    inventory.write_text(yaml.safe_dump(content))
    result = run_playbook("playbooks/preflight.yml", inventory)
    if refused:
        assert result.returncode != 0
        assert "model_replica_api_processes is more than 1 on gpu-b," in " ".join(result.stdout.split())
    else:
        assert result.returncode == 0, result.stdout + result.stderr


def test_empty_variable_counts_as_missing(tmp_path: Path) -> None:
    result = run_playbook(
        "playbooks/preflight.yml",
        write_inventory(tmp_path, good_groups(), {**GOOD_VARS, "metalserve_model_name": ""}),
    )
    assert result.returncode != 0
    assert "Variable 'metalserve_model_name' is not set" in result.stdout


def write_two_models(tmp_path: Path, gpu_b_model: str, all_vars: dict[str, object] = GOOD_VARS) -> Path:
    """gpu-a serves group all's model, gpu-b its own."""
    inventory = write_inventory(tmp_path, good_groups(), all_vars)
    content = yaml.safe_load(inventory.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"] = {"metalserve_model_name": gpu_b_model}
    inventory.write_text(yaml.safe_dump(content))
    return inventory


def test_two_models_pass_and_bad_model_names_are_named(tmp_path: Path) -> None:
    assert run_playbook("playbooks/preflight.yml", write_two_models(tmp_path, "other-llama_2.5")).returncode == 0
    result = run_playbook("playbooks/preflight.yml", write_two_models(tmp_path, "org/llama"))
    assert result.returncode != 0
    assert "metalserve_model_name of gpu-b: org/llama is not a model name" in " ".join(result.stdout.split())


def test_a_bad_variant_name_is_named(tmp_path: Path) -> None:
    inventory = write_two_models(tmp_path, "tiny-llama")
    content = yaml.safe_load(inventory.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"]["metalserve_model_variant"] = "B:1"
    inventory.write_text(yaml.safe_dump(content))
    result = run_playbook("playbooks/preflight.yml", inventory)
    assert result.returncode != 0
    assert "metalserve_model_variant of gpu-b: B:1 is not a variant name" in " ".join(result.stdout.split())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-b"]["metalserve_model_variant"] = "canary-2"
    inventory.write_text(yaml.safe_dump(content))
    assert run_playbook("playbooks/preflight.yml", inventory).returncode == 0


def test_the_default_model_must_be_served(tmp_path: Path) -> None:
    """Every GPU node serves another model than group all's: nothing would answer a request
    that names none."""
    inventory = write_two_models(tmp_path, "other-llama")
    content = yaml.safe_load(inventory.read_text())
    content["all"]["children"]["gpu_nodes"]["hosts"]["gpu-a"] = {"metalserve_model_name": "other-llama"}
    inventory.write_text(yaml.safe_dump(content))
    result = run_playbook("playbooks/preflight.yml", inventory)
    assert result.returncode != 0
    assert "The default model (metalserve_model_name of group all: tiny-llama) is served by no GPU node" in " ".join(
        result.stdout.split()
    )


def test_store_without_server_is_named(tmp_path: Path) -> None:
    groups = good_groups()
    del groups["model_store"]
    result = run_playbook("playbooks/preflight.yml", write_inventory(tmp_path, groups, GOOD_VARS))
    assert result.returncode != 0
    assert "'model_store' is empty and metalserve_store_server is not set" in result.stdout
    # An external NFS appliance instead of a model_store host is fine.
    ok = run_playbook(
        "playbooks/preflight.yml",
        write_inventory(tmp_path, groups, {**GOOD_VARS, "metalserve_store_server": "nfs.example.net"}),
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({}, False),  # the defaults agree: the drain waits 10 s longer than HAProxy's server timeout
        ({"lb_drain_timeout": 120}, True),  # a 300 s stream would outlive the drain
        ({"lb_drain_timeout": 120, "lb_drain_cut_sessions": True}, False),  # cutting, on purpose
        ({"lb_drain_timeout": 120, "metalserve_request_timeout": 100}, False),
        ({"haproxy_timeout_server": "10m"}, True),  # HAProxy's own units: 600 s
        ({"haproxy_timeout_server": "90000"}, False),  # no unit: milliseconds
    ],
)
def test_drain_and_request_timeouts_must_agree(tmp_path: Path, settings: dict[str, object], refused: bool) -> None:
    inventory = write_inventory(tmp_path, good_groups(), {**GOOD_VARS, **settings})
    result = run_playbook("playbooks/preflight.yml", inventory)
    output = result.stdout + result.stderr
    assert (result.returncode != 0) == refused, output
    assert ("is shorter than the longest request HAProxy allows" in output) == refused, output


def first_import(playbook: Path) -> str | None:
    plays = yaml.safe_load(playbook.read_text())
    return plays[0].get("ansible.builtin.import_playbook")


def test_entry_playbooks_import_preflight_first() -> None:
    """Every entry playbook's first play is the preflight, directly or through its first import."""
    for playbook in sorted((REPO / "playbooks").glob("*.yml")):
        if playbook.name in ("preflight.yml", "wheel.yml"):  # imported parts, not entry points
            continue
        chain, current = [playbook.name], playbook
        while (target := first_import(current)) not in (None, "preflight.yml"):
            current = current.parent / target
            chain.append(target)
        assert target == "preflight.yml", f"{' -> '.join(chain)} does not start with preflight.yml"
