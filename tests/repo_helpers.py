"""Shared helpers for the repository-level tests.

A plain module, not conftest.py: files/serving/tests has the conftest module of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_playbook(playbook: str, inventory: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ansible-playbook from the repository root, as `make` does."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(REPO / playbook), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# The variables preflight.yml requires, and the groups it requires, for inventories the tests write.
GOOD_VARS = {
    "metalserve_model_name": "tiny-llama",
    "metalserve_store_export": "/srv/models",
    "metalserve_store_mount": "/mnt/models",
    "model_replica_version": "8386b9ac7214",
}
GOOD_GROUPS = {"gpu_nodes": ["gpu-a", "gpu-b"], "loadbalancers": ["lb-a"], "model_store": ["nfs-a"]}


def write_inventory(directory: Path, groups: dict[str, list[str]], all_vars: dict[str, object]) -> Path:
    children = {name: {"hosts": dict.fromkeys(hosts) or None} for name, hosts in groups.items()}
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"children": children, "vars": all_vars}}))
    return path


def unreachable_inventory(directory: Path) -> Path:
    """A good inventory whose hosts cannot be reached: a run fails at the first host contact, so
    a refusal that names a setting proves the check came before any host was touched."""
    return write_inventory(directory, GOOD_GROUPS, {**GOOD_VARS, "ansible_host": "metalserve-test-host.invalid"})


def render_role_templates(role: str, templates: dict[str, Path], overrides: dict[str, object], work: Path) -> None:
    """Render templates of ``roles/<role>/templates`` (name -> destination) through Ansible, with
    role metalserve's defaults, the role's defaults and vars, then ``overrides``."""
    role_dir = REPO / "roles" / role
    tasks = [
        {"ansible.builtin.template": {"src": str(role_dir / "templates" / name), "dest": str(dest)}}
        for name, dest in templates.items()
    ]
    playbook = work / f"render-{role}.yml"
    playbook.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    variables = [REPO / "roles" / "metalserve" / "defaults" / "main.yml", role_dir / "defaults" / "main.yml"]
    variables.append(role_dir / "vars" / "main.yml")
    extra = [arg for path in variables if path.exists() for arg in ("-e", f"@{path}")]
    local = ["-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={BIN / 'python'}"]
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), *local, *extra, "-e", json.dumps(overrides), str(playbook)],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_keepalived_notify(work: Path, state: str) -> str:
    """Role keepalived's notify script, rendered with its textfile directory under ``work`` and
    run as keepalived runs it on a change to ``state``; returns the textfile it wrote."""
    script = work / "notify.sh"
    render_role_templates(
        "keepalived",
        {"metalserve-notify.sh.j2": script},
        {"metalserve_textfile_dir": str(work / "textfile"), "keepalived_virtual_ip": "198.18.0.100"},
        work,
    )
    subprocess.run(["sh", str(script), "INSTANCE", "metalserve_vip", state, "200"], check=True, timeout=30)
    return (work / "textfile" / "keepalived.prom").read_text()
