"""Limits that keep one client from taking the service: request rate and concurrent jobs per API key (kept in
Redis, so every API replica shares them), the request-body cap, and Pillow's decompression-bomb limit.

- **Rate**: GCRA (the generic cell-rate algorithm, one Redis key per API key holding its "theoretical arrival
  time"): `rate_limit_per_s` sustained with bursts of `rate_limit_burst`; past it 429 `rate_limited` with
  Retry-After. Redis's clock is the only clock, so replicas with skewed clocks agree. It is counted on every
  keyed request through an asyncio Redis client, in the event loop: a threadpool hop would cost more CPU than
  the round trip itself.
- **Quota**: at most `max_active_jobs_per_key` queued + running jobs per key; past it 429 `quota_exceeded`.
  A zset per key holds its active job ids (a job leaves it when it ends). The submission script of
  service/queue.py counts it and enqueues the job in the same atomic step, so concurrent submissions cannot
  overshoot; it prunes ended jobs a crash left behind before it ever refuses.
- **Body**: a declared Content-Length over the limit is answered 413 before a byte is read; a body without
  one (chunked) is counted as it arrives and refused the moment it passes the limit.

Both per-key limits apply to keyed callers; with authentication disabled (local runs) only the queue-depth
admission of service/queue.py applies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from redis.asyncio import BlockingConnectionPool, Redis

from service.auth import ANONYMOUS
from service.queue import REDIS_OPTIONS, JobRecord, Jobs, QueueView, QuotaExceeded, Submission, key
from service.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class PayloadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")


class RateLimited(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many requests for this API key; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


# KEYS[1] the key's GCRA state. ARGV[1] emission interval (s), ARGV[2] burst. Returns 0 (admitted) or the wait
# in ms. A request is admitted while its new arrival time stays within burst × interval of now.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local excess = new_tat - now - burst * interval
if excess > 0 then return math.ceil(excess * 1000) end
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return 0
"""


# Connections of one API process to count rates: a burst of requests waits for a free one (up to the socket
# timeout) instead of opening hundreds.
_RATE_CONNECTIONS = 32


class RateLimiter:
    """The per-key rate, checked in the event loop (`require_api_key`, service/deps.py). The app opens one per
    process for its lifetime (`create_app`'s lifespan) and closes it at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=_RATE_CONNECTIONS,
            timeout=REDIS_OPTIONS["socket_timeout"],
            **REDIS_OPTIONS,
        )
        self.redis = Redis.from_pool(pool)
        self._gcra = self.redis.register_script(_GCRA)

    async def check(self, scope: str) -> None:
        """Count one request of `scope` against its rate.

        Raises:
            RateLimited: the key is over `rate_limit_per_s` with bursts of `rate_limit_burst`.
        """
        if scope == ANONYMOUS:
            return
        interval = 1.0 / self.settings.rate_limit_per_s
        wait_ms = int(
            await self._gcra(keys=[key("rate", scope)], args=[interval, self.settings.rate_limit_burst])
        )
        if wait_ms > 0:
            raise RateLimited(max(1, math.ceil(wait_ms / 1000)))

    async def aclose(self) -> None:
        await self.redis.aclose()


def submit_job(
    jobs: Jobs, submission: Submission, *, idempotency_key: str | None, scope: str
) -> tuple[JobRecord, bool, QueueView]:
    """`Jobs.submit` within the caller's concurrent-job quota (none with authentication disabled), after the
    webhook URL's SSRF check. A replay of an Idempotency-Key the caller already used costs no slot (it creates
    nothing).

    Raises:
        InvalidField: the webhook URL is refused.
        QuotaExceeded: the key has `max_active_jobs_per_key` queued or running jobs.
    """
    from service.webhooks import check_webhook_url

    settings = jobs.settings
    if submission.webhook_url is not None:
        check_webhook_url(settings, submission.webhook_url)
    return jobs.submit(
        submission,
        idempotency_key=idempotency_key,
        scope=scope,
        max_active=None if scope == ANONYMOUS else settings.max_active_jobs_per_key,
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An ErrorPublic body (the shape of service/app.py's error handlers)."""
    body = {
        "detail": message,
        "error": {"message": message, "type": "invalid_request_error", "code": code, "param": None},
    }
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse request bodies over `limit_bytes` with 413 without reading them whole (pure ASGI)."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit_bytes):
            message = str(PayloadTooLarge(self.limit_bytes))
            # Connection: close — the unread body must not be parsed as the next request.
            response = error_response(413, "payload_too_large", message, {"connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        overflowed = False

        async def limited_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    overflowed = True
                    raise PayloadTooLarge(self.limit_bytes)  # → 413 from the app's exception handler
            return message

        async def closing_send(message: Message) -> None:
            if overflowed and message["type"] == "http.response.start":
                # The rest of the body is still on its way: close rather than read it as the next request.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the body limit, the 429 handlers and a 405 naming every allowed method to `app` (413 is app.py's);
    set Pillow's bomb limit."""
    set_pillow_limit(settings.max_image_pixels)
    app.add_middleware(BodyLimitMiddleware, limit_bytes=settings.request_limit_bytes)

    @app.exception_handler(RateLimited)
    async def rate_limited(_request: Request, exc: RateLimited) -> JSONResponse:
        return error_response(429, "rate_limited", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(QuotaExceeded)
    async def quota_exceeded(_request: Request, exc: QuotaExceeded) -> JSONResponse:
        return error_response(429, "quota_exceeded", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, _exc: Exception) -> JSONResponse:
        # FastAPI makes one route per method and Starlette's 405 names only the first route whose path
        # matched; RFC 9110 §15.5.6 wants every method the resource supports: the OpenAPI document has them.
        allowed = _allowed_methods(app, request.url.path)
        message = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        return error_response(405, "method_not_allowed", message, {"Allow": ", ".join(allowed)})


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/}]+\}", "[^/]+", template), path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def set_pillow_limit(max_pixels: int) -> None:
    """Pillow warns past MAX_IMAGE_PIXELS and raises DecompressionBombError past twice it, from the header
    alone; its default (~89 Mpx) is far above what the service accepts, so every Image.open in this process
    gets the service's own limit instead."""
    Image.MAX_IMAGE_PIXELS = max_pixels
