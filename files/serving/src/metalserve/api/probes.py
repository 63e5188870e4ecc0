"""Liveness, readiness, version and metrics: what HAProxy, systemd and Prometheus ask."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from metalserve import __version__
from metalserve.api.deps import ReplicaDep, SettingsDep
from metalserve.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/healthz")
async def healthz(replica: ReplicaDep) -> JSONResponse:
    alive = replica.engine.is_alive()
    return JSONResponse(
        {"status": "alive" if alive else "engine-dead", "state": replica.state()},
        status_code=200 if alive else 503,
    )


@router.get("/readyz")
async def readyz(replica: ReplicaDep) -> JSONResponse:
    current = replica.engine.model
    return JSONResponse(
        {
            "status": "ready" if replica.ready else replica.state(),
            "version_id": current.version_id if current else None,
        },
        status_code=200 if replica.ready else 503,
    )


@router.get("/version")
async def version(replica: ReplicaDep, settings: SettingsDep) -> dict[str, Any]:
    current = replica.engine.model
    return {
        "model": settings.model,
        "version_id": current.version_id if current else replica.version_id,
        "verified": current is not None,
        "files": list(current.files) if current else [],
        "device": str(current.device) if current else settings.device,
        "dtype": str(current.dtype).removeprefix("torch.") if current else settings.dtype,
        "loaded_at": current.loaded_at.isoformat() if current else None,
        # Whose modules run it: metalserve's (the static path only) or transformers'.
        "modeling": replica.engine.modeling,
        "load_seconds": round(current.load_seconds, 3) if current else None,
        "weights_seconds": round(current.weights_seconds, 3) if current else None,
        "load_parts_seconds": (
            {k: round(v, 3) for k, v in current.load_parts.items()} if current else {}
        ),
        "startup_seconds": {k: round(v, 3) for k, v in replica.startup.items()},
        # Where the engine runs: a process of its own, or a thread beside this event loop.
        "engine_process": replica.settings.uses_engine_process,
        # API processes sharing the port (serve --api-processes): this answer is the first's.
        "api_processes": replica.settings.api_processes,
        "decode_path": replica.engine.decode_path,
        "decode_compiled": replica.engine.decode_compiled,
        # Per projection and batch bucket: cuBLAS' and the kernel's microseconds, which runs.
        "decode_gemm": replica.engine.decode_gemm_tuning,
        "quantization": replica.engine.quantization,
        "prefix_cache_tokens": replica.engine.prefix_cache_tokens_held,
        "weight_bytes": replica.engine.weight_bytes,
        # What runs: fewer than asked where the static KV cache holds fewer (``batch_slots``).
        "max_batch_size": replica.engine.batch_slots,
        "max_context": current.max_context if current else None,
        # serve --tensor-parallel: what each rank loaded and verified (empty with one rank).
        "tensor_parallel": replica.settings.tensor_parallel,
        "ranks": replica.host.rank_infos,
        "server_version": __version__,
        "state": replica.state(),
    }


@router.get("/metrics")
async def metrics(replica: ReplicaDep) -> Response:
    # In a thread: with other API processes it waits for their metrics (``--api-processes``).
    return Response(await asyncio.to_thread(replica.metrics.render), media_type=CONTENT_TYPE)
