"""Fault injection for lab proofs: off unless ``--fault-injection`` (its routes then answer 404).

``POST /admin/fault/wedge-engine`` with ``{"seconds": N}`` and the admin bearer token blocks the
engine loop (not the HTTP server) for N seconds, as a hung forward pass would: no tokens and no
heartbeat, so under systemd's watchdog the replica is killed and restarted when N outlasts the
watchdog. The answer comes once the loop is blocked (200), or after ``BLOCK_WAIT_SECONDS`` while
a step still runs (202: it blocks after that step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from metalserve.errors import ApiError

if TYPE_CHECKING:
    from metalserve.api import Replica

log = logging.getLogger(__name__)

WEDGE_MAX_SECONDS = 3600.0
# How long the request waits for the engine loop to reach the wedge (it blocks between steps).
BLOCK_WAIT_SECONDS = 10.0


class WedgeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    seconds: float = Field(gt=0, le=WEDGE_MAX_SECONDS)


def router(replica: Replica, require_admin: Callable[..., None]) -> APIRouter:
    """The fault routes, behind the same admin token check as ``/admin/reload``."""
    routes = APIRouter(dependencies=[Depends(require_admin)])

    @routes.post("/admin/fault/wedge-engine")
    async def wedge_engine(body: WedgeRequest) -> JSONResponse:
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

    return routes
