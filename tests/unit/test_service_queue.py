"""The submission script (service/queue.py `_SUBMIT`): quota, queue-depth admission, our record and the RQ job
in one atomic step, against a real Redis."""

from __future__ import annotations

import io
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rq import Callback, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from service.queue import (
    FAILURE_CALLBACK,
    JOB_FUNCTION,
    Jobs,
    QueueFull,
    QuotaExceeded,
    Submission,
    active_jobs,
    submission_from_generate,
)
from service.schemas import GenerateRequest, JobStatus
from service.settings import Settings
from tests.integration.redis_server import UNIT_DB, flushed_db_url


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        _env_file=None,
        redis_url=flushed_db_url(UNIT_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path / "results",
        models=["tiny-t2v", "tiny-i2v"],
    )
    flushed_db_url(UNIT_DB)


def submission(settings: Settings, **fields: Any) -> Submission:
    body = {"model": "tiny-t2v", "prompt": "a red fox", "num_frames": 5, "steps": 1, **fields}
    return submission_from_generate(settings, GenerateRequest(**body), None)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_queue_depth_admission_is_exact_under_concurrent_submissions(settings: Settings) -> None:
    jobs = Jobs.from_settings(settings.model_copy(update={"queue_max_depth": 7}))
    accepted: list[tuple[str, int | None]] = []
    refused: list[QueueFull] = []
    lock = threading.Lock()

    def submit_one() -> None:
        try:
            record, _, view = jobs.submit(submission(settings))
            with lock:
                accepted.append((record.id, view.position))
        except QueueFull as e:
            with lock:
                refused.append(e)

    threads = [threading.Thread(target=submit_one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 7 and len(refused) == 17
    assert jobs.queue("tiny-t2v").count == 7
    assert all(e.retry_after_s == 30 for e in refused)  # no measured run time yet: the default
    # The position the submission reports is the one a poll reads afterwards, and each is taken once.
    assert sorted(position for _, position in accepted) == list(range(7))
    for job_id, position in accepted:
        assert jobs.queue_view(jobs.get(job_id)).position == position


def test_the_rq_job_is_the_one_rqs_enqueue_writes(settings: Settings) -> None:
    jobs = Jobs.from_settings(settings)
    record, replayed, _ = jobs.submit(submission(settings, deadline_seconds=60))
    assert not replayed and record.status == JobStatus.queued
    queue = jobs.queue("tiny-t2v")
    queue.enqueue_call(  # what Jobs wrote through RQ before the script: the reference
        JOB_FUNCTION,
        args=[record.id],
        job_id="reference",
        timeout=record.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.result_ttl_s,
        retry=Retry(max=1),
        on_failure=Callback(FAILURE_CALLBACK),
        description=f"tiny-t2v job {record.id}",
    )
    ours = jobs.rq_redis.hgetall(f"rq:job:{record.rq_job_id}")
    reference = jobs.rq_redis.hgetall("rq:job:reference")
    stamps = {b"created_at", b"enqueued_at"}
    assert ours.keys() == reference.keys() and stamps <= ours.keys()
    assert {k: v for k, v in ours.items() if k not in stamps} == {
        k: v for k, v in reference.items() if k not in stamps
    }
    assert zlib.decompress(ours[b"data"]) == zlib.decompress(reference[b"data"])
    assert queue.job_ids == [record.rq_job_id, "reference"]
    assert jobs.rq_redis.smembers("rq:queues") == {queue.key.encode()}
    rq_job = Job.fetch(record.rq_job_id, connection=jobs.rq_redis, serializer=JSONSerializer)
    assert (rq_job.func_name, rq_job.args, rq_job.retries_left) == (JOB_FUNCTION, [record.id], 1)
    assert rq_job.get_status() == "queued" and rq_job.enqueued_at is not None
    # Our record and indexes went in with it.
    assert jobs.get(record.id) == record
    assert jobs.redis.zscore("td:jobs", record.id) == pytest.approx(record.created_at)
    assert jobs.redis.zscore("td:deadlines", record.id) == pytest.approx(record.created_at + 60)


def test_ended_jobs_leave_the_quota_and_a_lost_removal_is_pruned_before_refusing(settings: Settings) -> None:
    jobs = Jobs.from_settings(settings)
    first, _, _ = jobs.submit(submission(settings), scope="key-a", max_active=2)
    jobs.submit(submission(settings), scope="key-a", max_active=2)
    with pytest.raises(QuotaExceeded):
        jobs.submit(submission(settings), scope="key-a", max_active=2)
    jobs.submit(submission(settings), scope="key-b", max_active=2)  # another key's slots are its own
    jobs.cancel(first.id)
    assert jobs.redis.zcard(active_jobs("key-a")) == 1  # the end removed it: no scan needed
    third, _, _ = jobs.submit(submission(settings), scope="key-a", max_active=2)
    # A process that died between a job's end and the removal leaves the id behind: the count reads 3,
    # but the script drops ended jobs before it refuses.
    jobs.cancel(third.id)
    jobs.redis.zadd(active_jobs("key-a"), {third.id: third.created_at})
    assert jobs.redis.zcard(active_jobs("key-a")) == 2
    jobs.submit(submission(settings), scope="key-a", max_active=2)
    assert third.id not in jobs.redis.zrange(active_jobs("key-a"), 0, -1)
    with pytest.raises(QuotaExceeded):
        jobs.submit(submission(settings), scope="key-a", max_active=2)
    # Deleting a job frees its slot as well.
    active: list[str] = jobs.redis.zrange(active_jobs("key-a"), 0, -1)  # type: ignore[assignment]
    jobs.delete(active[0])
    jobs.submit(submission(settings), scope="key-a", max_active=2)


def test_a_refused_submission_keeps_neither_its_image_nor_its_idempotency_key(settings: Settings) -> None:
    jobs = Jobs.from_settings(settings.model_copy(update={"queue_max_depth": 1}))
    image = submission_from_generate(
        settings, GenerateRequest(model="tiny-i2v", prompt="a red fox", num_frames=5, steps=1), png()
    )
    kept, _, _ = jobs.submit(image)
    with pytest.raises(QueueFull):
        jobs.submit(image, idempotency_key="retry-me")
    assert jobs.storage.job_ids() == [kept.id]
    assert jobs.redis.keys("td:idem:*") == []
