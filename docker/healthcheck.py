"""Container healthcheck: exit 0 while the tdserve process in this container serves, 1 otherwise.

PID 1 is `tdserve api …`, `tdserve run …` or `tdserve worker …` (entrypoint.py execs it), so /proc/1/cmdline
says which probe applies:
- api / run: `GET /healthz` on the API port answers 200;
- worker: its metrics port answers 200 and `tdserve_worker_state{state="UNHEALTHY"}` is not 1 (a worker marks
  itself UNHEALTHY after repeated CUDA OOMs, just before it exits for the restart policy to replace it).
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

DEFAULT_API_PORT = 8000
DEFAULT_WORKER_METRICS_PORT = 9100
TIMEOUT_S = 4.0  # under the Dockerfile's HEALTHCHECK --timeout=5s
_UNHEALTHY_SAMPLE = re.compile(r'^tdserve_worker_state\{[^}]*\bstate="UNHEALTHY"[^}]*\}\s+(\S+)',
                               re.MULTILINE)


def probe_url(cmdline: list[str], env: Mapping[str, str]) -> tuple[str, str]:
    """(role, URL to probe) for the tdserve command line `cmdline` (argv of PID 1).

    Raises:
        ValueError: the command line is not a tdserve api/run/worker command.
    """
    role = next((arg for arg in cmdline if arg in ("api", "run", "worker")), None)
    if role is None:
        raise ValueError(f"PID 1 is not a tdserve api/run/worker command: {' '.join(cmdline)!r}")
    if role == "worker":
        port = int(env.get("TD_WORKER_METRICS_PORT") or DEFAULT_WORKER_METRICS_PORT)
        return role, f"http://127.0.0.1:{port}/metrics"
    port = int(env.get("TD_API_PORT") or DEFAULT_API_PORT)
    if "--port" in cmdline[:-1]:
        port = int(cmdline[cmdline.index("--port") + 1])
    return role, f"http://127.0.0.1:{port}/healthz"


def worker_unhealthy(metrics_text: str) -> bool:
    """True when the exposition text reports tdserve_worker_state{state="UNHEALTHY"} == 1."""
    return any(float(value) == 1.0 for value in _UNHEALTHY_SAMPLE.findall(metrics_text))


def check(cmdline: list[str], env: Mapping[str, str]) -> tuple[bool, str]:
    """(healthy, reason) for the process whose argv is `cmdline`."""
    role, url = probe_url(cmdline, env)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            body = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return False, f"{role}: {url} did not answer 200 ({e})"
    if role == "worker" and worker_unhealthy(body):
        return False, "worker: tdserve_worker_state reports UNHEALTHY"
    return True, f"{role}: {url} ok"


def main() -> int:
    cmdline = [arg for arg in Path("/proc/1/cmdline").read_bytes().decode().split("\0") if arg]
    try:
        healthy, reason = check(cmdline, os.environ)
    except ValueError as e:
        healthy, reason = False, str(e)
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
