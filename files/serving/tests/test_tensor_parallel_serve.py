"""``metalserve serve --tensor-parallel 2`` on the CPU (gloo): one replica of two processes,
its contract unchanged from outside, and a rank's death taking it down whole."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    ADMIN_TOKEN,
    MODEL,
    Server,
    Store,
    complete,
    copy_store,
    serve_args,
    wait_all_ready,
)
from engine_helpers import SMALL_BLOCKS, corrupt_rank_1_only_block
from metalserve import store
from metalserve.cache import VersionCache
from metalserve.exitcodes import ExitCode

PROMPTS = ["The model store says", "Once upon a time", "1 2 3 4"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exits(server: Server, timeout: float) -> int | None:
    assert server.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return server.proc.returncode
        time.sleep(0.1)
    return None


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_two_ranks_serve_the_one_rank_text_and_stop_together(
    model_store: Store,
    admin_token_file: Path,
    api_server: Server,
    tmp_path: Path,
) -> None:
    """Two replicas of two ranks each, started together: the first, its layer compiled on both
    ranks (the all-reduce in the compiled graph), answers like a one-rank replica (the session's
    api server) and lists both ranks' verified versions, reloads another version and back across
    both ranks, refuses a version bad only in rank 1's rows (rank 0 verifies every block before
    the other ranks drop theirs) and serves on, and stops both its processes on SIGTERM. The
    second, eager, starts from a node cache whose copy is bad only in rank 1's rows: rank 1
    loads the store's copy, rank 0 drops the cached one; it then loses its rank 1 to SIGKILL and
    exits with RANK_FAILED, naming it."""
    # Versions of 4 KiB blocks, so that rank 1's rows hold blocks rank 0 never reads.
    root = copy_store(model_store.root, tmp_path / "store")
    bad = store.publish(model_store.sources[3], root, MODEL, block_size=SMALL_BLOCKS)
    corrupt_rank_1_only_block(store.version_dir(root, MODEL, bad) / "model.safetensors")
    seed2 = store.publish(model_store.sources[2], root, MODEL, block_size=SMALL_BLOCKS)
    cache_dir = tmp_path / "cache"
    assert VersionCache(cache_dir, 2**30).add(root, MODEL, seed2)
    corrupt_rank_1_only_block(store.version_dir(cache_dir, MODEL, seed2) / "model.safetensors")
    copied = dataclasses.replace(model_store, root=root)

    flags: dict[str, Any] = {"tensor_parallel": 2, "no_access_log": True, "max_new_tokens": 64}
    served = Server(
        serve_args(copied, admin_token_file=admin_token_file, decode_compile="on", **flags),
        tmp_path / "a.log",
    ).start()
    doomed = Server(
        serve_args(copied, version=seed2, cache_dir=cache_dir, **flags), tmp_path / "b.log"
    ).start()
    try:
        wait_all_ready(served, doomed, timeout=150)
        with httpx.Client(base_url=served.url, timeout=30.0) as client:
            version = client.get("/version").json()
            assert version["tensor_parallel"] == 2
            assert [r["rank"] for r in version["ranks"]] == [0, 1], version
            assert {r["version_id"] for r in version["ranks"]} == {model_store.v1}
            assert all(r["verified"] for r in version["ranks"])
            # Each rank's own load (issue 22 asks for it per rank), rank 1's beside rank 0's.
            assert all(r["load_seconds"] >= r["weights_seconds"] > 0 for r in version["ranks"])
            # The ranks loaded at the same time, not one after the other: their loads overlap.
            spans = [(r["loaded_at"] - r["load_seconds"], r["loaded_at"]) for r in version["ranks"]]
            assert max(start for start, _ in spans) < min(end for _, end in spans), spans
            assert version["decode_path"] == "static", version
            assert version["decode_compiled"] is True, version
            pids = [r["pid"] for r in version["ranks"]]
            assert pids[0] == served.proc.pid  # type: ignore[union-attr]
            assert pids[1] != pids[0]
            with httpx.Client(base_url=api_server.url, timeout=30.0) as one_rank:
                for prompt in PROMPTS:
                    got = complete(client, prompt)["choices"][0]["text"]
                    assert got == complete(one_rank, prompt)["choices"][0]["text"], prompt
            # Hot reload across the ranks: there and back, each rank on the version each time,
            # rank 1 the same process, and the text again the one-rank replica's.
            for version in (model_store.v2, model_store.v1):
                reload = client.post(
                    "/admin/reload",
                    json={"version": version},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
                assert reload.status_code == 200, reload.text
                assert reload.json()["version_id"] == version, reload.text
                ranks = client.get("/version").json()["ranks"]
                assert [(r["pid"], r["version_id"]) for r in ranks] == [(p, version) for p in pids]
                if version == model_store.v2:
                    answer = complete(client, PROMPTS[0])
                    assert answer["system_fingerprint"].endswith(version[:12])
                    seed2_text = answer["choices"][0]["text"]
            refused = client.post(
                "/admin/reload",
                json={"version": bad},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["code"] == "verification_failed", refused.text
            ranks = client.get("/version").json()["ranks"]
            assert [(r["pid"], r["version_id"]) for r in ranks] == [
                (p, model_store.v1) for p in pids
            ]
            with httpx.Client(base_url=api_server.url, timeout=30.0) as one_rank:
                for prompt in PROMPTS:
                    got = complete(client, prompt)["choices"][0]["text"]
                    assert got == complete(one_rank, prompt)["choices"][0]["text"], prompt
        assert served.stop() == ExitCode.OK, served.log()[-3000:]
        assert not _alive(pids[1]), "rank 1 outlived the replica's stop"

        with httpx.Client(base_url=doomed.url, timeout=30.0) as client:
            ranks = client.get("/version").json()["ranks"]
            assert [r["cache_copy_failed"] for r in ranks] == [False, True], ranks
            assert complete(client, PROMPTS[0])["choices"][0]["text"] == seed2_text
            rank1 = ranks[1]["pid"]
        assert not store.version_dir(cache_dir, MODEL, seed2).exists(), "the bad copy stayed"
        os.kill(rank1, signal.SIGKILL)
        code = _exits(doomed, 30)
        log = doomed.log()
        assert code == ExitCode.RANK_FAILED, (code, log[-3000:])
        assert f"rank 1 (pid {rank1}) exited with signal SIGKILL" in log, log[-3000:]
    finally:
        served.stop()
        doomed.stop()
