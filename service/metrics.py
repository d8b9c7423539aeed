"""Prometheus metrics: every `tdserve_*` metric is declared here. Processes measure, this module exports.

Who exports what (the dashboard, docker/grafana/dashboards/tdserve.json, relies on it):

    API, `GET /metrics`        HTTP latency; jobs the API ended (cancel, expiry in the queue, lost workers) and
                               rejected submissions; queue depth and jobs in progress, read from Redis
    worker, its own port       per job: latency, queue wait, stages, denoising steps, peak GPU memory; jobs the
    (TD_WORKER_METRICS_PORT)   worker ended; its state and GPU memory, read when scraped

Measuring is separate from exporting (vLLM's stats/loggers split): the worker fills a `JobRunStats` per run and
calls `record_job_started` / `record_job_run`; `queue.Jobs` calls `count_job_finished` once per terminal
transition. Nothing here decides when a phase starts or ends, and no label ever holds a job id, a prompt or a raw
URL path: labels are model, mode, route, method, status, stage, code and state, each from a closed set.

Why the queue gauges are read from Redis at scrape time, not kept in process: the queue is shared by every
API replica and every worker, and no single process sees all its changes. An in-process gauge would be right
only in the process that touched the queue last. prometheus_client's multiprocess mode merges the processes of
one host, so it would still miss replicas in other containers and the workers, which pop the queue. Redis holds
the truth (the RQ queue's length, the live worker records), so `QueueCollector` reads it at every scrape: each
replica reports the same exact numbers, and dashboards take `max by (model)`, never `sum`.

Why counters and histograms stay in process: each event is counted once, by the process where it happened.
A terminal transition is a compare-and-set in Redis that exactly one process wins (queue.py), and a run is
measured by the worker that ran it. Prometheus scrapes every process, and `sum` over them is the total
(counters kept in Redis would instead be exported whole by every API replica, and `sum` would multiply them).
The one case Prometheus cannot scrape apart is several uvicorn workers behind one port (`TD_API_WORKERS` > 1):
there `tdserve api` sets PROMETHEUS_MULTIPROC_DIR, each process writes its values to files there, and
`/metrics` merges them (prometheus_client's multiprocess mode, which fits exactly this case). The price of
in-process counting: a process killed between two scrapes loses what it counted since the last one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.configs import from_name
from service.schemas import ErrorCode, WorkerState

if TYPE_CHECKING:
    from service.queue import Jobs

log = logging.getLogger("tdserve.metrics")

GIB = 1 << 30
# Seconds, 10 ms … 30 min: a tiny model's stage on the CPU takes ~10 ms; a 14B 720p job queued behind others,
# or the 50-step baseline, takes tens of minutes.
DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0) + tuple(
    60.0 * minutes for minutes in (1, 2, 3, 5, 10, 15, 20, 30)
)
# One denoising step: ~10 ms for a tiny model, seconds for 14B at 480p, a minute or two at 720p on a slow GPU.
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
# HTTP: a status poll takes milliseconds (issue 7 holds its p99 to 20 ms), an upload or an MP4 download seconds.
HTTP_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Peak GPU memory of a job: 1.3B at 480p needs a few GiB, 14B experts tens, up to an H200's 141 GB. The `0`
# bucket holds runs on a CPU worker, which hold no GPU memory (histogram_quantile then reads exactly 0).
GPU_MEMORY_BUCKETS_BYTES = tuple(
    int(gib * GIB) for gib in (0, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 192)
)

# Timed stages of a run: the progress stages plus image_encode (I2V's VAE encode of the conditioning clip, reported
# to clients inside the text_encode progress stage).
STAGES: tuple[str, ...] = ("text_encode", "image_encode", "denoise", "vae_decode", "encode_mp4")
WORKER_STATES: tuple[WorkerState, ...] = get_args(WorkerState)


def stages_of(mode: str) -> tuple[str, ...]:
    """The timed stages a job of this mode ("t2v" | "i2v") runs: image_encode is I2V's alone."""
    return tuple(stage for stage in STAGES if mode == "i2v" or stage != "image_encode")
WebhookDeliveryStatus = Literal["delivered", "retrying", "failed"]
WEBHOOK_DELIVERY_STATUSES: tuple[WebhookDeliveryStatus, ...] = get_args(WebhookDeliveryStatus)
# Every (status, code) a job can end with; "" is the code of a completed job (Prometheus drops empty labels).
OUTCOMES: tuple[tuple[str, str], ...] = (
    ("completed", ""),
    ("canceled", "canceled"),
    ("expired", "expired_in_queue"),
    *(("failed", code) for code in get_args(ErrorCode) if code not in ("canceled", "expired_in_queue")),
)
REJECTION_CODES = ("queue_full", "quota_exceeded")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # the route label of a request no route matched (never its raw path)

# No `*_created` series: nothing reads them, and they would double the number of series per histogram.
disable_created_metrics()  # type: ignore[no-untyped-call]
# The metrics of this process. Scrape-time gauges are not in it: their collectors are added per exposition.
REGISTRY = CollectorRegistry()

# --- HTTP (API) ---------------------------------------------------------------------------------------------
# From the request reaching the app (after uvicorn parsed its head) to the app's last response message.
HTTP_REQUEST_DURATION = Histogram(
    "tdserve_http_request_duration_seconds",
    documentation="HTTP requests by route template, method and status code: time to the full response.",
    labelnames=["route", "method", "status"],
    buckets=HTTP_BUCKETS_S,
    registry=REGISTRY,
)

# --- Jobs: outcomes (API and workers: the process whose compare-and-set ended the job) ----------------------
# One increment per terminal transition (completed, failed, canceled, expired). Throughput in videos/min is
# `sum(rate(tdserve_jobs_finished_total{status="completed"}[5m])) * 60`.
JOBS_FINISHED = Counter(
    "tdserve_jobs_finished_total",
    documentation="Jobs that reached a terminal status, by status and error code (empty when completed).",
    labelnames=["model", "mode", "status", "code"],
    registry=REGISTRY,
)
# One increment per submission refused before it was queued (429 + Retry-After).
JOBS_REJECTED = Counter(
    "tdserve_jobs_rejected_total",
    documentation="Submissions refused with 429 before a job was created, by reason code.",
    labelnames=["model", "code"],
    registry=REGISTRY,
)
# One increment per delivery attempt: delivered (2xx), retrying (failed, another attempt scheduled) or failed
# (refused, or the last attempt failed): the delivery statuses of service/webhooks.py.
WEBHOOK_DELIVERIES = Counter(
    "tdserve_webhook_deliveries_total",
    documentation="Webhook delivery attempts by result: delivered, retrying (to be retried) or failed (given up).",
    labelnames=["status"],
    registry=REGISTRY,
)

# --- Jobs: phases (workers) -------------------------------------------------------------------------------
# Start: the API accepted the submission (`created_at`, API wall clock, in the job record).
# End: the worker marked the job completed with its MP4 written (worker wall clock). Completed jobs only.
JOB_LATENCY = Histogram(
    "tdserve_job_latency_seconds",
    documentation="End-to-end latency of completed jobs: submission to MP4 ready.",
    labelnames=["model", "mode"],
    buckets=DURATION_BUCKETS_S,
    registry=REGISTRY,
)
# Start: the API accepted the submission (`created_at`, API wall clock).
# End: a worker claimed the job (worker wall clock). First attempt only: a re-queued run is not a new wait.
QUEUE_WAIT = Histogram(
    "tdserve_queue_wait_seconds",
    documentation="Time from submission to the first worker start.",
    labelnames=["model", "mode"],
    buckets=DURATION_BUCKETS_S,
    registry=REGISTRY,
)
# text_encode, image_encode, denoise, vae_decode: the engine's stage timer (`time.perf_counter`, CUDA-synchronized
# at both ends, engine/pipeline.py `_timed`). encode_mp4: the worker's `time.perf_counter` from the last decoded
# frame to the MP4 in place (the encoder runs during the decode; this is the part left on the critical path).
# Observed for completed jobs (a failed run has no complete set of stages).
STAGE_DURATION = Histogram(
    "tdserve_stage_duration_seconds",
    documentation="Duration of each generation stage of completed jobs.",
    labelnames=["model", "stage"],
    buckets=DURATION_BUCKETS_S,
    registry=REGISTRY,
)
# The denoise stage time divided by its number of steps, observed once per step. The sampler never
# synchronizes inside its loop (a lean hot loop), so host-side gaps between step callbacks would time kernel
# launches on CUDA; the synchronized stage time is exact in sum and mean, which steps/s panels use
# (count rate = steps/s served; count / sum = one worker's steps/s).
DENOISE_STEP_DURATION = Histogram(
    "tdserve_denoise_step_duration_seconds",
    documentation="Seconds per denoising step (the denoise stage time spread over its steps).",
    labelnames=["model"],
    buckets=STEP_BUCKETS_S,
    registry=REGISTRY,
)
# From the worker claiming the job (peak statistics reset) to the end of its run, completed or not (an OOM's
# peak is the interesting one): `torch.cuda.max_memory_allocated`. 0 on a CPU worker.
JOB_GPU_MEMORY_PEAK = Histogram(
    "tdserve_job_gpu_memory_peak_bytes",
    documentation="Peak GPU memory allocated by tensors during one job run (0 on a CPU worker).",
    labelnames=["model"],
    buckets=GPU_MEMORY_BUCKETS_BYTES,
    registry=REGISTRY,
)


# --- Measuring (filled by the worker) ------------------------------------------------------------------------


@dataclass
class JobRunStats:
    """What a worker measured for one run of one job; `record_job_started` / `record_job_run` export it."""

    model: str
    mode: str
    queue_wait_s: float | None = None  # first attempt only
    stages_s: dict[str, float] = field(default_factory=dict)  # stage → seconds, completed runs
    steps: int = 0  # denoising steps of a completed run
    latency_s: float | None = None  # submission → MP4 ready, completed runs
    gpu_peak_bytes: int | None = None


def reset_gpu_peak(device: str | None) -> None:
    """Start a job's peak-memory window on `device` (nothing to do off CUDA)."""
    if _cuda_in_use(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(device: str | None) -> int:
    """Peak bytes allocated on `device` since `reset_gpu_peak`; 0 off CUDA (a CPU worker holds no GPU memory)."""
    if not _cuda_in_use(device):
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def gpu_memory_bytes(device: str | None) -> tuple[int, int]:
    """(allocated, reserved) bytes of this process on `device`; (0, 0) off CUDA."""
    if not _cuda_in_use(device):
        return 0, 0
    import torch

    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))


def _cuda_in_use(device: str | None) -> bool:
    if device is None or not device.startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


# --- Exporting ------------------------------------------------------------------------------------------------


def init_job_series(models: Iterable[str]) -> None:
    """Create every outcome series at 0 (vLLM's up-front finish-reason series), so that rate() panels show 0
    instead of nothing before the first failure of a kind."""
    for model in models:
        mode = from_name(model).mode
        for status, code in OUTCOMES:
            JOBS_FINISHED.labels(model, mode, status, code)
        for code in REJECTION_CODES:
            JOBS_REJECTED.labels(model, code)
    for status in WEBHOOK_DELIVERY_STATUSES:
        WEBHOOK_DELIVERIES.labels(status)


def init_worker_series(model: str) -> None:
    """Create a worker's phase series at 0 (its panels read 0 jobs/s, not "no data", while it idles)."""
    init_job_series([model])
    mode = from_name(model).mode
    JOB_LATENCY.labels(model, mode)
    QUEUE_WAIT.labels(model, mode)
    for stage in stages_of(mode):
        STAGE_DURATION.labels(model, stage)
    DENOISE_STEP_DURATION.labels(model)
    JOB_GPU_MEMORY_PEAK.labels(model)


def count_job_finished(model: str, mode: str, status: str, code: str | None) -> None:
    JOBS_FINISHED.labels(model, mode, status, code or "").inc()


def count_job_rejected(model: str, code: str) -> None:
    JOBS_REJECTED.labels(model, code).inc()


def count_webhook_delivery(status: WebhookDeliveryStatus) -> None:
    WEBHOOK_DELIVERIES.labels(status).inc()


def record_job_started(stats: JobRunStats) -> None:
    """Export what is known when a worker starts a job: its queue wait (at once, not after the run)."""
    if stats.queue_wait_s is not None:
        QUEUE_WAIT.labels(stats.model, stats.mode).observe(stats.queue_wait_s)


def record_job_run(stats: JobRunStats) -> None:
    """Export a finished run: stages, steps and latency when it completed, its GPU peak in any case."""
    for stage in STAGES:
        if stage in stats.stages_s:
            STAGE_DURATION.labels(stats.model, stage).observe(stats.stages_s[stage])
    denoise_s = stats.stages_s.get("denoise")
    if denoise_s is not None and stats.steps > 0:
        step = DENOISE_STEP_DURATION.labels(stats.model)
        for _ in range(stats.steps):
            step.observe(denoise_s / stats.steps)
    if stats.latency_s is not None:
        JOB_LATENCY.labels(stats.model, stats.mode).observe(stats.latency_s)
    if stats.gpu_peak_bytes is not None:
        JOB_GPU_MEMORY_PEAK.labels(stats.model).observe(stats.gpu_peak_bytes)


# --- Scrape-time gauges ---------------------------------------------------------------------------------------


class QueueCollector:
    """tdserve_queue_depth and tdserve_jobs_in_progress per served model, read from Redis at each scrape."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        models = self.jobs.settings.models
        try:
            with self.jobs.rq_redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.llen(self.jobs.queue(model).key)  # RQ's Queue.count
                lengths = pipe.execute()
            workers = self.jobs.workers()  # live records only: a silent worker's record has expired
        except RedisError as e:  # no numbers rather than wrong ones; the HTTP metrics still export
            log.warning("metrics: queue gauges skipped, Redis unavailable (%s)", e)
            return
        depth = GaugeMetricFamily(
            "tdserve_queue_depth", "Jobs waiting in the model's queue (read from Redis).", labels=["model"]
        )
        running = GaugeMetricFamily(
            "tdserve_jobs_in_progress",
            "Jobs a live worker of the model is running (read from Redis).",
            labels=["model"],
        )
        for model, length in zip(models, lengths, strict=True):
            depth.add_metric([model], float(length))
            busy = sum(1 for w in workers if w.model == model and w.current_job is not None)
            running.add_metric([model], float(busy))
        yield depth
        yield running


class WorkerView(Protocol):
    """What the worker collector reads from service.worker.WorkerRuntime."""

    model: str
    state: WorkerState
    device: str | None


class WorkerCollector:
    """A worker's state (1 for the current one, 0 for the others) and its GPU memory, read at each scrape."""

    def __init__(self, worker: WorkerView) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        model, current = self.worker.model, self.worker.state
        state = GaugeMetricFamily(
            "tdserve_worker_state",
            "1 for the worker's current state, 0 for the others.",
            labels=["model", "state"],
        )
        for name in WORKER_STATES:
            state.add_metric([model, name], 1.0 if name == current else 0.0)
        allocated, reserved = gpu_memory_bytes(self.worker.device)
        yield state
        yield _model_gauge(
            "tdserve_gpu_memory_allocated_bytes",
            "GPU memory held by tensors of this worker (0 on a CPU worker).",
            model,
            allocated,
        )
        yield _model_gauge(
            "tdserve_gpu_memory_reserved_bytes",
            "GPU memory reserved by this worker's caching allocator (0 on a CPU worker).",
            model,
            reserved,
        )


def _model_gauge(name: str, documentation: str, model: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["model"])
    gauge.add_metric([model], float(value))
    return gauge


# --- Exposition -----------------------------------------------------------------------------------------------


def process_collector() -> CollectorRegistry | MultiProcessCollector:
    """This process's metrics, or those of every uvicorn worker of this API when multiprocess mode is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    return REGISTRY


def api_exposition(jobs: Jobs) -> tuple[bytes, str]:
    """The body and content type of the API's `GET /metrics`."""
    registry = CollectorRegistry()
    registry.register(process_collector())
    registry.register(QueueCollector(jobs))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class HttpMetricsMiddleware:
    """Pure ASGI middleware: one observation per HTTP request, labeled with the route template.

    The router stores the matched route in the request scope (Starlette `Router.app`), so after the app has
    answered, `scope["route"].path` is e.g. `/v1/jobs/{job_id}`: bounded, unlike the raw path. Methods outside
    the standard set are labeled `OTHER`, so a fuzzer cannot mint series.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception escaping the app becomes a 500 (Starlette's ServerErrorMiddleware)

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            HTTP_REQUEST_DURATION.labels(route, method, str(status)).observe(time.perf_counter() - start)


def start_worker_server(worker: WorkerView, port: int) -> tuple[WSGIServer, str]:
    """Serve a worker's metrics on 0.0.0.0:`port` (0: a free port) from a daemon thread.

    Returns:
        The server (call `shutdown()` to stop it) and the URL other hosts reach it at, for the worker record.

    Raises:
        OSError: the port cannot be bound.
    """
    registry = CollectorRegistry()
    registry.register(REGISTRY)
    registry.register(WorkerCollector(worker))
    server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    return server, f"http://{socket.gethostname()}:{server.server_port}/metrics"
