"""The worker's job execution in-process: the real tiny-t2v pipeline, real Redis (DB 14), no RQ loop.

Faults (CUDA OOM, an engine exception) are injected by replacing the real pipeline's `generate` for a call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rq.job import Job
from rq.serializers import JSONSerializer

from engine.pipeline import Pipeline
from engine.video import probe_mp4
from service.queue import Jobs, Submission, submission_from_generate
from service.schemas import GenerateRequest, JobStatus, WorkerPublic
from service.settings import Settings
from service.worker import WorkerRuntime
from tests.integration.redis_server import UNIT_DB, flushed_db_url


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load("tiny-t2v", device="cpu")


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        _env_file=None,
        redis_url=flushed_db_url(UNIT_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path / "results",
        models=["tiny-t2v"],
        worker_max_consecutive_ooms=2,
    )
    flushed_db_url(UNIT_DB)


@pytest.fixture
def jobs(settings: Settings) -> Jobs:
    return Jobs.from_settings(settings)


@pytest.fixture
def runtime(settings: Settings, jobs: Jobs, pipeline: Pipeline) -> WorkerRuntime:
    worker = WorkerRuntime(settings, jobs, "tiny-t2v", name="unit-worker")
    worker.pipeline = pipeline
    worker.state = "READY"
    return worker


def submission(settings: Settings, **fields: Any) -> Submission:
    body = {"model": "tiny-t2v", "prompt": "a red fox", "num_frames": 5, "steps": 4, "seed": 1, **fields}
    return submission_from_generate(settings, GenerateRequest(**body), None)


def submit(jobs: Jobs, settings: Settings, **fields: Any) -> str:
    record, _, _ = jobs.submit(submission(settings, **fields))
    return record.id


def execute(runtime: WorkerRuntime, job_id: str) -> str:
    """What an RQ worker does with the job: pop it from its queue, then call the job function."""
    rq_job_id = runtime.jobs.get(job_id).rq_job_id
    runtime.jobs.queue("tiny-t2v").remove(rq_job_id)
    outcome = runtime.execute(job_id, rq_job_id)
    status: str = outcome["status"]
    return status


def record_progress(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, hook: Callable[[str, int], None] | None = None
) -> list[tuple[str, int, int]]:
    """Record (stage, step, progress stored in Redis) after every progress write; `hook(stage, step)` runs
    after the write, as a client acting at that moment would."""
    written: list[tuple[str, int, int]] = []
    report = jobs.report_progress

    def recording(record: Any, stage: Any, step: int, total: int) -> bool:
        applied = report(record, stage, step, total)
        stored = jobs.find(record.id)
        written.append((stage, step, -1 if stored is None else stored.progress))
        if hook is not None:
            hook(stage, step)
        return applied

    monkeypatch.setattr(jobs, "report_progress", recording)
    return written


def test_worker_writes_progress_at_every_denoising_step(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = record_progress(jobs, monkeypatch)
    job_id = submit(jobs, settings)
    assert execute(runtime, job_id) == "completed"
    assert [stage for stage, _, _ in written] == [
        "text_encode",
        "denoise",
        "denoise",
        "denoise",
        "denoise",
        "denoise",
        "vae_decode",
        "encode_mp4",
    ]
    # Denoising fills 5 → 85 % in four equal steps; every stored value is above the previous one.
    assert [progress for _, _, progress in written] == [0, 5, 25, 45, 65, 85, 85, 95]
    record = jobs.get(job_id)
    assert record.status == JobStatus.completed and record.progress == 100 and record.attempts == 1
    assert set(record.timings) == {"queue", "text_encode", "denoise", "vae_decode", "encode_mp4", "total"}
    info = probe_mp4(jobs.storage.video_path(job_id))
    assert (info["num_frames"], info["width"], info["height"]) == (5, 160, 96)
    assert runtime.state == "READY" and runtime.current_job is None
    assert jobs.model_stats("tiny-t2v").run_s is not None


def test_worker_stops_at_the_next_step_when_canceled(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(jobs, settings)

    def cancel_after_first_step(stage: str, step: int) -> None:
        if stage == "denoise" and step == 1:
            jobs.cancel(job_id)

    written = record_progress(jobs, monkeypatch, cancel_after_first_step)
    assert execute(runtime, job_id) == "canceled"
    assert [(stage, step) for stage, step, _ in written] == [
        ("text_encode", 0),
        ("denoise", 0),
        ("denoise", 1),
    ]
    record = jobs.get(job_id)
    assert record.status == JobStatus.canceled and record.stage == "denoise"
    assert not jobs.storage.video_path(job_id).exists()


def test_worker_fails_a_job_whose_deadline_passes_while_running(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit(jobs, settings, deadline_seconds=0.5)
    deadline = jobs.get(job_id).deadline_at
    assert deadline is not None

    def outlive_the_deadline(stage: str, step: int) -> None:
        if stage == "denoise" and step == 1:
            time.sleep(max(0.0, deadline - time.time()) + 0.05)

    written = record_progress(jobs, monkeypatch, outlive_the_deadline)
    assert execute(runtime, job_id) == "failed"
    record = jobs.get(job_id)
    assert record.status == JobStatus.failed and record.error_code == "deadline_exceeded"
    assert "vae_decode" not in [stage for stage, _, _ in written]


def test_worker_skips_jobs_that_expired_or_were_canceled_in_the_queue(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings
) -> None:
    expired = submit(jobs, settings, deadline_seconds=0.05)
    time.sleep(0.1)
    assert execute(runtime, expired) == "skipped"
    record = jobs.get(expired)
    assert (
        record.status == JobStatus.expired
        and record.error_code == "expired_in_queue"
        and record.attempts == 0
    )
    canceled = submit(jobs, settings)
    jobs.cancel(canceled)
    assert execute(runtime, canceled) == "skipped" and jobs.get(canceled).attempts == 0


def test_out_of_memory_fails_the_job_and_the_worker_goes_on(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*_args: Any, **_kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(runtime.pipeline, "generate", out_of_memory)
    first = submit(jobs, settings)
    assert execute(runtime, first) == "failed"
    record = jobs.get(first)
    assert record.status == JobStatus.failed and record.error_code == "out_of_memory"
    assert runtime.state == "READY" and runtime.consecutive_ooms == 1

    monkeypatch.undo()
    assert execute(runtime, submit(jobs, settings)) == "completed" and runtime.consecutive_ooms == 0

    # worker_max_consecutive_ooms (2 here) in a row: the worker declares itself UNHEALTHY.
    monkeypatch.setattr(runtime.pipeline, "generate", out_of_memory)
    for _ in range(2):
        assert execute(runtime, submit(jobs, settings)) == "failed"
    assert runtime.state == "UNHEALTHY"
    assert [w.state for w in jobs.workers() if w.id == "unit-worker"] == ["UNHEALTHY"]


def test_engine_errors_fail_the_job_with_a_log_line_naming_it(
    runtime: WorkerRuntime,
    jobs: Jobs,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(runtime.pipeline, "generate", broken)
    job_id = submit(jobs, settings)
    with caplog.at_level(logging.ERROR, logger="tdserve.worker"):
        assert execute(runtime, job_id) == "failed"
    record = jobs.get(job_id)
    assert record.error_code == "internal_error" and "decoder exploded" in (record.error_message or "")
    assert any(job_id in message for message in caplog.messages)


def test_warm_stop_past_its_grace_requeues_the_job_at_the_front(
    runtime: WorkerRuntime, jobs: Jobs, settings: Settings
) -> None:
    running = submit(jobs, settings)
    waiting = submit(jobs, settings)
    runtime.stop_deadline = time.monotonic() - 1  # SIGTERM came and the grace is over
    assert execute(runtime, running) == "requeued"
    record = jobs.get(running)
    assert record.status == JobStatus.queued and record.attempts == 1 and record.rq_job_id == f"{running}-2"
    assert jobs.queue_view(record).position == 0 and jobs.queue_view(jobs.get(waiting)).position == 1
    runtime.stop_deadline = None
    assert execute(runtime, running) == "completed" and jobs.get(running).attempts == 2


def test_a_lost_run_is_retried_once_then_fails_worker_lost(jobs: Jobs, settings: Settings) -> None:
    job_id = submit(jobs, settings)
    rq_job = Job.fetch(jobs.get(job_id).rq_job_id, connection=jobs.rq_redis, serializer=JSONSerializer)
    assert rq_job.retries_left == 1
    assert jobs.claim(job_id, rq_job.id, "dead-worker") is not None
    jobs.handle_lost_run(rq_job)  # RQ's retry is left: back to the queue
    assert jobs.get(job_id).status == JobStatus.queued
    with jobs.rq_redis.pipeline() as pipe:
        rq_job.retry(jobs.queue("tiny-t2v"), pipe)  # what RQ does next, using up the retry
        pipe.execute()
    assert jobs.claim(job_id, rq_job.id, "dead-again") is not None
    jobs.handle_lost_run(Job.fetch(rq_job.id, connection=jobs.rq_redis, serializer=JSONSerializer))
    record = jobs.get(job_id)
    assert record.status == JobStatus.failed and record.error_code == "worker_lost" and record.attempts == 2


def test_eta_follows_the_models_measured_speed(jobs: Jobs, settings: Settings) -> None:
    jobs.record_run_time("tiny-t2v", 2.0, pixel_frames=5 * 160 * 96)  # 2 s for a 5-frame 160x96 job
    job_id = submit(jobs, settings, num_frames=9)
    record = jobs.get(job_id)
    view = jobs.queue_view(record)
    assert view.position == 0 and view.stats.run_s == pytest.approx(2.0)
    assert jobs.eta_s(record, view) is None  # no worker serves the model yet
    jobs.publish_worker(WorkerPublic(id="w", model="tiny-t2v", state="READY", device="cpu", current_job=None,
                                     last_heartbeat=None, metrics_url=None), ttl_s=60)
    # Its own run (9/5 of the measured job) plus half an average run for the job the worker holds now.
    assert jobs.eta_s(record, view) == pytest.approx(2.0 * 9 / 5 + 2.0 * 0.5)
    assert jobs.eta_s(record, replace(view, position=2)) == pytest.approx(2.0 * 9 / 5 + 2.0 * 2.5)
    running = jobs.claim(job_id, record.rq_job_id, "w")
    assert running is not None
    eta = jobs.eta_s(running, jobs.queue_view(running))
    assert eta is not None and 3.0 < eta <= 2.0 * 9 / 5
