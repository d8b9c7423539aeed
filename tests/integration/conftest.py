"""The live stack for integration tests: real Redis (own DB index), a real uvicorn API process and real worker
processes running the tiny models on the CPU. Nothing is mocked.

`LiveStack` starts and stops each process on its own, so tests can restart the API or kill a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.redis_server import INTEGRATION_DB, flushed_db_url, free_port

REPO = Path(__file__).resolve().parents[2]

# Fast failure detection for tests: heartbeat every 0.5 s, a worker silent 3 s is lost.
TEST_ENV = {
    "TD_WORKER_HEARTBEAT_S": "0.5",
    "TD_WORKER_LOST_AFTER_S": "3",
    "TD_JANITOR_INTERVAL_S": "0.5",
    "TD_TORCH_THREADS": "1",
    "TD_LOG_LEVEL": "INFO",
    # No API keys: said explicitly (the API refuses to start otherwise); the security tests set keys.
    "TD_AUTH_DISABLED": "true",
    # Each worker on a free metrics port (its metrics_url in /readyz says which): several share this host.
    "TD_WORKER_METRICS_PORT": "0",
}


class LiveStack:
    def __init__(self, root: Path, redis_url: str, models: list[str], **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = root / "results"
        self.redis_url = redis_url
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("TD_")}
        self.env.update(
            {
                "TD_REDIS_URL": redis_url,
                "TD_STORAGE_DIR": str(self.storage),
                "TD_MODELS": ",".join(models),
                "TD_API_PORT": str(self.port),
                "PYTHONPATH": str(REPO),
                **TEST_ENV,
                **env,
            }
        )
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Path] = []

    def _spawn(self, name: str, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        self._logs.append(log)
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "service.cli", *command],
                env={**self.env, **(env or {})},
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start_api(self) -> None:
        self.api = self._spawn("api", "api")
        wait_until(lambda: _get_ok(f"{self.url}/healthz"), timeout=30, what="the API to answer")

    def stop_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGTERM)
        self.api.wait(timeout=20)
        self.api = None

    def start_worker(
        self, model: str, name: str, *, wait: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        process = self._spawn(name, "worker", "--model", model, "--name", name, env=env)
        self.workers[name] = process
        if wait:  # a worker with a job waiting goes READY → BUSY at once
            self.wait_worker(name, ("READY", "BUSY"))
        return process

    def worker_state(self, name: str) -> dict[str, Any] | None:
        workers = httpx.get(f"{self.url}/readyz").json()["workers"]
        return next((w for w in workers if w["id"] == name), None)

    def wait_worker(self, name: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def in_state() -> bool:
            worker = self.worker_state(name)
            if worker is not None and worker["state"] in states:
                found.update(worker)
                return True
            return False

        wait_until(in_state, timeout=timeout, what=f"worker {name} in {states}")
        return found

    def stop(self) -> None:
        processes = [p for p in (self.api, *self.workers.values()) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"===== {log.name}\n{log.read_text()[-4000:]}" for log in self._logs if log.exists())


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_job(
    client: httpx.Client,
    job_id: str,
    statuses: tuple[str, ...],
    timeout: float = 60,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until its status is one of `statuses`."""
    found: dict[str, Any] = {}

    def done() -> bool:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if on_poll is not None:
            on_poll(job)
        found.clear()
        found.update(job)
        return job["status"] in statuses

    wait_until(done, timeout=timeout, what=f"job {job_id} to be {statuses}", interval=0.05)
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """API + one worker per tiny model, for a whole test module."""
    redis_url = flushed_db_url(INTEGRATION_DB)
    live = LiveStack(tmp_path_factory.mktemp("stack"), redis_url, ["tiny-t2v", "tiny-i2v"])
    try:
        live.start_api()
        live.start_worker("tiny-t2v", "t2v-worker", wait=False)
        live.start_worker("tiny-i2v", "i2v-worker", wait=False)
        live.wait_worker("t2v-worker", ("READY",))
        live.wait_worker("i2v-worker", ("READY",))
        yield live
    except BaseException:
        print(live.logs())
        raise
    finally:
        live.stop()
        flushed_db_url(INTEGRATION_DB)


@pytest.fixture
def client(stack: LiveStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http


# 161 frames at 256x144, 4 steps: about 0.5 s per denoising step on one CPU thread, then some 40 s of VAE
# decoding, so a job that stops at its next step check frees the worker an order of magnitude sooner.
LONG_JOB = {
    "model": "tiny-t2v",
    "prompt": "a long blocking job",
    "num_frames": 161,
    "width": 256,
    "height": 144,
    "steps": 4,
}


def small_job(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-t2v",
        "prompt": "a red fox running through snow",
        "num_frames": 5,
        "steps": 2,
        **overrides,
    }


def submit(client: httpx.Client, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = client.post("/v1/generate", json=body, **kwargs)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    import io

    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Attach the live processes' logs to a failing test's report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    live = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(live, LiveStack):
        report.sections.append(("live stack logs", live.logs()))
