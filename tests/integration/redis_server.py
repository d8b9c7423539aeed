"""A real Redis for the service tests: the one answering on 127.0.0.1:6379, else a redis-server started here.

Each test module family uses its own DB index and flushes it before and after, so tests never see each
other's jobs (nor anything else stored in that Redis).
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time

from redis import Redis
from redis.exceptions import RedisError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 6379
UNIT_DB = 14  # tests/unit/test_service_*.py
INTEGRATION_DB = 13  # tests/integration/
SECURITY_DB = 12  # tests/unit/test_*_security.py
RELIABILITY_DB = 11  # tests/integration/test_reliability_*.py, test_security_*.py
METRICS_UNIT_DB = 10  # tests/unit/test_metrics*.py
METRICS_INTEGRATION_DB = 9  # tests/integration/test_metrics*.py

_started: subprocess.Popen[bytes] | None = None
_base_url: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def redis_base_url() -> str:
    """`redis://host:port` of a live Redis (started once per test session when none answers)."""
    global _started, _base_url
    if _base_url is not None:
        return _base_url
    url = f"redis://{DEFAULT_HOST}:{DEFAULT_PORT}"
    if not _answers(url):
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        port = free_port()
        data_dir = tempfile.mkdtemp(prefix="tdserve-redis-")
        _started = subprocess.Popen(
            [
                server,
                "--bind",
                DEFAULT_HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                data_dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        atexit.register(_started.terminate)
        url = f"redis://{DEFAULT_HOST}:{port}"
        for _ in range(100):
            if _answers(url):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("redis-server did not come up")
    _base_url = url
    return url


def flushed_db_url(db: int) -> str:
    """URL of DB `db`, emptied."""
    url = f"{redis_base_url()}/{db}"
    Redis.from_url(url).flushdb()
    return url
