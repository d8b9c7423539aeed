"""Security on the live stack with API keys and webhooks configured: keys required (and the API refusing to
start without them unless explicitly disabled), Standard Webhooks delivery signed, retried with backoff and
recorded, a 50 MB upload refused before it is read whole, and no secret in any process log."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from service.auth import key_digest, new_api_key, secret_key
from service.webhooks import new_webhook_secret, verify
from tests.integration.conftest import REPO, LiveStack, small_job, submit, wait_job, wait_until
from tests.integration.faultkit import WebhookReceiver
from tests.integration.redis_server import RELIABILITY_DB, flushed_db_url

pytestmark = pytest.mark.integration

API_KEY = new_api_key()
WEBHOOK_SECRET = new_webhook_secret()
TINY = small_job(num_frames=5, steps=1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(
        tmp_path_factory.mktemp("secure"),
        flushed_db_url(RELIABILITY_DB),
        ["tiny-t2v"],
        TD_AUTH_DISABLED="false",
        TD_API_KEYS=key_digest(API_KEY),
        TD_RATE_LIMIT_PER_S="200",  # the tests poll every 50 ms
        TD_WEBHOOK_SECRET=WEBHOOK_SECRET,
        TD_WEBHOOK_ALLOW_PRIVATE="true",  # the receiver listens on loopback
        TD_WEBHOOK_BACKOFF_S="0.3",
        TD_WEBHOOK_MAX_ATTEMPTS="3",
    )
    try:
        live.start_api()
        live.start_worker("tiny-t2v", "secure-worker")
        yield live
    finally:
        live.stop()
        flushed_db_url(RELIABILITY_DB)


@pytest.fixture
def client(stack: LiveStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        yield http


def test_the_api_needs_a_key_and_will_not_start_open_by_accident(
    stack: LiveStack, client: httpx.Client
) -> None:
    assert httpx.post(f"{stack.url}/v1/generate", json=TINY).status_code == 401
    bad = httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer td_guess"})
    assert bad.status_code == 401
    assert wait_job(client, submit(client, TINY)["id"], ("completed", "failed"))["status"] == "completed"

    env = {
        name: value for name, value in stack.env.items() if name not in ("TD_API_KEYS", "TD_AUTH_DISABLED")
    }
    refused = subprocess.run(
        [sys.executable, "-m", "service.cli", "api", "--port", "1"],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "TD_AUTH_DISABLED=true" in refused.stderr


def test_webhooks_are_signed_retried_with_backoff_and_recorded(client: httpx.Client) -> None:
    with WebhookReceiver(fail_first=2) as receiver:
        job = submit(client, {**TINY, "webhook_url": receiver.url})
        assert wait_job(client, job["id"], ("completed", "failed"))["status"] == "completed"
        wait_until(lambda: len(receiver.received) == 3, timeout=20, what="the third delivery attempt")
        delivery = client.get(f"/v1/jobs/{job['id']}/webhook").json()
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3, delivery
    assert delivery["last_status_code"] == 204 and delivery["event"] == "video.completed"

    (first, body, first_at), (_, _, second_at), (third, third_body, third_at) = receiver.received
    # One message id across the attempts (receivers dedupe on it), the same body, a fresh signature each time.
    assert first["webhook-id"] == third["webhook-id"] == delivery["id"] and body == third_body
    assert second_at - first_at >= 0.3 * 0.9 and third_at - second_at >= 0.6 * 0.9  # backoff 0.3 s, doubling
    for headers, raw, _ in receiver.received:
        verify(WEBHOOK_SECRET, headers, raw)
        sdk = openai.OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET)
        sdk.webhooks.verify_signature(raw, headers)  # an independent Standard Webhooks verifier
    event = json.loads(body)
    assert event["type"] == "video.completed" and event["id"] == delivery["id"]
    assert event["data"]["id"] == job["id"] and event["data"]["status"] == "completed"


def test_failed_jobs_notify_and_exhausted_deliveries_are_recorded(client: httpx.Client) -> None:
    with WebhookReceiver(fail_first=100) as receiver:
        # A deadline already past when the worker picks it: the job expires without running.
        job = submit(client, {**TINY, "deadline_seconds": 0.001, "webhook_url": receiver.url})
        assert wait_job(client, job["id"], ("expired", "completed", "failed"))["status"] == "expired"

        def exhausted() -> bool:
            return bool(client.get(f"/v1/jobs/{job['id']}/webhook").json()["status"] == "failed")

        wait_until(exhausted, timeout=20, what="the delivery to give up")
    delivery = client.get(f"/v1/jobs/{job['id']}/webhook").json()
    assert (
        delivery["attempts"] == 3
        and delivery["last_status_code"] == 500
        and delivery["last_error"] == "HTTP 500"
    )
    assert len(receiver.received) == 3
    event = json.loads(receiver.received[0][1])
    assert event["type"] == "video.failed" and event["data"]["error"]["code"] == "expired_in_queue"
    assert client.get(f"/v1/jobs/{submit(client, TINY)['id']}/webhook").status_code == 404  # no webhook_url


def test_a_50_mb_upload_is_refused_before_it_is_read_whole(stack: LiveStack) -> None:
    total = 50 * 1024 * 1024
    boundary = "tdserveboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nwaves\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny-i2v\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    request = (
        f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"\x89PNG" + b"\x00" * (1024 * 1024 - 4)
    sent = 0
    response = b""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as conn:
        conn.sendall(request + b"%x\r\n%s\r\n" % (len(head), head))
        while sent < total and b"\r\n\r\n" not in response:
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: read its answer below
            if select.select([conn], [], [], 0)[0]:
                response += conn.recv(65536)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the rest of the answer, until the server closes
            try:
                data = conn.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"payload_too_large" in response and b"connection: close" in response.lower()
    # Refused at the limit (~26.7 MB: a 20 MB image as base64 plus 64 KiB) while the client was still sending;
    # what was sent beyond it sat in socket buffers, never in the API.
    assert sent < 40 * 1024 * 1024, f"the client sent {sent} bytes before the 413"
    print(f"\n50 MB upload: 413 after {sent / 2**20:.0f} MiB of {total / 2**20:.0f} MiB were sent")

    # A declared Content-Length over the limit is answered from the headers alone, before any body byte.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as conn:
        conn.sendall(request.replace(b"Transfer-Encoding: chunked", b"Content-Length: %d" % total))
        declared = conn.recv(65536)
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]


def test_logs_hold_no_secrets(stack: LiveStack, client: httpx.Client) -> None:
    with WebhookReceiver() as receiver:
        job = submit(client, {**TINY, "webhook_url": receiver.url})
        wait_until(lambda: len(receiver.received) == 1, timeout=30, what="the webhook")
    assert wait_job(client, job["id"], ("completed",))["status"] == "completed"
    httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}x"})  # a near miss
    secrets = {
        "API key": API_KEY,
        "webhook secret": WEBHOOK_SECRET.removeprefix("whsec_"),
        "webhook HMAC key (hex)": secret_key(WEBHOOK_SECRET).hex(),
        "webhook URL token": "hook-token-not-for-logs",
        "Authorization header": "Bearer ",
    }
    logs = {path.name: path.read_text() for path in stack.root.glob("*.log")}
    assert set(logs) == {"api.log", "secure-worker.log"} and all(logs.values())
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {name}"
