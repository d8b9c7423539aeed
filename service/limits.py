"""Limits that keep one client from taking the service: request rate and concurrent jobs per API key (kept in
Redis, so every API replica shares them), the request-body cap, and Pillow's decompression-bomb limit.

- **Rate**: GCRA (the generic cell-rate algorithm, one Redis key per API key holding its "theoretical arrival
  time"): `rate_limit_per_s` sustained with bursts of `rate_limit_burst`; past it 429 `rate_limited` with
  Retry-After. Redis's clock is the only clock, so replicas with skewed clocks agree.
- **Quota**: at most `max_active_jobs_per_key` queued + running jobs per key; past it 429 `quota_exceeded`.
  A zset per key holds its active job ids; a Lua script prunes the ended ones and reserves a slot in one step,
  so concurrent submissions cannot overshoot.
- **Body**: a declared Content-Length over the limit is answered 413 before a byte is read; a body without
  one (chunked) is counted as it arrives and refused the moment it passes the limit.

Both per-key limits apply to keyed callers; with authentication disabled (local runs) only the queue-depth
admission of service/queue.py applies.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from redis import Redis
from redis.commands.core import Script

from service import metrics
from service.auth import ANONYMOUS
from service.queue import JobRecord, Jobs, Submission, key
from service.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A reservation not turned into a job within this long was left by a crashed request: its slot is freed.
_RESERVATION_TTL_S = 60
_RESERVATION_PREFIX = "pending:"
# Retry-After for a full quota when the model has no measured run time yet.
_DEFAULT_QUOTA_RETRY_S = 10


class PayloadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds {limit} bytes")


class RateLimited(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many requests for this API key; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QuotaExceeded(Exception):
    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(f"this API key already has {limit} queued or running jobs, its limit")
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

# KEYS[1] the key's active-job zset (member → time added). ARGV[1] limit, ARGV[2] reservation to add,
# ARGV[3] job-hash key prefix, ARGV[4] reservation TTL (s), ARGV[5] reservation prefix. Ended or deleted jobs
# and stale reservations are pruned; returns 1 when the reservation was added, 0 when the quota is full.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local active = 0
for i = 1, #members, 2 do
  local id = members[i]
  local added = tonumber(members[i + 1])
  local live
  if string.sub(id, 1, #ARGV[5]) == ARGV[5] then
    live = now - added < tonumber(ARGV[4])
  else
    local status = redis.call('HGET', ARGV[3] .. id, 'status')
    live = status == '"queued"' or status == '"in_progress"'
  end
  if live then active = active + 1 else redis.call('ZREM', KEYS[1], id) end
end
if active >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[2])
return 1
"""


@lru_cache(maxsize=8)
def _scripts(redis: Redis) -> tuple[Script, Script]:
    return redis.register_script(_GCRA), redis.register_script(_RESERVE)


def check_rate(redis: Redis, settings: Settings, scope: str) -> None:
    """Count one request of `scope` against its rate.

    Raises:
        RateLimited: the key is over `rate_limit_per_s` with bursts of `rate_limit_burst`.
    """
    if scope == ANONYMOUS:
        return
    gcra, _ = _scripts(redis)
    wait_ms = int(
        gcra(keys=[key("rate", scope)], args=[1.0 / settings.rate_limit_per_s, settings.rate_limit_burst])
    )
    if wait_ms > 0:
        raise RateLimited(max(1, math.ceil(wait_ms / 1000)))


def submit_job(
    jobs: Jobs, submission: Submission, *, idempotency_key: str | None, scope: str
) -> tuple[JobRecord, bool]:
    """`Jobs.submit` within the caller's concurrent-job quota, after the webhook URL's SSRF check.

    A replay of an Idempotency-Key the caller already used costs no slot (it creates nothing).

    Raises:
        InvalidField: the webhook URL is refused.
        QuotaExceeded: the key has `max_active_jobs_per_key` queued or running jobs.
    """
    from service.webhooks import check_webhook_url

    settings = jobs.settings
    if submission.webhook_url is not None:
        check_webhook_url(settings, submission.webhook_url)
    # The key layout of Jobs.submit's idempotency records (service/queue.py).
    if scope == ANONYMOUS or (
        idempotency_key is not None and jobs.redis.exists(key("idem", scope, _sha256(idempotency_key)))
    ):
        return jobs.submit(submission, idempotency_key=idempotency_key, scope=scope)
    active = key("active", scope)
    reservation = f"{_RESERVATION_PREFIX}{uuid.uuid4()}"
    _, reserve = _scripts(jobs.redis)
    admitted = reserve(
        keys=[active],
        args=[
            settings.max_active_jobs_per_key,
            reservation,
            key("job", ""),
            _RESERVATION_TTL_S,
            _RESERVATION_PREFIX,
        ],
    )
    if not admitted:
        metrics.count_job_rejected(submission.model, "quota_exceeded")
        average = jobs.average_run_s(submission.model)
        retry = _DEFAULT_QUOTA_RETRY_S if average is None else max(1, math.ceil(average))
        raise QuotaExceeded(settings.max_active_jobs_per_key, retry)
    try:
        record, replayed = jobs.submit(submission, idempotency_key=idempotency_key, scope=scope)
    except BaseException:
        jobs.redis.zrem(active, reservation)
        raise
    with jobs.redis.pipeline() as pipe:
        pipe.zrem(active, reservation)
        if not replayed:
            pipe.zadd(active, {record.id: record.created_at})
        pipe.execute()
    return record, replayed


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
