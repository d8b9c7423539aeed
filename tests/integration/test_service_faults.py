"""Worker faults on the live stack: SIGKILL mid-job (retried once, then `worker_lost`), SIGTERM (finish or
requeue). The API's janitor notices a silent worker within TD_WORKER_LOST_AFTER_S (3 s here)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import LONG_JOB, LiveStack, small_job, submit, wait_job, wait_until
from tests.integration.redis_server import INTEGRATION_DB, flushed_db_url

pytestmark = pytest.mark.integration

# 81 frames at 160x96: a few seconds of VAE decoding, long enough to kill the worker in the middle.
MEDIUM_JOB = small_job(prompt="a job to interrupt", num_frames=81, steps=4)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """The API only; each test starts and kills its own workers."""
    live = LiveStack(tmp_path_factory.mktemp("faults"), flushed_db_url(INTEGRATION_DB), ["tiny-t2v"])
    try:
        live.start_api()
        yield live
    finally:
        live.stop()
        flushed_db_url(INTEGRATION_DB)


@pytest.fixture
def client(stack: LiveStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        yield http


def kill_during(stack: LiveStack, client: httpx.Client, job_id: str, worker: str, attempt: int) -> None:
    """SIGKILL `worker` while it runs attempt `attempt` of the job."""
    wait_until(
        lambda: _running_attempt(client, job_id) == attempt,
        timeout=30,
        what=f"attempt {attempt} of job {job_id} to run",
    )
    stack.workers[worker].send_signal(signal.SIGKILL)
    stack.workers[worker].wait(timeout=10)


def _running_attempt(client: httpx.Client, job_id: str) -> int | None:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return int(job["attempts"]) if job["status"] == "in_progress" else None


def test_killed_worker_job_is_retried_once_then_fails_worker_lost(
    client: httpx.Client, stack: LiveStack
) -> None:
    retried = submit(client, MEDIUM_JOB)
    stack.start_worker("tiny-t2v", "victim-1")
    kill_during(stack, client, retried["id"], "victim-1", attempt=1)
    # Noticed by the janitor, put back in the queue (never left in_progress), run again by a new worker.
    wait_job(client, retried["id"], ("queued",), timeout=20)
    stack.start_worker("tiny-t2v", "survivor")
    done = wait_job(client, retried["id"], ("completed", "failed"), timeout=60)
    assert done["status"] == "completed" and done["attempts"] == 2

    lost = submit(client, MEDIUM_JOB)
    kill_during(stack, client, lost["id"], "survivor", attempt=1)
    stack.start_worker("tiny-t2v", "victim-2")
    kill_during(stack, client, lost["id"], "victim-2", attempt=2)
    failed = wait_job(client, lost["id"], ("failed", "completed"), timeout=20)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert client.get(f"/v1/jobs/{lost['id']}/video").status_code == 409


def test_sigterm_finishes_the_job_within_grace_or_requeues_it(client: httpx.Client, stack: LiveStack) -> None:
    # Grace long enough: the running job completes, then the worker exits cleanly.
    patient = stack.start_worker("tiny-t2v", "patient", env={"TD_WORKER_STOP_GRACE_S": "120"})
    finished = submit(client, MEDIUM_JOB)
    wait_job(client, finished["id"], ("in_progress",), timeout=30)
    patient.send_signal(signal.SIGTERM)
    assert patient.wait(timeout=60) == 0
    assert client.get(f"/v1/jobs/{finished['id']}").json()["status"] == "completed"

    # No grace: the job stops at its next denoising step and goes back to the front of the queue.
    hasty = stack.start_worker("tiny-t2v", "hasty", env={"TD_WORKER_STOP_GRACE_S": "0"})
    requeued = submit(client, LONG_JOB)
    wait_job(client, requeued["id"], ("in_progress",), timeout=30)
    hasty.send_signal(signal.SIGTERM)
    assert hasty.wait(timeout=30) == 0
    job = client.get(f"/v1/jobs/{requeued['id']}").json()
    assert job["status"] == "queued" and job["attempts"] == 1 and job["queue_position"] == 0

    stack.start_worker("tiny-t2v", "next")
    assert wait_job(client, requeued["id"], ("in_progress",), timeout=30)["attempts"] == 2
    assert client.post(f"/v1/jobs/{requeued['id']}/cancel").json()["status"] == "canceled"
