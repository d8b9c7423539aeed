"""Engine and storage faults on the live stack (real Redis, API and worker processes, tiny-t2v on the CPU):
each fails its job with a clear code and the same worker process serves the next job.

The OOM and decode faults come from the worker's test hook (TD_FAULT_INJECTION, service/faults.py); storage
faults are real: a file where the job's folder should be, and a full tmpfs mounted over the results folder."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import LONG_JOB, LiveStack, small_job, submit, wait_job
from tests.integration.redis_server import RELIABILITY_DB, flushed_db_url

pytestmark = pytest.mark.integration

WORKER = "fault-worker"
TINY = {"num_frames": 5, "steps": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(
        tmp_path_factory.mktemp("faults"),
        flushed_db_url(RELIABILITY_DB),
        ["tiny-t2v"],
        TD_FAULT_INJECTION="true",
    )
    try:
        live.start_api()
        live.start_worker("tiny-t2v", WORKER)
        yield live
    finally:
        live.stop()
        flushed_db_url(RELIABILITY_DB)


@pytest.fixture
def client(stack: LiveStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http


def assert_worker_serves(stack: LiveStack, client: httpx.Client) -> None:
    """The original worker process is alive, READY, and completes a job."""
    assert stack.workers[WORKER].poll() is None, "the worker process exited"
    done = wait_job(client, submit(client, small_job(**TINY))["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    assert stack.wait_worker(WORKER, ("READY",))["current_job"] is None


def faulty(fault: str) -> dict[str, object]:
    return small_job(prompt=f"a job that hits {fault}", metadata={"tdserve_fault": fault}, **TINY)


def test_injected_oom_fails_the_job_and_the_worker_serves_the_next(
    stack: LiveStack, client: httpx.Client
) -> None:
    # OOM, OOM, success, OOM, OOM: the worker gives up only after 3 OOMs in a row (TD_WORKER_MAX_CONSECUTIVE_OOMS),
    # so surviving this sequence also shows that a success resets the count.
    for expect_oom in (True, True, False, True, True):
        job = submit(client, faulty("out_of_memory") if expect_oom else small_job(**TINY))
        done = wait_job(client, job["id"], ("completed", "failed", "canceled"))
        if expect_oom:
            assert done["status"] == "failed" and done["error"]["code"] == "out_of_memory", done
            assert "out of memory" in done["error"]["message"] and done["attempts"] == 1
            assert client.get(f"/v1/jobs/{job['id']}/video").status_code == 409
        else:
            assert done["status"] == "completed", done
    assert_worker_serves(stack, client)


def test_decode_exception_fails_with_internal_error_and_a_log_line_naming_the_job(
    stack: LiveStack, client: httpx.Client
) -> None:
    job = submit(client, faulty("decode_error"))
    done = wait_job(client, job["id"], ("completed", "failed"))
    assert done["status"] == "failed" and done["error"]["code"] == "internal_error", done
    assert "InjectedFault: injected decode_error in vae_decode" in done["error"]["message"]
    log = (stack.root / f"{WORKER}.log").read_text()
    line = next(line for line in log.splitlines() if f"job {job['id']} failed in worker {WORKER}" in line)
    assert "ERROR" in line
    assert log.index("Traceback", log.index(line)) > 0  # the traceback follows the line
    assert_worker_serves(stack, client)


def test_deadlines_expire_queued_jobs_and_fail_running_ones(stack: LiveStack, client: httpx.Client) -> None:
    # LONG_JOB denoises for ~2 s (4 steps of ~0.5 s on one thread), then decodes for ~40 s: a deadline of 1 s
    # lands mid-denoise, and the worker must stop at the next step instead of decoding.
    running = submit(client, {**LONG_JOB, "deadline_seconds": 1.0})
    queued = submit(client, small_job(prompt="waits behind the long job", deadline_seconds=0.5, **TINY))
    expired = wait_job(client, queued["id"], ("expired", "completed", "failed"), timeout=20)
    assert expired["status"] == "expired" and expired["error"]["code"] == "expired_in_queue", expired
    assert expired["attempts"] == 0 and expired["started_at"] is None
    assert client.get(f"/v1/videos/{queued['id']}").json()["status"] == "failed"  # OpenAI's vocabulary

    failed = wait_job(client, running["id"], ("completed", "failed", "expired"), timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "deadline_exceeded", failed
    assert failed["stage"] == "denoise"  # stopped before the VAE
    # Ended within a step or two of its deadline (not after the 40 s decode), and the worker is free again.
    assert failed["timings"]["total"] < 1.0 + 5.0, failed["timings"]
    assert_worker_serves(stack, client)


def test_unwritable_storage_fails_with_storage_error_and_the_worker_stays_healthy(
    stack: LiveStack, client: httpx.Client
) -> None:
    blocker = submit(client, small_job(prompt="keeps the worker busy", num_frames=33, steps=1))
    victim = submit(client, small_job(prompt="cannot be written", **TINY))
    in_the_way = stack.storage / victim["id"]  # a file where the job's folder must be created
    in_the_way.write_bytes(b"not a directory")
    try:
        done = wait_job(client, victim["id"], ("completed", "failed"))
        assert done["status"] == "failed" and done["error"]["code"] == "storage_error", done
        assert "could not be written" in done["error"]["message"]
        assert wait_job(client, blocker["id"], ("completed", "failed"))["status"] == "completed"
    finally:
        in_the_way.unlink()
    assert_worker_serves(stack, client)


def test_full_storage_fails_with_storage_error_and_recovers(stack: LiveStack, client: httpx.Client) -> None:
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(stack.storage)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        filler = stack.storage / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill it to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        job = submit(client, small_job(prompt="no space left", **TINY))
        done = wait_job(client, job["id"], ("completed", "failed"))
        assert done["status"] == "failed" and done["error"]["code"] == "storage_error", done
        assert stack.workers[WORKER].poll() is None
        leftovers = [p.name for p in stack.storage.rglob("*") if p.is_file() and p.name != "filler"]
        assert not any(name.endswith(".mp4") for name in leftovers), leftovers  # no partial MP4 kept
    finally:
        for _ in range(50):  # a job folder being swept may hold it for a moment
            if (
                subprocess.run(["umount", str(stack.storage)], check=False, capture_output=True).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(stack.storage)], check=True)
    assert Path(stack.storage).is_dir()
    assert_worker_serves(stack, client)
