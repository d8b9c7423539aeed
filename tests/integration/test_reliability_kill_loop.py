"""Worker SIGKILL in a loop across two workers: every job ends completed (retried once) or failed with
`worker_lost` (killed on both attempts), none stays queued or in progress, and no half-written MP4 is served.

CI runs TD_TEST_WORKER_KILLS (default 4) kills; docs/RELIABILITY.md reports the full run of 20:
    TD_TEST_WORKER_KILLS=20 .venv/bin/python -m pytest tests/integration/test_reliability_kill_loop.py -s
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from engine.video import probe_mp4
from tests.integration.conftest import LiveStack, small_job, submit, wait_until
from tests.integration.faultkit import TERMINAL, all_jobs, assert_no_pickle
from tests.integration.redis_server import RELIABILITY_DB, flushed_db_url

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("TD_TEST_WORKER_KILLS", "4"))
# 17 frames at 160x96, 4 steps: 1-2 s of denoising, decoding and encoding on one thread, so kills land mid-job.
JOB = small_job(prompt="a job to kill", num_frames=17, steps=4)
# Stages to kill in, in turn (encode_mp4 is short: a kill aimed there may land in it or just after it).
TARGET_STAGES = ("denoise", "vae_decode", "encode_mp4")
OUTSTANDING = 4  # jobs kept queued or running while the loop kills


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(tmp_path_factory.mktemp("kill-loop"), flushed_db_url(RELIABILITY_DB), ["tiny-t2v"])
    try:
        live.start_api()
        yield live
    finally:
        live.stop()
        flushed_db_url(RELIABILITY_DB)


def busy_workers(client: httpx.Client) -> dict[str, str]:
    """worker name → the job it runs."""
    return {w["id"]: w["current_job"] for w in client.get("/readyz").json()["workers"] if w["current_job"]}


def test_worker_sigkill_loop_loses_no_job(stack: LiveStack, tmp_path: Path) -> None:
    names = (f"worker-{i}" for i in itertools.count())
    alive: list[str] = []
    for _ in range(2):
        alive.append(next(names))
        stack.start_worker("tiny-t2v", alive[-1], wait=False)
    submitted: list[str] = []
    kills: Counter[str] = Counter()  # job id → kills that landed while it was in progress
    kill_stages: Counter[str] = Counter()
    started = time.monotonic()
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for target in itertools.cycle(TARGET_STAGES):
            if sum(kills.values()) >= KILLS:
                break
            active = sum(1 for job in all_jobs(client) if job["status"] in ("queued", "in_progress"))
            for _ in range(OUTSTANDING - active):
                submitted.append(submit(client, JOB)["id"])
            victim = _wait_for_stage(client, stack, alive, target)
            if victim is None:
                continue
            name, job_id, attempt = victim
            stack.workers[name].send_signal(signal.SIGKILL)
            stack.workers[name].wait(timeout=10)
            alive.remove(name)
            alive.append(next(names))
            stack.start_worker("tiny-t2v", alive[-1], wait=False)
            after = client.get(f"/v1/jobs/{job_id}").json()  # a dead worker writes nothing more
            if after["status"] == "in_progress" and after["attempts"] == attempt:
                kills[job_id] += 1
                kill_stages[after["stage"]] += 1

        def all_ended() -> bool:
            return all(client.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL for job_id in submitted)

        wait_until(all_ended, timeout=180, what="every job to end", interval=0.5)
        outcomes: Counter[tuple[str, str | None]] = Counter()
        for job_id in submitted:
            job = client.get(f"/v1/jobs/{job_id}").json()
            outcomes[(job["status"], (job["error"] or {}).get("code"))] += 1
            expected = {
                0: ("completed", 1, None),
                1: ("completed", 2, None),
                2: ("failed", 2, "worker_lost"),
            }[kills[job_id]]
            got = (job["status"], job["attempts"], (job["error"] or {}).get("code"))
            assert got == expected, (job_id, kills[job_id], job)
            _assert_served_video_is_whole(client, job, tmp_path)
    _assert_no_stray_video(stack, submitted)
    assert sum(kills.values()) == KILLS
    checked = assert_no_pickle(Redis.from_url(stack.redis_url))
    print(
        f"\nkill loop: {KILLS} SIGKILLs mid-job across 2 live workers, {len(submitted)} jobs, "
        f"kills by stage {dict(kill_stages)}, outcomes {dict(outcomes)}, lost 0, "
        f"{checked} RQ fields checked for pickle, {time.monotonic() - started:.0f} s"
    )


def _wait_for_stage(
    client: httpx.Client, stack: LiveStack, alive: list[str], stage: str, timeout: float = 30
) -> tuple[str, str, int] | None:
    """(worker, job, attempt) of a live worker's job seen in `stage`; None if none got there in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, job_id in busy_workers(client).items():
            if name not in alive or stack.workers[name].poll() is not None:
                continue
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "in_progress" and job["stage"] == stage:
                return name, job_id, int(job["attempts"])
        time.sleep(0.02)
    return None


def _assert_served_video_is_whole(client: httpx.Client, job: dict[str, Any], tmp_path: Path) -> None:
    video = client.get(f"/v1/jobs/{job['id']}/video")
    if job["status"] != "completed":
        assert video.status_code == 409, job
        return
    assert video.status_code == 200
    assert video.headers["etag"] == f'"{hashlib.sha256(video.content).hexdigest()}"'
    path = tmp_path / f"{job['id']}.mp4"
    path.write_bytes(video.content)
    info = probe_mp4(path)
    assert (info["num_frames"], info["width"], info["height"]) == (17, 160, 96)


def _assert_no_stray_video(stack: LiveStack, submitted: list[str]) -> None:
    """A `video.mp4` exists only for completed jobs; partial encodes only ever lie under temporary names."""
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for job_id in submitted:
            final = stack.storage / job_id / "video.mp4"
            status = http.get(f"/v1/jobs/{job_id}").json()["status"]
            assert final.exists() == (status == "completed"), (job_id, status)
