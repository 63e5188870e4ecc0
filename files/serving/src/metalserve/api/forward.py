"""Another API process hands a request to the first one (``metalserve.api.workers``): the
request as it came (method, path, query, headers, body) over the first one's Unix socket, its
answer streamed back as it comes."""

from __future__ import annotations

import json
import logging

import httpx
from starlette.types import Message, Receive, Scope, Send

from metalserve.errors import error_body

log = logging.getLogger(__name__)

# Connection-level headers: each hop's own (RFC 9110, section 7.6.1), and the length that
# httpx sets again.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# The first one's answer may take long (a reload, a profile): its own limits apply there.
TIMEOUT = httpx.Timeout(None, connect=5.0)


class ForwardToFirst:
    """An ASGI app that forwards every HTTP request to the first API process (behind the body
    limit the first one has: ``create_worker_app``)."""

    def __init__(self, first_socket: str) -> None:
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=first_socket),
            base_url="http://first-api-process",
            timeout=TIMEOUT,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = self.client.build_request(
            scope["method"],
            httpx.URL(path=scope["raw_path"].decode("latin-1"), query=scope["query_string"]),
            headers=headers,
            content=bytes(body),
        )
        try:
            answer = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            log.error("the first API process did not answer %s: %s", scope["path"], exc)
            await _send_error(send, 502, "the replica's first API process did not answer")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status_code,
                    "headers": [
                        (k, v) for k, v in answer.headers.raw if k.lower() not in HOP_BY_HOP
                    ],
                }
            )
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await answer.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, "server_error", code="first_api_process")).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json")],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})
