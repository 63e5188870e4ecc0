"""Admin routes, behind the admin bearer token: hot reload, and fault injection for lab proofs.

``POST /admin/fault/wedge-engine`` exists only with ``--fault-injection`` (else 404). It blocks the
engine loop (not the HTTP server) for N seconds, as a hung forward pass would: no tokens and no
heartbeat, so under systemd's watchdog the replica is killed and restarted when N outlasts the
watchdog. It answers once the loop is blocked (200), or after ``BLOCK_WAIT_SECONDS`` while a step
still runs (202: it blocks after that step).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from metalserve.api.deps import AdminAuth, ReplicaDep
from metalserve.errors import ApiError
from metalserve.schemas import AdminReloadRequest, WedgeRequest

log = logging.getLogger(__name__)

# How long the wedge request waits for the engine loop to reach the wedge (it blocks between steps).
BLOCK_WAIT_SECONDS = 10.0

router = APIRouter(dependencies=[AdminAuth])
fault_router = APIRouter(dependencies=[AdminAuth])


@router.post("/admin/reload")
async def admin_reload(body: AdminReloadRequest, replica: ReplicaDep) -> dict[str, Any]:
    return await replica.reload(body.version)


@fault_router.post("/admin/fault/wedge-engine")
async def wedge_engine(body: WedgeRequest, replica: ReplicaDep) -> JSONResponse:
    try:
        blocked = replica.engine.wedge(body.seconds)
    except RuntimeError as exc:
        raise ApiError(409, str(exc), code="wedge_refused") from exc
    log.warning("fault injection: wedging the engine loop for %.1fs", body.seconds)
    answer: dict[str, Any] = {"seconds": body.seconds}
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(blocked)), BLOCK_WAIT_SECONDS)
    except TimeoutError:
        return JSONResponse({**answer, "engine": "wedge pending"}, status_code=202)
    except RuntimeError as exc:  # the engine stopped before it got there
        raise ApiError(409, str(exc), code="wedge_refused") from exc
    return JSONResponse({**answer, "engine": "wedged"})
