"""The FastAPI app of one replica: routers, middleware, error handlers and lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from metalserve import __version__
from metalserve.api import admin, openai, probes
from metalserve.api.forward import ForwardToFirst
from metalserve.api.middleware import ObservabilityMiddleware
from metalserve.api.workers import SERVED_BY_EACH
from metalserve.errors import install_error_handlers
from metalserve.replica import Replica
from metalserve.settings import ServeSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    replica: Replica = app.state.replica
    loop = type(asyncio.get_running_loop())
    log.info("HTTP on the %s event loop", f"{loop.__module__}.{loop.__qualname__}")
    replica.engine.start()
    # Load in the background: the port opens at once and /readyz tells the story.
    loader = asyncio.create_task(replica.load_initial(), name="metalserve-load")
    try:
        yield
    finally:
        if not loader.done():
            loader.cancel()
        await asyncio.to_thread(replica.engine.stop)
        await asyncio.to_thread(replica.stop_ranks)
        if replica.tracing is not None:
            await asyncio.to_thread(replica.tracing.shutdown)  # flushes the last spans


def _replica_app(
    settings: ServeSettings,
    replica: Replica,
    span: Callable[[FastAPI], AbstractAsyncContextManager[None]],
) -> FastAPI:
    """A FastAPI app over ``replica``: its state, error handlers and middleware, the OpenAI
    routes."""
    app = FastAPI(
        title="metalserve",
        version=__version__,
        lifespan=span,
        max_body_size=settings.max_body_bytes,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.replica = replica
    install_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware, replica=replica)
    app.include_router(openai.router)
    return app


def create_app(settings: ServeSettings, replica: Replica) -> FastAPI:
    """The FastAPI app of one replica. The caller starts it with uvicorn (see server.py)."""
    app = _replica_app(settings, replica, lifespan)
    app.include_router(probes.router)
    app.include_router(admin.router)
    if settings.profile_dir is not None:
        app.include_router(admin.profile_router)
    if settings.fault_injection:
        log.warning("fault injection is on: POST /admin/fault/wedge-engine blocks the engine loop")
        app.include_router(admin.fault_router)
    return app


def create_worker_app(settings: ServeSettings, replica: Replica, first_socket: str) -> ASGIApp:
    """The app of another API process (``metalserve.api.workers``): the inference routes its
    own, every other request handed to the first API process at ``first_socket`` (counted and
    logged there, not twice)."""
    forward = ForwardToFirst(first_socket)
    # Read whole before it is handed over: no larger than the first one takes (FastAPI's limit).
    limited = RequestBodyLimitMiddleware(forward, max_body_size=settings.max_body_bytes)

    @asynccontextmanager
    async def follow(app: FastAPI) -> AsyncIterator[None]:
        # Ready once the engine's process tells it a version is live (``Replica._followed``).
        replica.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(replica.engine.stop)
            await forward.aclose()
            if replica.tracing is not None:
                await asyncio.to_thread(replica.tracing.shutdown)

    app = _replica_app(settings, replica, follow)

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in SERVED_BY_EACH:
            await limited(scope, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch
