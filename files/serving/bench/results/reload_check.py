"""GPU check of metalserve: hot reload and seeded sampling on the cuda-graphs decode path.

Builds two seeded Llama-shaped models (bench_serve helpers), publishes them into a temp store,
runs `metalserve serve` on loopback and checks reload under load, determinism and sampling.
Writes $OUT/summary.json (and the server logs). Every loop is bounded; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import torch

import metalserve
from metalserve import bench_serve, store

T0 = time.monotonic()
OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpucheck-"))
OUT.mkdir(parents=True, exist_ok=True)
MODEL = "gpucheck"
TOKEN = "gpucheck-admin-token-0123456789"  # noqa: S105 - a throwaway server on loopback
PRESET = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
GLOBAL_DEADLINE = T0 + 330.0  # the whole script; the run's own limit is above this
bench_serve.PRESETS["gpucheck"] = PRESET
bench_serve.SERVER_READY_TIMEOUT = 150.0

summary: dict[str, Any] = {"assertions": {}, "info": {}, "timings": {}, "errors": []}


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def check(name: str, ok: bool, detail: Any = None) -> bool:
    summary["assertions"][name] = {
        "ok": bool(ok),
        **({"detail": detail} if detail is not None else {}),
    }
    log(
        f"{'PASS' if ok else 'FAIL'} {name}"
        + (f": {detail}" if detail is not None and not ok else "")
    )
    return ok


def remaining() -> float:
    return GLOBAL_DEADLINE - time.monotonic()


# --- models ---------------------------------------------------------------------------------


def build_versions(base: Path) -> tuple[Path, str, str]:
    store_root = base / "store"
    ids = []
    for seed in (11, 22):
        src = base / f"src{seed}"
        opts = bench_serve.ServeOptions(dir=base, preset="gpucheck", seed=seed, device="cuda")
        started = time.monotonic()
        params = bench_serve._write_model(src, opts, "cuda")
        vid = store.publish(src, store_root, MODEL)
        shutil.rmtree(src, ignore_errors=True)
        summary["timings"][f"build_publish_seed{seed}_s"] = round(time.monotonic() - started, 2)
        summary["info"]["parameters"] = params
        ids.append(vid)
    return store_root, ids[0], ids[1]


# --- server ---------------------------------------------------------------------------------


class Server:
    def __init__(self, store_root: Path, version: str, name: str, token_file: Path) -> None:
        self.port = bench_serve._free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = OUT / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "metalserve",
            "serve",
            "--store",
            str(store_root),
            "--model",
            MODEL,
            "--version",
            version,
            "--device",
            "cuda",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-token-file",
            str(token_file),
            "--max-new-tokens",
            "256",
            "--no-access-log",
            "--log-level",
            "info",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALSERVE_")}
        package_root = str(Path(metalserve.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["HF_HUB_OFFLINE"] = "1"
        self.started = time.monotonic()
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            bench_serve._wait_ready(self.url, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = round(time.monotonic() - self.started, 2)

    def version(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/version", timeout=10).json()

    def reload(self, version: str, token: str = TOKEN) -> httpx.Response:
        return httpx.post(
            f"{self.url}/admin/reload",
            json={"version": version},
            headers={"Authorization": f"Bearer {token}"},
            timeout=180,
        )

    def stop(self) -> int | None:
        return bench_serve._stop(self.proc)

    def log_lines(self, pattern: str) -> list[str]:
        text = self.log_path.read_text(errors="replace")
        return [line.strip()[-220:] for line in text.splitlines() if re.search(pattern, line)]


def gpu_mem_used_mib() -> int | None:
    try:
        out = subprocess.run(
            [
                shutil.which("nvidia-smi") or "/usr/bin/nvidia-smi",
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
        return int(out.split()[0])
    except Exception:  # noqa: BLE001
        return None


def fp(vid: str) -> str:
    return f"{MODEL}@{vid[:12]}"


# --- requests -------------------------------------------------------------------------------


def completion(url: str, prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        **extra,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    doc = r.json()
    return {
        "text": doc["choices"][0]["text"],
        "finish": doc["choices"][0]["finish_reason"],
        "tokens": doc["usage"]["completion_tokens"],
        "fp": doc["system_fingerprint"],
    }


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "t_start": time.monotonic(),
        "ok": False,
        "fps": set(),
        "text": [],
        "finish": None,
        "tokens": None,
        "done": False,
        "error": None,
    }
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    rec["done"] = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    rec["error"] = f"stream error: {chunk['error']}"
                    return rec
                if chunk.get("system_fingerprint"):
                    rec["fps"].add(chunk["system_fingerprint"])
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        rec["text"].append(c["text"])
                    if c.get("finish_reason"):
                        rec["finish"] = c["finish_reason"]
                if chunk.get("usage"):
                    rec["tokens"] = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    finally:
        rec["t_end"] = time.monotonic()
    rec["ok"] = rec["done"] and rec["error"] is None
    return rec


async def nonstream_request(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "t_start": time.monotonic(),
        "ok": False,
        "fps": set(),
        "text": [],
        "finish": None,
        "tokens": None,
        "done": False,
        "error": None,
    }
    try:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
        else:
            doc = r.json()
            rec["fps"].add(doc["system_fingerprint"])
            rec["text"].append(doc["choices"][0]["text"])
            rec["finish"] = doc["choices"][0]["finish_reason"]
            rec["tokens"] = doc["usage"]["completion_tokens"]
            rec["done"] = True
            rec["ok"] = True
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["t_end"] = time.monotonic()
    return rec


async def load_with_reload(
    server: Server,
    target: str,
    prompts: list[list[int]],
    *,
    clients: int,
    max_tokens: int,
    reload_after: int,
    after_each: int,
    cap: int,
    deadline_s: float,
    mixed: bool,
) -> dict[str, Any]:
    """`clients` concurrent clients send requests back to back; after `reload_after` completions
    the reload to `target` is posted; clients stop once each did `after_each` requests started
    after the reload returned (or at `cap` per client / the deadline)."""
    deadline = time.monotonic() + min(deadline_s, max(remaining() - 60, 10))
    records: list[dict[str, Any]] = []
    reload_state: dict[str, Any] = {"sent": None, "done": None, "reply": None}
    reloaded = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

        async def one_client(cid: int) -> None:
            after = 0
            for i in range(cap):
                if time.monotonic() > deadline or after >= after_each:
                    return
                prompt = prompts[(cid * 7 + i) % len(prompts)]
                sampled = mixed and (cid + i) % 2 == 1
                body = {
                    "model": MODEL,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "temperature": 0.8 if sampled else 0.0,
                    **({"seed": 1000 + cid * 100 + i} if sampled else {}),
                }
                if sampled and cid % 4 == 1:
                    rec = await nonstream_request(client, body)
                else:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    rec = await stream_request(client, body)
                rec["client"], rec["i"], rec["sampled"] = cid, i, sampled
                records.append(rec)
                if (
                    reloaded.is_set()
                    and reload_state["done"] is not None
                    and rec["t_start"] > reload_state["done"]
                ):
                    after += 1

        async def reloader() -> None:
            for _ in range(int(deadline_s * 20)):
                if len(records) >= reload_after or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            reload_state["sent"] = time.monotonic()
            r = await client.post(
                "/admin/reload",
                json={"version": target},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=180,
            )
            reload_state["done"] = time.monotonic()
            reload_state["status"] = r.status_code
            reload_state["reply"] = (
                r.json()
                if r.headers.get("content-type", "").startswith("application/json")
                else r.text
            )
            reloaded.set()

        await asyncio.gather(reloader(), *(one_client(c) for c in range(clients)))
    return {"records": records, "reload": reload_state}


def judge_load(phase: str, result: dict[str, Any], old: str, new: str, max_tokens: int) -> None:
    recs = result["records"]
    rl = result["reload"]
    failures = [r for r in recs if not r["ok"]]
    check(f"{phase}: reload HTTP 200", rl.get("status") == 200, rl.get("reply"))
    reply = rl.get("reply") if isinstance(rl.get("reply"), dict) else {}
    check(
        f"{phase}: reload reply names new/previous version, changed",
        reply.get("version_id") == new
        and reply.get("previous_version_id") == old
        and reply.get("changed") is True,
        reply,
    )
    check(
        f"{phase}: no request failed",
        not failures,
        [r["error"] for r in failures[:5]] + ([f"... {len(failures)} in all"] if failures else []),
    )
    incomplete = [
        r for r in recs if r["ok"] and (r["tokens"] != max_tokens or r["finish"] != "length")
    ]
    check(
        f"{phase}: every response complete ({max_tokens} tokens, finish length)",
        not incomplete,
        [(r["tokens"], r["finish"]) for r in incomplete[:5]],
    )
    mixed_fp = [r for r in recs if r["ok"] and len(r["fps"]) != 1]
    check(
        f"{phase}: one fingerprint per response",
        not mixed_fp,
        [sorted(r["fps"]) for r in mixed_fp[:5]],
    )
    fa, fb = fp(old), fp(new)
    ok_recs = [r for r in recs if r["ok"] and len(r["fps"]) == 1]

    def f(r: dict[str, Any]) -> str:
        return next(iter(r["fps"]))

    before = [r for r in ok_recs if r["t_end"] < rl["sent"]]
    after = [r for r in ok_recs if r["t_start"] > rl["done"]]
    between = [r for r in ok_recs if r not in before and r not in after]
    check(
        f"{phase}: responses finished before the reload POST carry old fingerprint",
        bool(before) and all(f(r) == fa for r in before),
        {"n": len(before), "fps": sorted({f(r) for r in before})},
    )
    check(
        f"{phase}: responses started after the reload reply carry new fingerprint",
        bool(after) and all(f(r) == fb for r in after),
        {"n": len(after), "fps": sorted({f(r) for r in after})},
    )
    other = sorted({f(r) for r in ok_recs} - {fa, fb})
    check(f"{phase}: only old/new fingerprints seen", not other, other)
    # per client, requests in start order: old ... old new ... new
    regress = []
    for cid in sorted({r["client"] for r in ok_recs}):
        seq = [
            f(r)
            for r in sorted((r for r in ok_recs if r["client"] == cid), key=lambda r: r["t_start"])
        ]
        if fb in seq and fa in seq[seq.index(fb) :]:
            regress.append(cid)
    check(f"{phase}: per client, old then new (never back)", not regress, regress)
    summary["info"][phase] = {
        "requests": len(recs),
        "failed": len(failures),
        "sampled": sum(r["sampled"] for r in recs),
        "finished_before_reload_post": len(before),
        "started_after_reload_reply": len(after),
        "overlapping_reload": len(between),
        "overlapping_by_fp": {k: sum(f(r) == k for r in between) for k in (fa, fb)},
        "reload_wall_s": round(rl["done"] - rl["sent"], 3) if rl["done"] else None,
        "reload_reply_seconds": reply.get("seconds"),
        "latency_max_s": round(max((r["t_end"] - r["t_start"]) for r in recs), 3) if recs else None,
    }


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    summary["info"]["device"] = torch.cuda.get_device_name(0)
    summary["info"]["torch"] = torch.__version__
    import transformers

    summary["info"]["transformers"] = transformers.__version__
    base = Path(tempfile.mkdtemp(prefix="gpucheck-", dir="/tmp"))
    token_file = base / "admin.token"
    token_file.write_text(TOKEN + "\n")
    store_root, va, vb = build_versions(base)
    summary["info"]["version_a"], summary["info"]["version_b"] = va, vb
    log(f"versions A={va[:12]} B={vb[:12]}")
    gen = torch.Generator().manual_seed(5)
    prompts = torch.randint(4, PRESET["vocab_size"], (32, 24), generator=gen).tolist()
    probes = prompts[:4]
    probe_tokens = 48

    def probe(url: str) -> list[dict[str, Any]]:
        return [completion(url, p, probe_tokens) for p in probes]

    s1 = Server(store_root, va, "server1", token_file)
    s2 = None
    try:
        summary["timings"]["server1_ready_s"] = s1.ready_seconds
        v = s1.version()
        summary["info"]["version_at_start"] = {
            k: v.get(k)
            for k in (
                "version_id",
                "decode_path",
                "max_batch_size",
                "dtype",
                "device",
                "load_seconds",
            )
        }
        check(
            "start: /version on A with decode_path cuda-graphs",
            v.get("version_id") == va and v.get("decode_path") == "cuda-graphs",
            summary["info"]["version_at_start"],
        )
        summary["info"]["gpu_mem_mib_A_start"] = gpu_mem_used_mib()

        # auth checks (cheap)
        r = s1.reload(vb, token="wrong")  # noqa: S106 - the refusal is the check
        check("reload with a wrong token -> 401", r.status_code == 401, r.status_code)
        r = s1.reload(va)
        check(
            "reload to the served version -> no-op (changed false)",
            r.status_code == 200 and r.json().get("changed") is False,
            r.text[:200],
        )

        probe_a1 = probe(s1.url)
        check(
            "A probes complete",
            all(p["tokens"] == probe_tokens and p["fp"] == fp(va) for p in probe_a1),
            [(p["tokens"], p["fp"]) for p in probe_a1],
        )

        # --- reload A -> B under streaming greedy load --------------------------------------
        log("phase: reload A->B under 16 streaming clients")
        res = asyncio.run(
            load_with_reload(
                s1,
                vb,
                prompts,
                clients=16,
                max_tokens=64,
                reload_after=24,
                after_each=2,
                cap=40,
                deadline_s=90,
                mixed=False,
            )
        )
        judge_load("reload_A_to_B", res, va, vb, 64)
        v = s1.version()
        summary["info"]["version_after_reload_B"] = {
            k: v.get(k) for k in ("version_id", "decode_path", "load_seconds")
        }
        check(
            "after reload: /version reports B and cuda-graphs",
            v.get("version_id") == vb and v.get("decode_path") == "cuda-graphs",
            summary["info"]["version_after_reload_B"],
        )
        summary["info"]["gpu_mem_mib_after_B"] = gpu_mem_used_mib()

        probe_b1 = probe(s1.url)
        check(
            "B probes on reloaded server complete, fingerprint B",
            all(p["tokens"] == probe_tokens and p["fp"] == fp(vb) for p in probe_b1),
        )
        check(
            "A and B greedy outputs differ (the swap changed the model)",
            [p["text"] for p in probe_a1] != [p["text"] for p in probe_b1],
        )

        # --- sampling on B ------------------------------------------------------------------
        log("phase: sampling")
        sp = prompts[5]
        samp = lambda **kw: completion(s1.url, sp, 48, temperature=0.8, **kw)  # noqa: E731
        runs = [samp(seed=1234) for _ in range(3)]
        check(
            "sampled seed 1234 (T=0.8): identical text when repeated x3",
            len({r["text"] for r in runs}) == 1 and all(r["tokens"] == 48 for r in runs),
            [r["text"][:60] for r in runs],
        )
        other = samp(seed=1235)
        check("sampled seed 1235 differs from seed 1234", other["text"] != runs[0]["text"])
        greedy_sp = completion(s1.url, sp, 48)
        check("sampled (T=0.8) differs from greedy", runs[0]["text"] != greedy_sp["text"])
        st = asyncio.run(
            _one_stream(
                s1.url,
                {
                    "model": MODEL,
                    "prompt": sp,
                    "max_tokens": 48,
                    "ignore_eos": True,
                    "temperature": 0.8,
                    "seed": 1234,
                    "stream": True,
                },
            )
        )
        check(
            "sampled seed 1234 streamed == non-streamed",
            st["ok"] and "".join(st["text"]) == runs[0]["text"],
            st.get("error"),
        )
        tp = [samp(seed=77, top_p=0.9) for _ in range(2)]
        check("sampled seed 77 top_p 0.9: identical when repeated", tp[0]["text"] == tp[1]["text"])
        noseed = [samp() for _ in range(2)]
        summary["info"]["unseeded_sampled_differ"] = noseed[0]["text"] != noseed[1]["text"]
        # batch mates (info): seed 1234 among 7 greedy concurrent requests / 8 identical seeded
        conc = asyncio.run(
            _concurrent(
                s1.url,
                [
                    {
                        "model": MODEL,
                        "prompt": sp,
                        "max_tokens": 48,
                        "ignore_eos": True,
                        "temperature": 0.8,
                        "seed": 1234,
                    }
                ]
                + [
                    {
                        "model": MODEL,
                        "prompt": prompts[10 + k],
                        "max_tokens": 48,
                        "ignore_eos": True,
                        "temperature": 0.0,
                    }
                    for k in range(7)
                ],
            )
        )
        same8 = asyncio.run(
            _concurrent(
                s1.url,
                [
                    {
                        "model": MODEL,
                        "prompt": sp,
                        "max_tokens": 48,
                        "ignore_eos": True,
                        "temperature": 0.8,
                        "seed": 1234,
                    }
                ]
                * 8,
            )
        )
        check(
            "concurrent requests (sampling with batch mates) all succeed",
            all(r["ok"] for r in conc + same8),
            [r["error"] for r in conc + same8 if not r["ok"]][:3],
        )
        summary["info"]["sampled_with_7_greedy_mates_equals_alone"] = (
            "".join(conc[0]["text"]) == runs[0]["text"]
        )
        summary["info"]["sampled_8_identical_concurrent_distinct_texts"] = len(
            {"".join(r["text"]) for r in same8}
        )
        summary["info"]["sampled_8_identical_concurrent_equal_alone"] = sum(
            "".join(r["text"]) == runs[0]["text"] for r in same8
        )
        samp_b_s1 = runs[0]["text"]

        # --- reload back to A under mixed load ----------------------------------------------
        log("phase: reload B->A under mixed load")
        res = asyncio.run(
            load_with_reload(
                s1,
                va,
                prompts,
                clients=8,
                max_tokens=32,
                reload_after=12,
                after_each=2,
                cap=40,
                deadline_s=90,
                mixed=True,
            )
        )
        judge_load("reload_B_to_A", res, vb, va, 32)
        v = s1.version()
        check(
            "after reload back: /version reports A and cuda-graphs",
            v.get("version_id") == va and v.get("decode_path") == "cuda-graphs",
            {k: v.get(k) for k in ("version_id", "decode_path")},
        )
        probe_a2 = probe(s1.url)
        check(
            "A greedy outputs after A->B->A equal those before",
            [p["text"] for p in probe_a2] == [p["text"] for p in probe_a1],
        )
        summary["info"]["gpu_mem_mib_after_back_to_A"] = gpu_mem_used_mib()
        try:
            m = httpx.get(f"{s1.url}/metrics", timeout=10).text
            summary["info"]["reloads_total"] = [
                line for line in m.splitlines() if line.startswith("metalserve_reloads_total")
            ]
        except Exception as exc:  # noqa: BLE001
            summary["errors"].append(f"metrics: {exc!r}")
        summary["info"]["server1_log_graphs"] = s1.log_lines(
            r"captured|decode path|reloaded|now serving|warning|WARNING|ERROR|Traceback"
        )[:20]
    finally:
        rc = s1.stop()
        summary["info"]["server1_exit"] = rc
    check("server 1 exits 0 on SIGTERM", rc == 0, rc)

    # --- fresh server on B: determinism across reload ---------------------------------------
    log("phase: fresh server on B")
    s2 = Server(store_root, vb, "server2", token_file)
    try:
        summary["timings"]["server2_ready_s"] = s2.ready_seconds
        v = s2.version()
        check(
            "fresh B server: decode_path cuda-graphs",
            v.get("decode_path") == "cuda-graphs",
            v.get("decode_path"),
        )
        probe_b2 = probe(s2.url)
        same = [a["text"] == b["text"] for a, b in zip(probe_b1, probe_b2, strict=True)]
        check("greedy B outputs after reload == fresh B server", all(same), same)
        samp2 = completion(s2.url, sp, 48, temperature=0.8, seed=1234)
        check(
            "sampled seed 1234 on fresh B server == on reloaded server", samp2["text"] == samp_b_s1
        )
        summary["info"]["server2_log_graphs"] = s2.log_lines(
            r"captured|decode path|warning|WARNING|ERROR|Traceback"
        )[:10]
    finally:
        rc2 = s2.stop()
    check("server 2 exits 0 on SIGTERM", rc2 == 0, rc2)
    shutil.rmtree(base, ignore_errors=True)
    return 0


async def _one_stream(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await stream_request(client, body)


async def _concurrent(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=httpx.Limits(max_connections=len(bodies))
    ) as client:
        return list(await asyncio.gather(*(nonstream_request(client, dict(b)) for b in bodies)))


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except Exception:  # noqa: BLE001
        summary["errors"].append(traceback.format_exc()[-3000:])
        log(traceback.format_exc())
    a = summary["assertions"]
    summary["passed"] = sum(v["ok"] for v in a.values())
    summary["failed"] = [k for k, v in a.items() if not v["ok"]]
    summary["timings"]["total_s"] = round(time.monotonic() - T0, 1)
    text = json.dumps(summary, indent=1, default=str)
    (OUT / "summary.json").write_text(text + "\n")
    print(text)
    sys.exit(0 if code == 0 and not summary["failed"] and not summary["errors"] else 1)
