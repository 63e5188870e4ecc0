"""The shipped inventories stay coherent with the lab network rules."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import pytest
import yaml

from repo_helpers import BIN, REPO

LAB_NET = ipaddress.ip_network("198.18.0.0/24")


def inventory_dump(name: str) -> dict:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    out = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(REPO / "inventories" / name), "--list"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def group_names(dump: dict) -> set[str]:
    """Every group named in an inventory dump, empty ones included (those show only as children)."""
    names = {k for k in dump if k != "_meta"}
    for entry in dump.values():
        names.update(entry.get("children", []))
    return names


def test_lab_nodes_have_unique_addresses_on_the_lab_network() -> None:
    dump = inventory_dump("lab")
    hostvars = dump["_meta"]["hostvars"]
    nodes = [
        h
        for group in ("loadbalancers", "model_store", "gpu_nodes", "monitoring")
        for h in dump.get(group, {}).get("hosts", [])
    ]
    assert {"lb1", "store1", "gpu1", "gpu2"} <= set(nodes)
    addresses = [ipaddress.ip_address(hostvars[h]["ansible_host"]) for h in nodes]
    assert len(set(addresses)) == len(addresses), "two lab nodes share an address"
    for host, address in zip(nodes, addresses, strict=True):
        assert address in LAB_NET, f"{host} is outside {LAB_NET}"
        assert address != ipaddress.ip_address("198.18.0.1"), f"{host} takes the gateway address"


def test_lab_subnet_is_the_benchmarking_range() -> None:
    lab_vars = subprocess.run(
        [
            str(BIN / "ansible"),
            "-i",
            str(REPO / "inventories/lab"),
            "localhost",
            "-m",
            "ansible.builtin.debug",
            "-a",
            "var=lab_subnet",
            "-o",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "198.18.0.0/24" in lab_vars


def test_example_inventory_has_the_same_groups_as_the_lab() -> None:
    lab = group_names(inventory_dump("lab"))
    example_dump = inventory_dump("example")
    example = group_names(example_dump)
    for group in ("gpu_nodes", "loadbalancers", "model_store", "monitoring"):
        assert group in example, f"inventories/example lacks group {group}"
        assert group in lab, f"inventories/lab lacks group {group}"
    assert not any(k.startswith("lab_") for hv in example_dump["_meta"]["hostvars"].values() for k in hv), (
        "lab_* settings belong to the lab inventory only"
    )


@pytest.mark.parametrize("inventory", ["example", "lab"])
def test_every_setting_is_one_a_role_or_the_preflight_reads(inventory: str) -> None:
    """A knob renamed or removed in a role must not linger in an inventory, silently ignored."""
    known = {"metalserve_model_name", "metalserve_store_export", "metalserve_store_mount", "metalserve_store_server"}
    known |= {"metalserve_address"}  # the address other nodes use for a host, read by several roles
    for spec in (REPO / "roles").glob("*/meta/argument_specs.yml"):
        for entry in yaml.safe_load(spec.read_text())["argument_specs"].values():
            known |= set((entry or {}).get("options") or {})
    hostvars = inventory_dump(inventory)["_meta"]["hostvars"]
    set_here = {name for variables in hostvars.values() for name in variables}
    # ansible_* and vault_* are Ansible's and the vault's; lab_* build the lab (playbooks/lab/).
    unknown = {name for name in set_here - known if not name.startswith(("ansible_", "vault_", "lab_"))}
    assert not unknown, f"inventories/{inventory} sets variables no role or preflight reads: {sorted(unknown)}"
