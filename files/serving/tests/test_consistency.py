from __future__ import annotations

import httpx
import pytest

from conftest import ADMIN_TOKEN, Server, Store, free_port, run_cli
from metalserve.consistency import ReplicaAnswer, render_table
from metalserve.exitcodes import ExitCode


def switch(server: Server, version: str) -> None:
    response = httpx.post(
        f"{server.url}/admin/reload",
        json={"version": version},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text


@pytest.mark.e2e
def test_same_version_is_consistent_other_version_is_not(
    api_server: Server, reload_server: Server, model_store: Store
) -> None:
    switch(reload_server, model_store.v1)
    same = run_cli("consistency", api_server.url, reload_server.url)
    assert same.returncode == ExitCode.OK, same.stdout + same.stderr
    assert "OK: 2 replicas" in same.stdout

    switch(reload_server, model_store.v2)
    try:
        different = run_cli("consistency", api_server.url, reload_server.url, "--prompt", "Hi")
    finally:
        switch(reload_server, model_store.v1)
    assert different.returncode == ExitCode.FAILURE
    table = different.stdout
    assert "INCONSISTENT: 2 distinct outputs" in table
    assert api_server.url in table
    assert reload_server.url in table
    assert model_store.v1[:12] in table
    assert model_store.v2[:12] in table


@pytest.mark.e2e
def test_unreachable_replica_is_a_failure(api_server: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = run_cli("consistency", api_server.url, dead, "--timeout", "5")
    assert result.returncode == ExitCode.FAILURE
    assert "unreachable" in result.stdout
    assert "1 failed replicas" in result.stdout


def test_table_groups_identical_outputs() -> None:
    answers = [
        ReplicaAnswer("http://a:8000", "1" * 64, "same"),
        ReplicaAnswer("http://b:8000", "2" * 64, "other"),
        ReplicaAnswer("http://c:8000", "1" * 64, "same"),
        ReplicaAnswer("http://d:8000", None, None, "unreachable: ConnectError"),
    ]
    lines = render_table(answers).splitlines()
    assert lines[0].split()[:3] == ["replica", "version", "group"]
    assert lines[1].split()[:3] == ["http://a:8000", "1" * 12, "A"]
    assert lines[2].split()[:3] == ["http://b:8000", "2" * 12, "B"]
    assert lines[3].split()[2] == "A"
    assert "FAIL" in lines[4]
    assert "unreachable" in lines[4]
