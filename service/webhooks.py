"""Webhooks: a signed POST to the job's `webhook_url` when it ends, retried with backoff, every attempt recorded.

Signing follows Standard Webhooks (standardwebhooks.com; OpenAI and Replicate use it):
    webhook-id         msg_<uuid>, the same on every attempt (receivers dedupe on it)
    webhook-timestamp  Unix seconds of this attempt
    webhook-signature  "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
where the secret is `whsec_<base64 key>` (TD_WEBHOOK_SECRET). `verify` is the receiver's side.

Delivery reads the `td:events` stream of terminal transitions (service/queue.py) through a consumer group, so
each event goes to one API replica and an event taken by a replica that died is claimed by another after a
minute. Per job one delivery record (`td:webhook:<job id>`, JSON) holds the frozen body and the outcome of
every attempt; a zset (`td:webhooks:due`) holds when each undelivered one is due. A replica leases a due
delivery by pushing its due time past the attempt's timeout in one Lua step, so two never send the same
attempt, and one that dies mid-attempt only delays it.

SSRF guard: a URL naming a private, loopback, link-local, reserved or multicast address (or `localhost`) is
refused at submission; at delivery the host is resolved, every address checked, and the connection made to the
checked address (no second lookup a rebinding DNS server could answer differently). Redirects are not followed.
`webhook_allow_private` lifts the guard (tests use a loopback receiver).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, cast

import httpx
from redis.exceptions import RedisError, ResponseError

from service import metrics
from service.auth import WEBHOOK_SECRET_PREFIX, secret_key
from service.queue import EVENTS, InvalidField, JobNotFound, Jobs, key
from service.schemas import JobStatus, WebhookDeliveryPublic
from service.settings import Settings

log = logging.getLogger("tdserve.webhooks")
# httpx logs every request URL at INFO; a webhook URL may carry the receiver's token in its query.
logging.getLogger("httpx").setLevel(logging.WARNING)

DUE = key("webhooks", "due")  # zset: job id → when its next attempt is due (or its lease ends)
GROUP = "webhooks"  # consumer group on the events stream
EVENT_TYPES: dict[str, str] = {
    JobStatus.completed.value: "video.completed",
    JobStatus.failed.value: "video.failed",
    JobStatus.expired.value: "video.failed",  # OpenAI has no expired status: a job that never ran failed
    JobStatus.canceled.value: "video.canceled",
}
MAX_BACKOFF_S = 3600.0
# An event taken by a replica that has not acknowledged it for this long is claimed by another one.
_CLAIM_IDLE_MS = 60_000
_CLAIM_EVERY_S = 30.0
_BATCH = 50

DeliveryStatus = Literal["pending", "delivered", "failed"]


# --- Signing --------------------------------------------------------------------------------------------------


class WebhookVerificationError(ValueError):
    pass


def new_webhook_secret() -> str:
    """A fresh `whsec_` secret: 32 random bytes, base64."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> None:
    """Check a received webhook: a `v1` signature over the raw body, a timestamp within `tolerance_s`.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is off, or no signature matches.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        raise WebhookVerificationError(
            "webhook-id, webhook-timestamp and webhook-signature are required"
        ) from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s} s away from now")
    expected = sign(secret, message_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in signatures):
        raise WebhookVerificationError("no webhook-signature matches the body")


# --- SSRF guard -------------------------------------------------------------------------------------------------


class BlockedDestination(ValueError):
    pass


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, including the legacy IPv4 forms resolvers accept (`2130706433`,
    `127.1`, `0x7f.0.0.1`), which `ipaddress` alone does not parse."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def check_webhook_url(settings: Settings, url: str) -> None:
    """Submission-time check of a webhook URL (the name-based part waits for delivery).

    Raises:
        InvalidField: webhooks are not configured, or the URL names a non-public address.
    """
    if settings.webhook_secret is None:
        raise InvalidField("webhook_url", "webhook_url needs TD_WEBHOOK_SECRET set on the server")
    host = httpx.URL(url).host
    if settings.webhook_allow_private:
        return
    address = _literal_address(host)
    if (
        host == "localhost"
        or host.endswith(".localhost")
        or (address is not None and not _is_public(address))
    ):
        raise InvalidField(
            "webhook_url", f"webhook_url must not point at a private, loopback or link-local address ({host})"
        )


def resolve_destination(url: str, allow_private: bool) -> str:
    """The address to connect to for `url`, after checking every address its host resolves to.

    Raises:
        BlockedDestination: the host does not resolve, or resolves to a non-public address.
    """
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise BlockedDestination(f"{parsed.host} does not resolve ({e.strerror or e})") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise BlockedDestination(f"{parsed.host} does not resolve")
    if not allow_private:
        blocked = sorted({str(a) for a in addresses if not _is_public(a)})
        if blocked:
            raise BlockedDestination(f"{parsed.host} resolves to non-public address {', '.join(blocked)}")
    return str(addresses[0])


# --- Delivery records -----------------------------------------------------------------------------------------


def delivery_key(job_id: str) -> str:
    return key("webhook", job_id)


def _datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def delivery_public(jobs: Jobs, job_id: str) -> WebhookDeliveryPublic:
    """The webhook delivery of a job, as the API reports it.

    Raises:
        JobNotFound: no such job, or the job has no webhook_url.
    """
    record = jobs.get(job_id)
    if record.webhook_url is None:
        raise JobNotFound(f"job {record.id} has no webhook_url")
    stored = jobs.redis.get(delivery_key(record.id))
    if stored is None:
        return WebhookDeliveryPublic(
            job_id=record.id,
            url=record.webhook_url,
            status="pending" if record.status.is_terminal else "waiting",
            id=None,
            event=None,
            attempts=0,
            last_status_code=None,
            last_error=None,
            created_at=None,
            last_attempt_at=None,
            next_attempt_at=None,
            delivered_at=None,
        )
    delivery = json.loads(stored)
    return WebhookDeliveryPublic(
        job_id=record.id,
        url=delivery["url"],
        status=delivery["status"],
        id=delivery["id"],
        event=delivery["event"],
        attempts=delivery["attempts"],
        last_status_code=delivery["last_status_code"],
        last_error=delivery["last_error"],
        created_at=_datetime(delivery["created_at"]),
        last_attempt_at=_datetime(delivery["last_attempt_at"]),
        next_attempt_at=_datetime(delivery["next_attempt_at"]),
        delivered_at=_datetime(delivery["delivered_at"]),
    )


# KEYS[1] due zset. ARGV[1] now, ARGV[2] lease end, ARGV[3] count. Leases the due deliveries: their score moves
# to the lease end, so no other replica takes them until then.
_LEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id) end
return due
"""


class WebhookDispatcher:
    """A daemon thread in each API process: turns terminal events into deliveries and sends the due ones."""

    def __init__(self, jobs: Jobs, settings: Settings, consumer: str | None = None) -> None:
        self.jobs = jobs
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}.{os.getpid()}"
        self._lease = jobs.redis.register_script(_LEASE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._group_ready = False
        self._last_claim = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.webhook_timeout_s + 5)

    def _loop(self) -> None:
        with httpx.Client(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        ) as http:
            while not self._stop.is_set():
                try:
                    self.collect(block_ms=500)
                    self.deliver_due(http)
                except RedisError as e:
                    log.warning("webhooks: Redis unavailable (%s)", e)
                    self._stop.wait(1.0)
                except Exception:
                    log.exception("webhooks: dispatcher pass failed")
                    self._stop.wait(1.0)

    # --- events → deliveries ---

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From the stream's start: jobs that ended while no API ran are delivered too.
            self.jobs.redis.xgroup_create(EVENTS, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def collect(self, block_ms: int | None = None) -> None:
        """Read new terminal events (and events a dead replica left unacknowledged) into deliveries."""
        self._ensure_group()
        redis = self.jobs.redis
        entries: list[tuple[str, dict[str, str]]] = []
        if time.monotonic() - self._last_claim > _CLAIM_EVERY_S:
            self._last_claim = time.monotonic()
            claimed = redis.xautoclaim(EVENTS, GROUP, self.consumer, _CLAIM_IDLE_MS, count=_BATCH)
            entries += [(entry_id, fields) for entry_id, fields in claimed[1] if fields]
        try:
            read = cast(
                "list[tuple[str, list[tuple[str, dict[str, str]]]]] | None",
                redis.xreadgroup(GROUP, self.consumer, {EVENTS: ">"}, count=_BATCH, block=block_ms),
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False  # the stream was deleted (FLUSHDB): recreate the group next pass
            return
        for _stream, stream_entries in read or []:
            entries += stream_entries
        for entry_id, fields in entries:
            self._schedule(fields)
            redis.xack(EVENTS, GROUP, entry_id)

    def _schedule(self, event: Mapping[str, str]) -> None:
        job_id, status = event.get("job_id"), event.get("status")
        if job_id is None or status not in EVENT_TYPES:
            return
        record = self.jobs.find(job_id)
        if record is None or record.webhook_url is None:
            return
        now = time.time()
        message_id = f"msg_{uuid.uuid4().hex}"
        event_type = EVENT_TYPES[status]
        payload = {
            "id": message_id,
            "type": event_type,
            "timestamp": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
            "data": self.jobs.to_job_public(record).model_dump(mode="json"),
        }
        delivery = {
            "id": message_id,
            "job_id": record.id,
            "url": record.webhook_url,
            "event": event_type,
            "body": json.dumps(payload, separators=(",", ":")),
            "status": "pending",
            "attempts": 0,
            "created_at": now,
            "last_attempt_at": None,
            "next_attempt_at": now,
            "delivered_at": None,
            "last_status_code": None,
            "last_error": None,
        }
        redis = self.jobs.redis
        ttl = self.settings.result_ttl_s
        # NX: an event read twice (claimed after a replica died) keeps its first message id and body.
        if redis.set(delivery_key(record.id), json.dumps(delivery), nx=True, ex=ttl):
            redis.zadd(DUE, {record.id: now})
            return
        stored = redis.get(delivery_key(record.id))
        if stored is not None and json.loads(stored)["status"] == "pending":
            redis.zadd(DUE, {record.id: now}, nx=True)

    # --- attempts ---

    def deliver_due(self, http: httpx.Client) -> int:
        """Send every due delivery once; returns how many were attempted."""
        now = time.time()
        lease_end = now + self.settings.webhook_timeout_s + 30
        due: list[str] = self._lease(keys=[DUE], args=[now, lease_end, _BATCH])
        for job_id in due:
            self._attempt(http, job_id)
        return len(due)

    def _attempt(self, http: httpx.Client, job_id: str) -> None:
        redis = self.jobs.redis
        stored = redis.get(delivery_key(job_id))
        if stored is None:  # expired with its job
            redis.zrem(DUE, job_id)
            return
        delivery: dict[str, Any] = json.loads(stored)
        if delivery["status"] != "pending":
            redis.zrem(DUE, job_id)
            return
        now = time.time()
        delivery["attempts"] += 1
        delivery["last_attempt_at"] = now
        status_code, error = self._send(http, delivery)
        delivery["last_status_code"] = status_code
        delivery["last_error"] = error
        host = httpx.URL(delivery["url"]).host  # the URL itself may carry a token: log the host only
        permanent = error is not None and error.startswith("refused:")
        if error is None:
            metrics.count_webhook_delivery("delivered")
            delivery["status"] = "delivered"
            delivery["delivered_at"] = time.time()
            delivery["next_attempt_at"] = None
            log.info("webhook %s (job %s) delivered to %s", delivery["event"], job_id, host)
        elif permanent or delivery["attempts"] >= self.settings.webhook_max_attempts:
            metrics.count_webhook_delivery("failed")
            delivery["status"] = "failed"
            delivery["next_attempt_at"] = None
            log.warning(
                "webhook %s (job %s) to %s failed after %d attempts: %s",
                delivery["event"],
                job_id,
                host,
                delivery["attempts"],
                error,
            )
        else:
            metrics.count_webhook_delivery("retrying")
            delay = min(MAX_BACKOFF_S, self.settings.webhook_backoff_s * 2 ** (delivery["attempts"] - 1))
            delivery["next_attempt_at"] = now + delay
            log.info(
                "webhook %s (job %s) to %s: attempt %d failed (%s); retrying in %.1f s",
                delivery["event"],
                job_id,
                host,
                delivery["attempts"],
                error,
                delay,
            )
        with redis.pipeline() as pipe:
            pipe.set(delivery_key(job_id), json.dumps(delivery), keepttl=True)
            if delivery["status"] == "pending":
                pipe.zadd(DUE, {job_id: delivery["next_attempt_at"]})
            else:
                pipe.zrem(DUE, job_id)
            pipe.execute()

    def _send(self, http: httpx.Client, delivery: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """One POST; (status code, None) on a 2xx answer, else (status code or None, reason)."""
        assert self.settings.webhook_secret is not None
        url = httpx.URL(delivery["url"])
        try:
            address = resolve_destination(str(url), self.settings.webhook_allow_private)
        except BlockedDestination as e:
            return None, f"refused: {e}"
        body = delivery["body"].encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "tdserve-webhooks",
            "host": url.netloc.decode("ascii"),
            "webhook-id": delivery["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(
                self.settings.webhook_secret.get_secret_value(), delivery["id"], timestamp, body
            ),
        }
        try:
            # Connect to the checked address; Host and TLS SNI keep the name the receiver expects.
            with http.stream(
                "POST",
                url.copy_with(host=address),
                content=body,
                headers=headers,
                extensions={"sni_hostname": url.host},
            ) as response:
                status = response.status_code  # the body is never read: a receiver cannot flood us
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"[:300]
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"
