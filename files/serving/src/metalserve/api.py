"""The replica's HTTP API: health, version, metrics, OpenAI-compatible inference, admin reload."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import gc
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metalserve import __version__, faults, store
from metalserve.engine import (
    Engine,
    Event,
    Failed,
    Finished,
    QueueFullError,
    Sequence,
    StaleModelError,
    TextDelta,
    generate_once,
)
from metalserve.errors import ApiError, error_body, install_error_handlers
from metalserve.exitcodes import ExitCode
from metalserve.loader import LoadedModel, LoadError, load_version
from metalserve.metrics import CONTENT_TYPE, Metrics
from metalserve.sampling import SamplingParams
from metalserve.schemas import (
    AdminReloadRequest,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from metalserve.settings import ServeSettings

log = logging.getLogger(__name__)

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4
# Text longer than this many characters per allowed token cannot fit; refuse before tokenizing.
MAX_CHARS_PER_TOKEN = 64
# How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 1.0


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Replica:
    """State shared by the routes, the background loader and the drain logic."""

    def __init__(self, settings: ServeSettings, version_id: str) -> None:
        self.settings = settings
        self.version_id = version_id
        self.metrics = Metrics()
        self.relay = EventRelay()
        self.engine = Engine(
            max_batch_size=settings.batch_limit,
            max_queue=settings.max_queue,
            observer=self.metrics,
            step_delay=settings.debug_step_delay,
            decode_mode=settings.decode_mode,
            flush_events=self.relay.flush,
        )
        self.admin_token = read_token(settings.admin_token_file)
        self.phase = Phase.LOADING
        self.draining = False
        self.exit_code = ExitCode.OK
        self.failure: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.in_flight = 0
        self._idle: asyncio.Event | None = None
        self.reload_lock = asyncio.Lock()

    # --- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY and not self.draining and self.engine.is_alive()

    def state(self) -> str:
        if self.draining:
            return "draining"
        if not self.engine.is_alive():
            return "engine-dead"
        return self.phase.value

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self._idle_event().clear()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle_event().set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no inference request is in flight; False on timeout."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    # --- loading --------------------------------------------------------------------------

    def load_and_warm(self, version_id: str) -> LoadedModel:
        """Load and verify a version, then prove it generates (blocking: run in a thread)."""
        bundle = load_version(
            self.settings.store,
            self.settings.model,
            version_id,
            device=self.settings.device,
            dtype=self.settings.dtype,
            chunk_size=self.settings.read_chunk_mib * 1024 * 1024,
        )
        text = generate_once(
            bundle,
            bundle.encode(WARMUP_PROMPT, add_special_tokens=True),
            SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True),
            step_delay=self.settings.debug_step_delay,
        )
        log.info("warm-up of %s passed: %r", bundle.short_id, text)
        return bundle

    async def load_initial(self) -> None:
        try:
            bundle = await in_daemon_thread(self.load_and_warm, self.version_id)
            await asyncio.wrap_future(self.engine.swap(bundle))
        except store.VerificationError as exc:
            self._fatal(ExitCode.VERIFICATION_FAILED, str(exc))
        except store.VersionNotFoundError as exc:
            self._fatal(ExitCode.VERSION_NOT_FOUND, str(exc))
        except (LoadError, store.StoreError) as exc:
            self._fatal(ExitCode.LOAD_FAILED, str(exc))
        except Exception as exc:
            log.exception("loading failed")
            self._fatal(ExitCode.LOAD_FAILED, f"loading failed: {exc!r}")
        else:
            self.metrics.set_model(bundle.name, bundle.version_id)
            self.phase = Phase.READY
            log.info("ready: %s version %s", bundle.name, bundle.version_id)

    def _fatal(self, code: ExitCode, message: str) -> None:
        log.error("cannot serve: %s", message)
        self.phase = Phase.FAILED
        self.failure = message
        self.exit_code = code
        self.on_fatal()

    # --- request admission ----------------------------------------------------------------

    def admit(self, model: str) -> LoadedModel:
        if self.draining:
            raise ApiError(503, "the server is draining; retry on another replica", code="draining")
        bundle = self.engine.target_model
        if self.phase is not Phase.READY or bundle is None:
            raise ApiError(503, f"the model is not ready ({self.state()})", code="not_ready")
        if not self.engine.is_alive():
            raise ApiError(503, "the generation engine stopped", code="engine_dead")
        if model != bundle.name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this replica serves {bundle.name!r}",
                param="model",
                code="model_not_found",
            )
        return bundle


class EventRelay:
    """Hands the engine's events to the event loop: one ``call_soon_threadsafe`` per engine step
    for all sequences, not one per token (each wakes the loop and contends for the GIL).

    The engine thread pushes while it steps and flushes once per iteration (``Engine``'s
    ``flush_events``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], Any]] = []

    def push(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: object
    ) -> None:
        with self._lock:
            self._pending.append((loop, queue, item))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for loop, queue, item in pending:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, items in by_loop.items():
            # RuntimeError: the event loop is gone, nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def in_daemon_thread(fn: Callable[[str], LoadedModel], arg: str) -> asyncio.Future[LoadedModel]:
    """Run a model load in a daemon thread. asyncio.to_thread would use the default executor,
    whose threads the interpreter joins at exit: SIGTERM during a long load would then hang."""
    future: concurrent.futures.Future[LoadedModel] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(arg))
        except BaseException as exc:  # noqa: BLE001 - handed over to the awaiting coroutine
            future.set_exception(exc)

    threading.Thread(target=target, name="metalserve-load", daemon=True).start()
    return asyncio.wrap_future(future)


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


class ObservabilityMiddleware:
    """Counts requests by route and status, times them to the last byte, tracks in-flight."""

    def __init__(self, app: ASGIApp, replica: Replica) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        inference = scope["path"] in INFERENCE_PATHS
        if inference:
            self.replica.enter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if inference:
                self.replica.leave()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics = self.replica.metrics
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Generation:
    """The sequences of one request and their events, handed over to the event loop."""

    def __init__(
        self,
        replica: Replica,
        bundle: LoadedModel,
        prompts: list[list[int]],
        params: SamplingParams,
        endpoint: str,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._relay = replica.relay
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.bundle = bundle
        self.seqs = [
            Sequence(
                bundle=bundle,
                prompt_ids=ids,
                params=params,
                sink=self._sink(i),
                endpoint=endpoint,
            )
            for i, ids in enumerate(prompts)
        ]
        try:
            for seq in self.seqs:
                replica.engine.submit(seq)
        except QueueFullError as exc:
            self.cancel()
            raise ApiError(429, f"the server is overloaded: {exc}", code="queue_full") from exc
        except StaleModelError:
            self.cancel()
            raise
        except RuntimeError as exc:
            self.cancel()
            raise ApiError(503, str(exc), code="engine_stopped") from exc

    def _sink(self, index: int) -> Callable[[Event], None]:
        def push(event: Event) -> None:
            self._relay.push(self._loop, self.queue, (index, event))

        return push

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    @property
    def fingerprint(self) -> str:
        return f"{self.bundle.name}@{self.bundle.short_id}"

    async def collect(self, request: Request) -> list[_Choice]:
        """Wait for every sequence to finish (non-streaming responses)."""
        choices = [_Choice() for _ in self.seqs]
        remaining = len(self.seqs)
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client closed the request") from None
                    continue
                choice = choices[index]
                if isinstance(event, TextDelta):
                    choice.text.append(event.text)
                elif isinstance(event, Finished):
                    choice.finish_reason = event.reason
                    choice.prompt_tokens = event.prompt_tokens
                    choice.completion_tokens = event.completion_tokens
                    remaining -= 1
                else:
                    raise ApiError(event.status, event.message, code="generation_failed")
        finally:
            self.cancel()
        return choices

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until all sequences finish or one fails (streaming responses)."""
        remaining = len(self.seqs)
        try:
            while remaining:
                index, event = await self.queue.get()
                yield index, event
                if isinstance(event, Failed):
                    return
                if isinstance(event, Finished):
                    remaining -= 1
        finally:
            # Reached on normal end, on failure, and when the client disconnects (Starlette
            # cancels the response task): the engine drops cancelled sequences at its next step.
            self.cancel()


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = (
        payload.model_dump_json(exclude_none=False)
        if isinstance(payload, BaseModel)
        else json.dumps(payload)
    )
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _stream_failure(event: Failed) -> str:
    return _sse(error_body(event.message, "server_error", code="generation_failed"))


def create_app(settings: ServeSettings, replica: Replica) -> FastAPI:
    """The FastAPI app of one replica. The caller starts it with uvicorn (see server.py)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        replica.engine.start()
        # Load in the background: the port opens at once and /readyz tells the story.
        loader = asyncio.create_task(replica.load_initial(), name="metalserve-load")
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
            await asyncio.to_thread(replica.engine.stop)

    app = FastAPI(
        title="metalserve",
        version=__version__,
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware, replica=replica)

    # --- probes and introspection ---------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        alive = replica.engine.is_alive()
        return JSONResponse(
            {"status": "alive" if alive else "engine-dead", "state": replica.state()},
            status_code=200 if alive else 503,
        )

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        current = replica.engine.model
        return JSONResponse(
            {
                "status": "ready" if replica.ready else replica.state(),
                "version_id": current.version_id if current else None,
            },
            status_code=200 if replica.ready else 503,
        )

    @app.get("/version")
    async def version() -> dict[str, Any]:
        current = replica.engine.model
        return {
            "model": settings.model,
            "version_id": current.version_id if current else replica.version_id,
            "verified": current is not None,
            "files": list(current.files) if current else [],
            "device": str(current.device) if current else settings.device,
            "dtype": str(current.dtype).removeprefix("torch.") if current else settings.dtype,
            "loaded_at": current.loaded_at.isoformat() if current else None,
            "load_seconds": round(current.load_seconds, 3) if current else None,
            "decode_path": replica.engine.decode_path,
            "max_batch_size": replica.engine.max_batch_size,
            "server_version": __version__,
            "state": replica.state(),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        replica.metrics.ready.set(1 if replica.ready else 0)
        replica.metrics.draining.set(1 if replica.draining else 0)
        return Response(replica.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        current = replica.engine.model
        return ModelList(
            data=[
                ModelCard(
                    id=settings.model,
                    created=int(current.loaded_at.timestamp()) if current else now(),
                    version_id=current.version_id if current else replica.version_id,
                )
            ]
        )

    # --- inference ------------------------------------------------------------------------

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | Completion:
        generation = await _start(
            replica,
            body,
            lambda bundle: _completion_prompts(settings, bundle, body),
            body.max_tokens,
            settings.default_max_tokens,
            "completions",
        )
        bundle = generation.bundle
        completion_id, created = new_id("cmpl"), now()

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return _sse(
                Completion(
                    id=completion_id,
                    created=created,
                    model=bundle.name,
                    system_fingerprint=generation.fingerprint,
                    choices=choices,
                    usage=usage,
                )
            )

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                usage = [0, 0]
                async for index, event in generation.events():
                    if isinstance(event, TextDelta):
                        yield chunk(
                            [CompletionChoice(index=index, text=event.text, finish_reason=None)]
                        )
                    elif isinstance(event, Finished):
                        usage[0] += event.prompt_tokens
                        usage[1] += event.completion_tokens
                        yield chunk(
                            [CompletionChoice(index=index, text="", finish_reason=event.reason)]
                        )
                    else:
                        yield _stream_failure(event)
                        return
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], Usage.of(*usage))
                yield SSE_DONE

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = await generation.collect(request)
        return Completion(
            id=completion_id,
            created=created,
            model=bundle.name,
            system_fingerprint=generation.fingerprint,
            choices=[
                CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason)
                for i, c in enumerate(choices)
            ],
            usage=Usage.of(
                sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices)
            ),
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | ChatCompletion:
        generation = await _start(
            replica,
            body,
            lambda bundle: [_chat_prompt(settings, bundle, body)],
            body.token_limit(),
            None,
            "chat",
        )
        bundle = generation.bundle
        completion_id, created = new_id("chatcmpl"), now()

        def chunk(choice: ChatChunkChoice | None, usage: Usage | None = None) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=completion_id,
                    created=created,
                    model=bundle.name,
                    system_fingerprint=generation.fingerprint,
                    choices=[choice] if choice else [],
                    usage=usage,
                )
            )

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                yield chunk(ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content="")))
                async for _, event in generation.events():
                    if isinstance(event, TextDelta):
                        yield chunk(ChatChunkChoice(index=0, delta=ChatDelta(content=event.text)))
                    elif isinstance(event, Finished):
                        yield chunk(
                            ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason=event.reason)
                        )
                        if body.stream_options is not None and body.stream_options.include_usage:
                            yield chunk(
                                None, Usage.of(event.prompt_tokens, event.completion_tokens)
                            )
                    else:
                        yield _stream_failure(event)
                        return
                yield SSE_DONE

            return StreamingResponse(stream(), media_type="text/event-stream")

        (choice,) = await generation.collect(request)
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=bundle.name,
            system_fingerprint=generation.fingerprint,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatMessageOut(content="".join(choice.text)),
                    finish_reason=choice.finish_reason or "stop",
                )
            ],
            usage=Usage.of(choice.prompt_tokens, choice.completion_tokens),
        )

    # --- admin ----------------------------------------------------------------------------

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if replica.admin_token is None:
            raise ApiError(404, "the admin API is disabled (no admin token file configured)")
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), replica.admin_token.encode()
        ):
            raise ApiError(
                401,
                "a valid admin bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/admin/reload", dependencies=[Depends(require_admin)])
    async def admin_reload(body: AdminReloadRequest) -> dict[str, Any]:
        if replica.draining:
            raise ApiError(503, "the server is draining", code="draining")
        if replica.phase is not Phase.READY:
            raise ApiError(409, f"cannot reload while {replica.state()}", code="not_ready")
        if replica.reload_lock.locked():
            raise ApiError(409, "another reload is in progress", code="reload_in_progress")
        async with replica.reload_lock:
            return await _reload(replica, body.version)

    if settings.fault_injection:
        log.warning("fault injection is on: POST /admin/fault/wedge-engine blocks the engine loop")
        app.include_router(faults.router(replica, require_admin))

    return app


async def _start(
    replica: Replica,
    body: CompletionRequest | ChatCompletionRequest,
    prepare: Callable[[LoadedModel], list[list[int]]],
    requested: int | None,
    default: int | None,
    endpoint: str,
) -> _Generation:
    """Tokenize for the model that will run the request and hand its sequences to the engine."""
    for _ in range(3):
        bundle = replica.admit(body.model)
        prompts = await asyncio.to_thread(prepare, bundle)
        params = _params(replica.settings, bundle, body, requested, prompts, default)
        try:
            return _Generation(replica, bundle, prompts, params, endpoint)
        except StaleModelError:
            continue  # a reload swapped models while we tokenized: prepare again
    raise ApiError(503, "the model changed while the request was prepared; retry", code="reload")


async def _reload(replica: Replica, ref: str) -> dict[str, Any]:
    settings = replica.settings
    try:
        version_id = store.resolve_version(settings.store, settings.model, ref)
    except store.AmbiguousVersionError as exc:
        raise ApiError(400, str(exc), param="version", code="ambiguous_version") from exc
    except store.StoreError as exc:
        replica.metrics.reloads.labels(result="not_found").inc()
        raise ApiError(404, str(exc), param="version", code="version_not_found") from exc
    current = replica.engine.model
    assert current is not None
    if version_id == current.version_id:
        return {"model": current.name, "version_id": version_id, "changed": False}
    started = time.monotonic()
    try:
        bundle = await in_daemon_thread(replica.load_and_warm, version_id)
    except store.VerificationError as exc:
        replica.metrics.reloads.labels(result="verification_failed").inc()
        raise ApiError(409, str(exc), param="version", code="verification_failed") from exc
    except (LoadError, store.StoreError, ValueError, OSError) as exc:
        replica.metrics.reloads.labels(result="load_failed").inc()
        raise ApiError(422, f"cannot load {version_id[:12]}: {exc}", code="load_failed") from exc
    old = await asyncio.wrap_future(replica.engine.swap(bundle))
    replica.metrics.set_model(bundle.name, bundle.version_id)
    replica.metrics.reloads.labels(result="ok").inc()
    previous = old.version_id if old is not None else None
    del old
    _free_memory(bundle)
    log.info("reloaded %s -> %s", (previous or "")[:12], bundle.short_id)
    return {
        "model": bundle.name,
        "version_id": bundle.version_id,
        "previous_version_id": previous,
        "changed": True,
        "seconds": round(time.monotonic() - started, 3),
    }


def _free_memory(bundle: LoadedModel) -> None:
    """Return the replaced model's memory (on GPUs the caching allocator keeps it otherwise)."""
    gc.collect()
    if bundle.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# --- prompt preparation (runs in a worker thread) -------------------------------------------


def _prompt_limit(settings: ServeSettings, bundle: LoadedModel) -> int:
    limit = bundle.max_context - 1
    return min(limit, settings.max_prompt_tokens) if settings.max_prompt_tokens else limit


def _check_prompt(settings: ServeSettings, bundle: LoadedModel, ids: list[int]) -> list[int]:
    limit = _prompt_limit(settings, bundle)
    if len(ids) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; at most {limit} are allowed",
            param="prompt",
            code="context_length_exceeded",
        )
    vocab = bundle.vocab_size
    if any(t >= vocab for t in ids):
        raise ApiError(
            400, f"token ids must be below {vocab}", param="prompt", code="invalid_token"
        )
    return ids


def _encode(
    settings: ServeSettings, bundle: LoadedModel, text: str, *, add_special_tokens: bool, param: str
) -> list[int]:
    limit = _prompt_limit(settings, bundle)
    if len(text) > limit * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"the {param} is too long", param=param, code="context_length_exceeded")
    try:
        return bundle.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as exc:
        raise ApiError(400, f"cannot tokenize the {param}: {exc}", param=param) from exc


def _completion_prompts(
    settings: ServeSettings, bundle: LoadedModel, body: CompletionRequest
) -> list[list[int]]:
    result = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt must not be empty", param="prompt")
            prompt = _encode(settings, bundle, prompt, add_special_tokens=True, param="prompt")
        result.append(_check_prompt(settings, bundle, prompt))
    return result


def _chat_prompt(
    settings: ServeSettings, bundle: LoadedModel, body: ChatCompletionRequest
) -> list[int]:
    from jinja2 import TemplateError

    messages = []
    for message in body.messages:
        entry = {"role": message.role, "content": message.text()}
        if message.name:
            entry["name"] = message.name
        messages.append(entry)
    if not any(m["content"] for m in messages):
        raise ApiError(400, "the messages hold no text", param="messages")
    if bundle.tokenizer.chat_template is None:
        raise ApiError(
            400, "this model has no chat template; use /v1/completions", param="messages"
        )
    try:
        text = bundle.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ApiError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The template already placed BOS and other special tokens.
    ids = _encode(settings, bundle, str(text), add_special_tokens=False, param="messages")
    return _check_prompt(settings, bundle, ids)


def _params(
    settings: ServeSettings,
    bundle: LoadedModel,
    body: CompletionRequest | ChatCompletionRequest,
    requested: int | None,
    prompts: list[list[int]],
    default: int | None,
) -> SamplingParams:
    room = bundle.max_context - max(len(p) for p in prompts)
    if requested is None:
        # Unspecified: as much as fits (chat), or the completions default, within the limits.
        max_tokens = min(default or settings.max_new_tokens, settings.max_new_tokens, room)
    else:
        if requested > settings.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens is {requested}; this server allows at most {settings.max_new_tokens}",
                param="max_tokens",
            )
        if requested > room:
            raise ApiError(
                400,
                f"the prompt plus max_tokens ({requested}) exceeds the context of "
                f"{bundle.max_context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = requested
    if max_tokens < 1:
        raise ApiError(
            400,
            "the prompt leaves no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % 2**63,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
    )
