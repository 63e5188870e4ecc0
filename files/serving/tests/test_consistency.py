from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN, Server, Store, free_port, run_cli
from metalserve.autoscale.haproxy import RuntimeAPI
from metalserve.consistency import ReplicaAnswer, Verdict, compare, render_table
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
        # The periodic check: two versions serve during a rollout by design.
        per_version = run_cli(
            "consistency", api_server.url, reload_server.url, "--prompt", "Hi", "--per-version"
        )
    finally:
        switch(reload_server, model_store.v1)
    assert per_version.returncode == ExitCode.OK, per_version.stdout + per_version.stderr
    assert "OK: 2 replicas gave identical output (compared within each of 2 versions)" in (
        per_version.stdout
    )
    assert different.returncode == ExitCode.FAILURE
    table = different.stdout
    assert "INCONSISTENT: 1 of 1 prompts differ; 1 replicas answered differently" in table
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


def answer(tokens: list[str], chosen: list[float], top: list[dict[str, float]]) -> ReplicaAnswer:
    return ReplicaAnswer(
        "http://r:8000", "1" * 64, "".join(tokens), None, tuple(tokens), tuple(chosen), tuple(top)
    )


def test_a_swap_of_two_near_equal_tokens_is_a_tie_not_a_difference() -> None:
    """Where the texts part, both replicas ranked both tokens within the tolerance: the
    summation order of another batch size can swap them; whatever follows says nothing."""
    a = answer(
        [" the", " cat", " sat"],
        [-0.5, -0.70, -0.1],
        [{" the": -0.5}, {" cat": -0.70, " dog": -0.72}, {}],
    )
    b = answer(
        [" the", " dog", " ran"],
        [-0.5, -0.69, -0.2],
        [{" the": -0.5}, {" dog": -0.69, " cat": -0.71}, {}],
    )
    assert compare(a, b) is Verdict.TIE
    assert compare(a, a) is Verdict.SAME


@pytest.mark.parametrize(
    "b_top",
    [
        pytest.param({" dog": -0.1, " cat": -3.0}, id="a clear lead"),
        pytest.param({" dog": -0.1, " cow": -0.2}, id="not among the two best"),
    ],
)
def test_a_part_on_a_clear_lead_is_a_difference(b_top: dict[str, float]) -> None:
    a = answer([" the", " cat"], [-0.5, -0.70], [{" the": -0.5}, {" cat": -0.70, " dog": -0.72}])
    b = answer([" the", " dog"], [-0.5, -0.1], [{" the": -0.5}, b_top])
    assert compare(a, b) is Verdict.DIFFERENT


def test_texts_that_differ_without_logprobs_differ() -> None:
    a = ReplicaAnswer("http://a", None, "one")
    b = ReplicaAnswer("http://b", None, "two")
    assert compare(a, b) is Verdict.DIFFERENT


@pytest.mark.e2e
def test_periodic_check_writes_the_difference_rate_and_each_replica(
    api_server: Server, reload_server: Server, model_store: Store, tmp_path: Path
) -> None:
    """Four prompts on every replica: the same version gives no difference; another version on
    one replica differs on every prompt, and the textfile names it."""
    textfile = tmp_path / "textfile" / "metalserve_consistency.prom"
    switch(reload_server, model_store.v1)
    urls = (api_server.url, reload_server.url)
    same = run_cli("consistency", *urls, "--prompts", "4", "--textfile", str(textfile))
    assert same.returncode == ExitCode.OK, same.stdout + same.stderr
    assert metrics(textfile)[("metalserve_consistency_difference_rate", ())] == 0.0

    switch(reload_server, model_store.v2)
    try:
        different = run_cli("consistency", *urls, "--prompts", "4", "--textfile", str(textfile))
    finally:
        switch(reload_server, model_store.v1)
    assert different.returncode == ExitCode.FAILURE, different.stdout
    assert "INCONSISTENT: 4 of 4 prompts differ" in different.stdout
    samples = metrics(textfile)
    assert samples[("metalserve_consistency_difference_rate", ())] == 1.0
    assert samples[("metalserve_consistency_prompts", ())] == 4
    # The version the others share is the reference: api_server's (the first on a 1-1 split).
    assert (
        samples[("metalserve_consistency_replica_different", (("replica", reload_server.url),))]
        == 4
    )
    assert (
        samples[("metalserve_consistency_replica_different", (("replica", api_server.url),))] == 0
    )


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The textfile's samples, by name and labels other than model."""
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model"))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


@pytest.mark.e2e
def test_the_timer_finds_the_replicas_in_haproxy_and_skips_while_one_is_drained(
    api_server: Server, reload_server: Server, model_store: Store, tmp_path: Path
) -> None:
    """--haproxy-socket: the servers HAProxy reports up and in rotation are checked; with one
    drained (what a rollout does to the host it switches) nothing is compared and the textfile
    says skipped."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed: `make deps` installs it (HOST_PACKAGES)")
    switch(reload_server, model_store.v1)
    sock, textfile = tmp_path / "admin.sock", tmp_path / "consistency.prom"
    servers = "".join(
        f"  server r{i} 127.0.0.1:{s.port} check inter 200\n"
        for i, s in enumerate((api_server, reload_server))
    )
    # A warm standby (weight 0) takes no part until promoted.
    servers += f"  server standby 127.0.0.1:{api_server.port} check inter 200 weight 0\n"
    # The other side of an A/B split is compared too; another model's backend is not.
    (tmp_path / "haproxy.cfg").write_text(
        f"global\n  stats socket {sock} mode 600 level admin\n"
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n"
        f"backend replicas\n  option httpchk GET /readyz\n{servers}"
        f"backend replicas:b\n  server rb 127.0.0.1:{api_server.port} check inter 200\n"
        f"backend replicas-other\n  server ro 127.0.0.1:{reload_server.port} check inter 200\n"
    )
    process = subprocess.Popen([binary, "-db", "-f", str(tmp_path / "haproxy.cfg")])
    try:
        api = RuntimeAPI(sock)
        deadline = time.monotonic() + 10
        while not (sock.exists() and all(s.healthy for s in api.servers("replicas"))):
            assert time.monotonic() < deadline, "the servers did not come up in HAProxy"
            time.sleep(0.1)
        args = ("consistency", "--haproxy-socket", str(sock), "--backend", "replicas")
        checked = run_cli(*args, "--textfile", str(textfile))
        assert checked.returncode == ExitCode.OK, checked.stdout + checked.stderr
        assert api_server.url in checked.stdout
        assert reload_server.url in checked.stdout
        assert "OK: 3 replicas" in checked.stdout
        assert metrics(textfile)[("metalserve_consistency_skipped", ())] == 0

        api.command("set server replicas/r1 state drain")
        skipped = run_cli(*args, "--textfile", str(textfile))
        assert skipped.returncode == ExitCode.OK, skipped.stdout + skipped.stderr
        assert "SKIPPED: r1 drained" in skipped.stdout
        samples = metrics(textfile)
        assert samples[("metalserve_consistency_skipped", ())] == 1
        assert ("metalserve_consistency_difference_rate", ()) not in samples
    finally:
        process.terminate()
        process.wait(timeout=10)
