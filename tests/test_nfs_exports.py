"""The kernel NFS server's /etc/exports, rendered by Ansible as nfs_server renders it.

nfsd cannot run on the lab machine (no kernel NFS), so the kernel implementation's
exports are checked here; the ganesha implementation runs for real in the cluster scenario
(molecule/cluster/verify_nfs_server.yml).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from repo_helpers import BIN, REPO


def render_exports(tmp_path: Path, **variables: object) -> str:
    out = tmp_path / "exports"
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({**variables, "ansible_python_interpreter": str(BIN / "python")}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-c",
            "local",
            "-i",
            "localhost,",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={REPO}/roles/nfs_server/templates/exports.j2 dest={out}",
            "-e",
            f"@{extra}",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    return out.read_text()


def test_gpu_nodes_read_only_publishers_read_write(tmp_path: Path) -> None:
    text = render_exports(
        tmp_path,
        nfs_server_export_path="/srv/models",
        nfs_server_ro_clients=["198.18.0.31", "198.18.0.32"],
        nfs_server_rw_clients=["198.18.0.40"],
        nfs_server_squash="root_squash",
    )
    export_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert export_lines == [
        "/srv/models 198.18.0.31(ro,root_squash,no_subtree_check,sec=sys)"
        " 198.18.0.32(ro,root_squash,no_subtree_check,sec=sys)"
        " 198.18.0.40(rw,root_squash,no_subtree_check,sec=sys)"
    ]
    assert text.startswith("#"), "the managed-file header is missing"


def test_no_publishers_means_no_writers(tmp_path: Path) -> None:
    text = render_exports(
        tmp_path,
        nfs_server_export_path="/data/store",
        nfs_server_ro_clients=["198.18.0.31"],
        nfs_server_rw_clients=[],
        nfs_server_squash="all_squash",
    )
    assert "rw," not in text
    assert "/data/store 198.18.0.31(ro,all_squash,no_subtree_check,sec=sys)\n" in text
