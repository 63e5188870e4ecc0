"""The lab inventory pins the version id of the tiny model `make lab` publishes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from repo_helpers import BIN, REPO


def test_pinned_lab_version_is_the_seed_1_tiny_model(tmp_path: Path) -> None:
    replica_vars = yaml.safe_load((REPO / "inventories/lab/group_vars/gpu_nodes/replica.yml").read_text())
    pinned = replica_vars["model_replica_version"]
    metalserve = str(BIN / "metalserve")
    subprocess.run(
        [metalserve, "make-tiny-model", str(tmp_path / "model"), "--seed", "1"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    published = subprocess.run(
        [metalserve, "publish", str(tmp_path / "model"), "--store", str(tmp_path / "store"), "--model", "tiny-llama"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert published.stdout.strip().splitlines()[-1] == pinned, (
        "make-tiny-model --seed 1 no longer publishes the version inventories/lab pins: "
        "update model_replica_version there"
    )
