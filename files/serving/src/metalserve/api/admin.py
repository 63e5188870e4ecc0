"""Admin routes, behind the admin bearer token: hot reload, the engine's profile, and fault
injection for lab proofs.

``POST /admin/profile`` exists only with ``--profile-dir`` (else 404). It records the engine's
next forward passes with torch.profiler (``metalserve.engine.profiling``) and answers with the
summary once the trace is written (409 while another profile runs or when no pass ran in time).

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

from metalserve.api.deps import AdminAuth, ReplicaDep, SettingsDep
from metalserve.errors import ApiError
from metalserve.schemas import AdminReloadRequest, ProfileRequest, WedgeRequest

log = logging.getLogger(__name__)

# Beyond a profile's max_seconds: for the last pass and the trace's writing.
PROFILE_GRACE_SECONDS = 120.0
# How long the wedge request waits for the engine loop to reach the wedge (it blocks between steps).
BLOCK_WAIT_SECONDS = 10.0

router = APIRouter(dependencies=[AdminAuth])
profile_router = APIRouter(dependencies=[AdminAuth])
fault_router = APIRouter(dependencies=[AdminAuth])


@router.post("/admin/reload")
async def admin_reload(body: AdminReloadRequest, replica: ReplicaDep) -> dict[str, Any]:
    return await replica.reload(body.version)


@profile_router.post("/admin/profile")
async def profile_engine(
    body: ProfileRequest, replica: ReplicaDep, settings: SettingsDep
) -> dict[str, Any]:
    assert settings.profile_dir is not None  # the route exists only with it
    try:
        profile = replica.engine.profile(
            body.passes, body.max_seconds, settings.profile_dir, python=body.python
        )
    except RuntimeError as exc:
        raise ApiError(409, str(exc), code="profile_refused") from exc
    log.info("profiling the engine's next %d forward passes", body.passes)
    try:
        # Shielded: a timeout must not cancel the future the engine thread completes.
        summary: dict[str, Any] = await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(profile.future)),
            body.max_seconds + PROFILE_GRACE_SECONDS,
        )
    except TimeoutError:
        raise ApiError(504, "the profile did not end in time", code="profile_timeout") from None
    except RuntimeError as exc:  # nothing recorded: idle, or the engine stopped
        raise ApiError(409, str(exc), code="profile_empty") from exc
    return summary


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
