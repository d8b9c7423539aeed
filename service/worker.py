"""Resident-engine worker: one process per GPU, the pipeline loaded once, jobs run in this process.

Why in-process (RQ's `SimpleWorker`): RQ's default worker forks a child per job, and CUDA cannot be
re-initialised in a forked child; a spawned child would reload the models for every job. So the pipeline lives
in the worker's main thread and `run_job` (the RQ job function) reaches it through the module-level runtime.

Life of a worker (states published to Redis under `td:worker:<name>`, TTL `worker_lost_after_s`):
    STARTING      load the pipeline, one warm-up generation (compile/allocation costs paid here)
    READY ⇄ BUSY  registered with RQ only now, so no job waits on a cold engine
    SETUP_FAILED  the pipeline could not load (exit 1)
    UNHEALTHY     `worker_max_consecutive_ooms` CUDA OOMs in a row (exit 3; the supervisor restarts it)

A heartbeat thread refreshes that key and, while a job runs, RQ's started-job registry entry with a TTL of
`worker_lost_after_s` (RQ's SimpleWorker would otherwise give `job_timeout + 60 s` and send no heartbeat while
busy), so a SIGKILLed worker's job is noticed within seconds and retried once, then failed `worker_lost`.

Signals: the first SIGTERM/SIGINT is RQ's warm stop; the running job may go on for `worker_stop_grace_s`, then
it is stopped at its next step and put back at the front of its queue. A second signal is RQ's cold stop:
the job function is interrupted and RQ's retry requeues it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from PIL import Image
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from service import faults, metrics
from service.limits import set_pillow_limit
from service.queue import JobRecord, Jobs
from service.schemas import ErrorCode, WorkerPublic, WorkerState
from service.settings import Settings

log = logging.getLogger("tdserve.worker")

EXIT_SETUP_FAILED = 1
EXIT_UNHEALTHY = 3


class WorkerRuntime:
    """The process-wide state of one worker: its pipeline, its health, the job it runs."""

    def __init__(self, settings: Settings, jobs: Jobs, model: str, name: str | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.model = model
        self.name = name or f"{model}.{socket.gethostname()}.{os.getpid()}"
        self.state: WorkerState = "STARTING"
        self.device: str | None = settings.device
        self.pipeline: Any = None  # engine.pipeline.Pipeline once loaded
        self.rq_worker: GPUWorker | None = None
        self.rq_job: Job | None = None
        self.current_job: str | None = None
        self.stop_deadline: float | None = None  # monotonic time after which the running job is requeued
        self.consecutive_ooms = 0
        self.metrics_url: str | None = None  # where this worker's /metrics answers (service/metrics.py)
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # --- health ---

    def publish(self) -> None:
        self.jobs.publish_worker(
            WorkerPublic(
                id=self.name,
                model=self.model,
                state=self.state,
                device=self.device,
                current_job=self.current_job,
                last_heartbeat=datetime.now(UTC),
                metrics_url=self.metrics_url,
            ),
            ttl_s=self.settings.worker_lost_after_s,
        )

    def set_state(self, state: WorkerState) -> None:
        self.state = state
        self.publish()

    def start_heartbeat(self) -> None:
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self.settings.worker_heartbeat_s):
            try:
                self.publish()
                worker, job = self.rq_worker, self.rq_job
                if worker is not None and job is not None:
                    execution = next(iter(list(worker.executions.values())), None)
                    if execution is not None:
                        worker.maintain_heartbeats(job, execution)
            except Exception:  # Redis away: keep beating, the next beat may get through
                log.warning("worker %s: heartbeat failed", self.name, exc_info=True)

    def request_stop(self) -> None:
        """Warm stop: let the running job go on for `worker_stop_grace_s`, then requeue it."""
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.settings.worker_stop_grace_s

    # --- jobs ---

    def execute(self, job_id: str, rq_job_id: str) -> dict[str, Any]:
        """Run one job end to end; every outcome is written to the job record (never raised to RQ)."""
        record = self.jobs.claim(job_id, rq_job_id, self.name)
        if record is None:
            return {"job_id": job_id, "status": "skipped"}
        self.current_job = record.id
        self.set_state("BUSY")
        stats = metrics.JobRunStats(
            model=record.model,
            mode=record.mode,
            # claim() stored submission → this start; only the first start ends a queue wait.
            queue_wait_s=record.timings.get("queue") if record.attempts == 1 else None,
        )
        metrics.record_job_started(stats)
        metrics.reset_gpu_peak(self.device)
        try:
            status = self._run(record, stats)
        finally:
            stats.gpu_peak_bytes = metrics.gpu_peak_bytes(self.device)
            metrics.record_job_run(stats)
            self.current_job = None
            if self.state == "BUSY":
                self.set_state("READY")
        return {"job_id": job_id, "status": status}

    def _run(self, record: JobRecord, stats: metrics.JobRunStats) -> str:
        import torch

        from engine.pipeline import GenerationCanceled, GenerationRequest

        jobs = self.jobs
        stop_reason: list[str] = []

        # A Redis hiccup must not kill a running generation: skip that step's write or check.
        def on_progress(stage: str, step: int, total: int) -> None:
            faults.check(self.settings, record, stage)  # tests only (TD_FAULT_INJECTION)
            try:
                jobs.report_progress(record, stage, step, total)  # type: ignore[arg-type]
            except RedisError:
                log.warning("job %s: progress not written (Redis unavailable)", record.id)

        def should_cancel() -> bool:
            try:
                reason: str | None = jobs.stop_reason(record)
            except RedisError:
                reason = None
            if reason is None and self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                reason = "shutdown"
            if reason is not None:
                stop_reason.append(reason)
            return reason is not None

        failure: tuple[ErrorCode, str] | None = None
        out_of_memory = False
        try:
            params = record.params
            image = None
            if record.image_file is not None:
                with Image.open(self.jobs.storage.image_path(record.id, record.image_file)) as file:
                    image = file.convert("RGB")
            request = GenerationRequest(
                prompt=record.prompt,
                image=image,
                width=params["width"],
                height=params["height"],
                size=params["size"],
                aspect_ratio=params["aspect_ratio"],
                num_frames=params["num_frames"],
                steps=params["steps"],
                seed=params["seed"],
                sigma_max=params["sigma_max"],
                ode=params["ode"],
                attention=params["attention"],
                topk=params["topk"],
            )
            try:
                request = self.pipeline.validate(request)
            except ValueError as e:
                failure = ("invalid_request", str(e))
                raise
            resolved = {**params, "width": request.width, "height": request.height}
            if resolved != params:
                jobs.set_params(record, resolved)
            # A full or unwritable disk surfaces as OSError or, when ffmpeg is the one that hits it, as
            # write_mp4's RuntimeError: either way only storing the video failed.
            storage_failure = "the video could not be written: {}: {}"
            try:
                stream = jobs.storage.video_stream(record.id, record.fps)
            except OSError as e:
                failure = ("storage_error", storage_failure.format(type(e).__name__, e))
                raise
            with stream:  # encodes each chunk as the VAE decodes it; any exception below aborts it (no file)
                result = self.pipeline.generate(request, on_progress=on_progress, should_cancel=should_cancel,
                                                on_frames=stream.put)
                on_progress("encode_mp4", 0, 1)
                start = time.perf_counter()  # what is left of the encode once the last frame is decoded
                try:
                    video = jobs.storage.finish_video(record.id, stream)
                except Exception as e:
                    failure = ("storage_error", storage_failure.format(type(e).__name__, e))
                    raise
            timings = {**result.timings, "encode_mp4": time.perf_counter() - start}
            if not self._persist(lambda: jobs.complete(record, video, timings, resolved)):
                video.path.unlink(missing_ok=True)  # canceled or deleted meanwhile
                return "canceled"
            stats.latency_s = time.time() - record.created_at  # both wall clocks: created_at is the API's
            stats.stages_s, stats.steps = timings, result.steps
            self.consecutive_ooms = 0
            return "completed"
        except GenerationCanceled:
            reason = stop_reason[-1] if stop_reason else "canceled"
            if reason == "deadline":
                message = "deadline_seconds passed while the job was running"
                self._persist(lambda: jobs.fail(record, "deadline_exceeded", message))
                return "failed"
            if reason == "shutdown" and jobs.requeue(record):
                return "requeued"
            return "canceled"
        except torch.OutOfMemoryError:
            out_of_memory = True
            failure = ("out_of_memory", "CUDA ran out of memory; try fewer frames or a smaller size")
        except JobTimeoutException:
            failure = ("timeout", f"the job ran past its {record.job_timeout_s} s limit")
        except Exception as e:
            if failure is None:
                log.exception("job %s failed in worker %s", record.id, self.name)
                failure = ("internal_error", f"{type(e).__name__}: {e}")
        finally:
            if failure is not None:
                code, message = failure
                self._persist(lambda: jobs.fail(record, code, message))
        # Outside the except block: the traceback (and the tensors it holds) is gone before freeing the cache.
        if out_of_memory:
            self._after_out_of_memory()
        return "failed"

    def _persist(self, write: Callable[[], bool]) -> bool:
        """A job's final write, retried while Redis is away (a restart) for up to `worker_lost_after_s`: past
        that the janitor takes the run for lost and retries the job, so giving up then loses nothing."""
        deadline = time.monotonic() + self.settings.worker_lost_after_s
        while True:
            try:
                return write()
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "worker %s: Redis unavailable for job %s's result; retrying", self.name, self.current_job
                )
                time.sleep(0.5)

    def _after_out_of_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.consecutive_ooms += 1
        if self.consecutive_ooms >= self.settings.worker_max_consecutive_ooms:
            log.error(
                "worker %s: %d CUDA OOMs in a row; marking UNHEALTHY and stopping",
                self.name,
                self.consecutive_ooms,
            )
            self.set_state("UNHEALTHY")
            if self.rq_worker is not None:
                self.rq_worker.request_stop(signal.SIGTERM, None)  # type: ignore[no-untyped-call]


_runtime: WorkerRuntime | None = None


def run_job(job_id: str) -> dict[str, Any]:
    """The RQ job function (enqueued by name from service.queue): runs in the worker that holds the engine."""
    if _runtime is None or _runtime.pipeline is None:
        raise RuntimeError("run_job must run inside a tdserve worker (tdserve worker --model …)")
    rq_job = get_current_job()
    assert rq_job is not None
    return _runtime.execute(job_id, rq_job.id)


class GPUWorker(SimpleWorker):
    """RQ's in-process worker with a short started-job TTL refreshed by the runtime's heartbeat thread."""

    def __init__(self, *args: Any, runtime: WorkerRuntime, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return math.ceil(self.runtime.settings.worker_lost_after_s)

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.runtime.rq_job = job
        try:
            super().execute_job(job, queue)
        finally:
            self.runtime.rq_job = None

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()  # type: ignore[no-untyped-call]
        self.runtime.request_stop()


def serve(settings: Settings, model: str, *, name: str | None = None) -> int:
    """Load `model`, warm up, then serve its queue until stopped; returns the process exit code."""
    global _runtime
    import torch

    from engine.pipeline import Pipeline

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    set_pillow_limit(settings.max_image_pixels)  # the input images it opens were checked; this is a backstop
    jobs = Jobs.from_settings(settings)
    runtime = WorkerRuntime(settings, jobs, model, name)
    try:  # first, so that the healthcheck and Prometheus see STARTING while the model loads
        metrics_server, runtime.metrics_url = metrics.start_worker_server(runtime, settings.worker_metrics_port)
    except OSError as e:
        log.error("worker %s: metrics port %d unavailable: %s", runtime.name, settings.worker_metrics_port, e)
        runtime.set_state("SETUP_FAILED")
        return EXIT_SETUP_FAILED
    metrics.init_worker_series(model)
    runtime.publish()
    runtime.start_heartbeat()
    try:
        try:
            start = time.perf_counter()
            pipeline = Pipeline.load(
                model,
                settings.checkpoint_dir(model),
                device=settings.device,
                attention=settings.attention,
                topk=settings.topk,
                quant=None if settings.quant == "none" else settings.quant,
                gemm=settings.gemm,
                offload_idle_expert=settings.offload_idle_expert,
            )
            runtime.device = str(pipeline.device)
            loaded = time.perf_counter()
            pipeline.warmup()
            log.info(
                "worker %s: %s loaded on %s in %.1f s, warmed up in %.1f s",
                runtime.name,
                model,
                runtime.device,
                loaded - start,
                time.perf_counter() - loaded,
            )
        except Exception:
            log.exception("worker %s: could not load %s", runtime.name, model)
            runtime.set_state("SETUP_FAILED")
            return EXIT_SETUP_FAILED
        runtime.pipeline = pipeline
        _runtime = runtime
        worker = GPUWorker(
            [jobs.queue(model)],
            name=runtime.name,
            connection=jobs.rq_redis,
            serializer=JSONSerializer,
            runtime=runtime,
            worker_ttl=60,
            maintenance_interval=60,
        )
        runtime.rq_worker = worker
        runtime.set_state("READY")
        worker.work(logging_level=logging.getLevelName(logging.getLogger().level))
        return EXIT_UNHEALTHY if runtime.state == "UNHEALTHY" else 0
    finally:
        runtime.stop_heartbeat()
        if runtime.state != "SETUP_FAILED":
            jobs.remove_worker(runtime.name)
        metrics_server.shutdown()
        metrics_server.server_close()
        _runtime = None
