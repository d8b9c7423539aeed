"""Helpers for the reliability and security tests: a redis-server of the test's own (restartable, appendonly),
a loopback webhook receiver, and checks that hold after any fault (no pickle in Redis, every job terminal)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
from redis import Redis
from redis.exceptions import RedisError

from tests.integration.redis_server import free_port

TERMINAL = ("completed", "failed", "canceled", "expired")


class OwnRedis:
    """A redis-server on a free port with appendonly (fsync always) in `data_dir`; stop() and start() again
    keep the data: what a Redis restart does to a deployment."""

    def __init__(self, data_dir: Path, password: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_connect_timeout=1)

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None, "redis-server is not installed"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except RedisError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not come up")

    def stop(self) -> None:
        """SIGTERM: Redis flushes the AOF and exits, as on a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        self.process = None


class WebhookReceiver:
    """A loopback HTTP server recording each POST (headers, raw body); the first `fail_first` answer 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                    )
                    failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = (
            f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tdserve?token=hook-token-not-for-logs"
        )
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def assert_no_pickle(redis: Redis) -> int:
    """No RQ hash field holds pickle (protocol header 0x80), raw or zlib-compressed; returns fields checked."""
    checked = 0
    for name in redis.scan_iter("rq:*"):
        if redis.type(name) != b"hash":
            continue
        for field, stored in redis.hgetall(name).items():
            assert isinstance(stored, bytes)  # RQ's client does not decode
            value = stored
            try:
                value = zlib.decompress(value)
            except zlib.error:
                pass
            assert not value.startswith(b"\x80"), (name, field)
            checked += 1
    return checked


def all_jobs(client: httpx.Client) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", params=params).json()
        yield from page["data"]
        if not page["has_more"]:
            return
        after = page["last_id"]
