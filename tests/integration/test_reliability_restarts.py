"""Restarts on the live stack, with a redis-server of the test's own (appendonly, fsync always, a password):

- Redis restart with a job running and jobs queued: the API answers 503 + Retry-After while Redis is down
  (liveness stays 200), recovers without a restart, the same worker process reconnects, every job completes.
- API restart while a client keeps submitting (retrying with its Idempotency-Key on connection errors and
  503): every request maps to exactly one job, and every job completes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import LiveStack, small_job, submit, wait_job, wait_until
from tests.integration.faultkit import TERMINAL, OwnRedis, all_jobs

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "redis-password-never-logged"
WORKER = "restart-worker"
TINY = small_job(prompt="a job across restarts", num_frames=5, steps=1)
# Running while Redis goes away: Redis is stopped when its VAE decode starts (the MP4 is encoded alongside), so
# its result is ready while Redis is down. A short clip keeps that under the worker-lost timeout (10 s here) on a
# busy 2-core machine: the downtime must test reconnection, not lose the job.
RUNNING = small_job(prompt="running across a Redis restart", num_frames=17, steps=4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path_factory.mktemp("redis-data"), password=REDIS_PASSWORD)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: OwnRedis) -> Iterator[LiveStack]:
    # Lost after 10 s (heartbeat 0.5 s): a restart of a few seconds must not count as a lost worker.
    live = LiveStack(
        tmp_path_factory.mktemp("restarts"), redis_server.url, ["tiny-t2v"], TD_WORKER_LOST_AFTER_S="10"
    )
    try:
        live.start_api()
        live.start_worker("tiny-t2v", WORKER)
        yield live
    finally:
        live.stop()
        for log in live.root.glob("*.log"):
            assert REDIS_PASSWORD not in log.read_text(), f"the Redis password reached {log.name}"


def test_redis_restart_keeps_queued_jobs_and_the_api_recovers(
    stack: LiveStack, redis_server: OwnRedis
) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        running = submit(client, RUNNING)
        queued = [submit(client, {**TINY, "seed": i}) for i in range(4)]
        # Redis goes away while the running job decodes (and encodes) its video, so its result is ready while
        # Redis is down.
        wait_until(
            lambda: client.get(f"/v1/jobs/{running['id']}").json()["stage"] in ("vae_decode", "encode_mp4"),
            timeout=60,
            what="the running job to decode",
            interval=0.01,
        )
        redis_server.stop()
        down_since = time.monotonic()
        status = client.get(f"/v1/jobs/{queued[0]['id']}")
        assert status.status_code == 503 and status.json()["error"]["code"] == "unavailable"
        assert int(status.headers["retry-after"]) > 0
        created = client.post("/v1/generate", json=TINY)
        assert created.status_code == 503 and int(created.headers["retry-after"]) > 0
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False and "retry-after" in ready.headers
        assert client.get("/healthz").status_code == 200  # alive: the orchestrator must not restart it
        # At least 3 s without Redis, and until the running job has its result and finds Redis gone.
        worker_log = stack.root / f"{WORKER}.log"
        retrying = f"Redis unavailable for job {running['id']}'s result; retrying"
        wait_until(lambda: retrying in worker_log.read_text(), timeout=60, what="the worker to wait for Redis")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down_since)))
        redis_server.start()

        def answers() -> bool:
            return client.get(f"/v1/jobs/{queued[0]['id']}").status_code == 200

        wait_until(answers, timeout=15, what="the API to answer again without a restart")
        # The queued jobs survived the restart (appendonly) and run on the same worker process.
        for job in queued:
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] in (
                "queued",
                "in_progress",
                "completed",
            )
        for job in (running, *queued):
            done = wait_job(client, job["id"], ("completed", "failed", "canceled"), timeout=90)
            assert done["status"] == "completed" and done["attempts"] == 1, done
        # The running job's result waited for Redis instead of failing the job (its retry line was awaited above).
        assert stack.workers[WORKER].poll() is None, "the worker died instead of reconnecting"
        after = wait_job(client, submit(client, TINY)["id"], ("completed", "failed"))
        assert after["status"] == "completed"
        assert stack.wait_worker(WORKER, ("READY",))["state"] == "READY"


def test_api_restart_while_clients_submit_loses_and_duplicates_nothing(stack: LiveStack) -> None:
    requests = [str(uuid.uuid4()) for _ in range(24)]
    accepted: dict[str, str] = {}  # Idempotency-Key → job id
    retries = {"connection": 0, "unavailable": 0}
    done_submitting = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            for index, key in enumerate(requests):
                while True:  # what a careful client does: retry the same request with the same key
                    try:
                        response = client.post(
                            "/v1/generate", json={**TINY, "seed": index}, headers={"Idempotency-Key": key}
                        )
                    except httpx.TransportError:
                        retries["connection"] += 1
                        time.sleep(0.1)
                        continue
                    if response.status_code == 503:
                        retries["unavailable"] += 1
                        time.sleep(0.1)
                        continue
                    assert response.status_code == 202, response.text
                    if key in accepted:  # an earlier attempt's answer was lost: the replay names the same job
                        assert accepted[key] == response.json()["id"]
                    accepted[key] = response.json()["id"]
                    break
                time.sleep(0.05)
        done_submitting.set()

    thread = threading.Thread(target=client_loop)
    thread.start()
    wait_until(lambda: len(accepted) >= 6, timeout=30, what="the first submissions")
    stack.stop_api()
    time.sleep(0.5)  # clients meet a closed port meanwhile
    stack.start_api()
    thread.join(timeout=120)
    assert done_submitting.is_set() and len(accepted) == len(requests)
    assert retries["connection"] > 0, "the restart did not interrupt the client; the test proved nothing"

    with httpx.Client(base_url=stack.url, timeout=30) as client:
        ids = set(accepted.values())
        assert len(ids) == len(requests)  # one job per request: no duplicate from a retry
        listed = [job for job in all_jobs(client) if job["prompt"] == TINY["prompt"] and job["id"] in ids]
        assert len(listed) == len(requests)
        for job_id in ids:
            assert wait_job(client, job_id, TERMINAL, timeout=90)["status"] == "completed"
