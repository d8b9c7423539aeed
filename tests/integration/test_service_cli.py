"""`tdserve generate` (engine only) and `tdserve run` (the whole stack, as `make run` starts it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.video import probe_mp4
from tests.integration.conftest import REPO, small_job, wait_job, wait_until
from tests.integration.redis_server import free_port

pytestmark = pytest.mark.integration


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("TD_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_generate_writes_the_default_81_frames_in_under_a_minute(tmp_path: Path) -> None:
    output = tmp_path / "fox.mp4"
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "generate",
            "--model",
            "tiny-t2v",
            "--prompt",
            "a red fox in snow",
            "--seed",
            "0",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 60, f"tdserve generate took {elapsed:.1f} s"  # the engine-core budget on 2 CPU cores
    info = probe_mp4(output)
    assert (info["num_frames"], info["width"], info["height"], info["codec"]) == (81, 160, 96, "h264")
    assert "100%" in result.stderr
    for stage in ("load", "text_encode", "denoise", "vae_decode", "encode_mp4", "total"):
        assert f"{stage} " in result.stderr, stage


def test_generate_refuses_bad_parameters(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "generate",
            "--model",
            "tiny-t2v",
            "--prompt",
            "x",
            "--frames",
            "10",
            "-o",
            str(tmp_path / "x.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "num_frames" in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_run_starts_redis_api_and_workers_and_stops_cleanly(tmp_path: Path) -> None:
    api_port, redis_port = free_port(), free_port()
    env = clean_env(
        TD_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        TD_STORAGE_DIR=str(tmp_path / "results"),
        TD_WORKER_HEARTBEAT_S="0.5",
        TD_WORKER_LOST_AFTER_S="3",
    )
    url = f"http://127.0.0.1:{api_port}"
    run = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run", "--port", str(api_port), "--models", "tiny-t2v"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60, what="tdserve run to be ready")
        with httpx.Client(base_url=url, timeout=30) as client:
            job = client.post("/v1/generate", json=small_job()).json()
            assert wait_job(client, job["id"], ("completed", "failed"))["status"] == "completed"
        assert (tmp_path / "results" / ".redis").is_dir()  # its own redis-server, data beside the results
    finally:
        run.send_signal(signal.SIGINT)
        output = run.communicate(timeout=60)[0].decode()
    assert run.returncode == 0, output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    with pytest.raises(RedisConnectionError):
        Redis(port=redis_port, socket_connect_timeout=1).ping()
