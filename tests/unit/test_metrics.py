"""service/metrics.py in one process: buckets, pre-created series, exported values, the HTTP route labels, the
queue gauges read from a real Redis (no worker: jobs stay queued until this test pops them), the worker's
metrics server.

Counters and histograms are process-wide, so every value check reads the change a test caused (after − before).
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.serializers import JSONSerializer

from service import metrics
from service.app import create_app
from service.queue import Jobs
from service.schemas import ErrorCode, JobStatus, WorkerPublic, WorkerState
from service.settings import Settings
from tests.integration.redis_server import METRICS_UNIT_DB, flushed_db_url, free_port

UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the exposition's samples named `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def process_value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 before the series exists)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        _env_file=None,
        redis_url=flushed_db_url(METRICS_UNIT_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path / "results",
        models=["tiny-t2v", "tiny-i2v"],
        queue_max_depth=3,
        auth_disabled=True,
    )
    flushed_db_url(METRICS_UNIT_DB)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def t2v_job(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny-t2v", "prompt": "a red fox", "num_frames": 5, "steps": 1, **overrides}


class FakeWorker:
    """What the worker collector reads (service.worker.WorkerRuntime has the same attributes)."""

    def __init__(self, state: WorkerState = "READY") -> None:
        self.model = "tiny-t2v"
        self.state: WorkerState = state
        self.device: str | None = "cpu"


def test_buckets_span_10_ms_to_30_min_in_increasing_order() -> None:
    for buckets in (metrics.DURATION_BUCKETS_S, metrics.STEP_BUCKETS_S, metrics.HTTP_BUCKETS_S):
        assert list(buckets) == sorted(set(buckets))
    assert metrics.DURATION_BUCKETS_S[0] == 0.01 and metrics.DURATION_BUCKETS_S[-1] == 1800.0
    assert metrics.STEP_BUCKETS_S[0] == 0.01 and metrics.HTTP_BUCKETS_S[0] <= 0.01
    memory = metrics.GPU_MEMORY_BUCKETS_BYTES
    assert list(memory) == sorted(set(memory)) and memory[0] == 0 and memory[-1] >= 141 * 10**9


def test_outcomes_cover_every_terminal_status_and_error_code() -> None:
    statuses = {status for status, _ in metrics.OUTCOMES}
    assert statuses == {s.value for s in JobStatus if s.is_terminal}
    assert {code for _, code in metrics.OUTCOMES} == {"", *get_args(ErrorCode)}
    assert len(set(metrics.OUTCOMES)) == len(metrics.OUTCOMES)


def test_init_job_series_creates_every_outcome_series() -> None:
    metrics.init_job_series(["tiny-t2v", "tiny-i2v"])
    for model, mode in (("tiny-t2v", "t2v"), ("tiny-i2v", "i2v")):
        for status, code in metrics.OUTCOMES:
            labels = {"model": model, "mode": mode, "status": status, "code": code}
            assert metrics.REGISTRY.get_sample_value("tdserve_jobs_finished_total", labels) is not None
        assert (
            metrics.REGISTRY.get_sample_value(
                "tdserve_jobs_rejected_total", {"model": model, "code": "queue_full"}
            )
            is not None
        )
    for status in metrics.WEBHOOK_DELIVERY_STATUSES:
        assert (
            metrics.REGISTRY.get_sample_value("tdserve_webhook_deliveries_total", {"status": status})
            is not None
        )


def test_record_job_run_exports_stages_steps_latency_and_peak() -> None:
    model, mode = "tiny-i2v", "i2v"
    names: dict[str, tuple[str, dict[str, str]]] = {
        "latency": ("tdserve_job_latency_seconds", {"model": model, "mode": mode}),
        "wait": ("tdserve_queue_wait_seconds", {"model": model, "mode": mode}),
        "step": ("tdserve_denoise_step_duration_seconds", {"model": model}),
        "peak": ("tdserve_job_gpu_memory_peak_bytes", {"model": model}),
        **{
            stage: ("tdserve_stage_duration_seconds", {"model": model, "stage": stage})
            for stage in metrics.STAGES
        },
    }

    def snapshot() -> dict[str, tuple[float, float]]:
        return {
            key: (process_value(f"{name}_count", **labels), process_value(f"{name}_sum", **labels))
            for key, (name, labels) in names.items()
        }

    before = snapshot()
    stages = {"text_encode": 0.02, "denoise": 1.5, "vae_decode": 0.25, "encode_mp4": 0.125}
    runs = [
        metrics.JobRunStats(
            model, mode, queue_wait_s=0.5, stages_s=stages, steps=3, latency_s=4.0, gpu_peak_bytes=0
        ),
        metrics.JobRunStats(
            model, mode, queue_wait_s=1.5, stages_s=stages, steps=3, latency_s=6.0, gpu_peak_bytes=0
        ),
        # A failed run: no stages, no latency, yet its peak counts; a retry's start is no new queue wait.
        metrics.JobRunStats(model, mode, queue_wait_s=None, gpu_peak_bytes=3 * metrics.GIB),
    ]
    for stats in runs:
        metrics.record_job_started(stats)
        metrics.record_job_run(stats)
    after = snapshot()
    delta = {key: (after[key][0] - before[key][0], after[key][1] - before[key][1]) for key in names}
    assert delta["latency"] == (2, 10.0)
    assert delta["wait"] == (2, 2.0)
    for stage, seconds in stages.items():
        assert delta[stage] == pytest.approx((2, 2 * seconds)), stage
    # Six steps, each a third of its run's 1.5 s denoise stage: the sum is the stage time exactly.
    assert delta["step"] == pytest.approx((6, 3.0))
    assert delta["peak"] == (3, 3 * metrics.GIB)


def test_record_job_run_ignores_stages_outside_the_contract() -> None:
    before = process_value("tdserve_stage_duration_seconds_count", model="tiny-t2v", stage="upload")
    metrics.record_job_run(metrics.JobRunStats("tiny-t2v", "t2v", stages_s={"upload": 1.0}))
    assert (
        process_value("tdserve_stage_duration_seconds_count", model="tiny-t2v", stage="upload") == before == 0
    )


def test_worker_collector_reports_the_current_state_and_no_gpu_memory_on_cpu() -> None:
    worker = FakeWorker("BUSY")
    families = {family.name: family for family in metrics.WorkerCollector(worker).collect()}
    states = {s.labels["state"]: s.value for s in families["tdserve_worker_state"].samples}
    assert states == {state: float(state == "BUSY") for state in get_args(WorkerState)}
    for name in ("tdserve_gpu_memory_allocated_bytes", "tdserve_gpu_memory_reserved_bytes"):
        (only,) = families[name].samples
        assert only.labels == {"model": "tiny-t2v"} and only.value == 0.0


def test_worker_server_serves_its_state_on_a_free_port() -> None:
    worker = FakeWorker("STARTING")
    server, url = metrics.start_worker_server(worker, 0)
    try:
        port = server.server_port
        assert port > 0 and url.endswith(f":{port}/metrics") and url.startswith("http://")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        assert sample(scrape(), "tdserve_worker_state", state="STARTING") == 1.0
        worker.state = "UNHEALTHY"  # read at scrape time, never cached
        text = scrape()
        assert sample(text, "tdserve_worker_state", state="UNHEALTHY") == 1.0
        assert sample(text, "tdserve_worker_state", state="STARTING") == 0.0
        assert "tdserve_jobs_finished_total" in text  # the process's own metrics are served too
    finally:
        server.shutdown()
        server.server_close()


def test_worker_server_refuses_a_taken_port() -> None:
    server, _ = metrics.start_worker_server(FakeWorker(), 0)
    try:
        with pytest.raises(OSError):
            metrics.start_worker_server(FakeWorker(), server.server_port)
    finally:
        server.shutdown()
        server.server_close()


def test_http_metrics_label_requests_by_route_template(api: TestClient) -> None:
    job_id = str(uuid.uuid4())
    template = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "404"}
    unmatched = {"route": metrics.UNMATCHED_ROUTE, "method": "GET", "status": "404"}
    other = {"route": "/healthz", "method": "OTHER", "status": "405"}
    name = "tdserve_http_request_duration_seconds_count"
    before = [process_value(name, **labels) for labels in (template, unmatched, other)]
    for _ in range(3):
        assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    assert api.get(f"/no/such/{job_id}").status_code == 404
    assert api.request("BREW", "/healthz").status_code == 405
    text = api.get("/metrics").text
    after = [sample(text, name, **labels) for labels in (template, unmatched, other)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 1, 1]
    assert not UUID_PATTERN.search(text), "a job id leaked into a label"
    routes = {
        s.labels["route"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }
    known = set(api.app.openapi()["paths"])  # type: ignore[attr-defined]
    assert routes <= known | {metrics.UNMATCHED_ROUTE}, routes - known


def test_queue_gauges_follow_enqueue_dequeue_and_running_workers(api: TestClient) -> None:
    jobs: Jobs = api.app.state.jobs  # type: ignore[attr-defined]

    def gauges() -> tuple[float, float, float, float]:
        text = api.get("/metrics").text
        return (
            sample(text, "tdserve_queue_depth", model="tiny-t2v"),
            sample(text, "tdserve_jobs_in_progress", model="tiny-t2v"),
            sample(text, "tdserve_queue_depth", model="tiny-i2v"),
            sample(text, "tdserve_jobs_in_progress", model="tiny-i2v"),
        )

    assert gauges() == (0, 0, 0, 0)
    ids = [api.post("/v1/generate", json=t2v_job()).json()["id"] for _ in range(3)]
    assert gauges() == (3, 0, 0, 0)
    rejected = process_value("tdserve_jobs_rejected_total", model="tiny-t2v", code="queue_full")
    assert api.post("/v1/generate", json=t2v_job()).status_code == 429  # queue_max_depth is 3
    assert process_value("tdserve_jobs_rejected_total", model="tiny-t2v", code="queue_full") == rejected + 1
    assert gauges() == (3, 0, 0, 0)

    canceled_labels = {"model": "tiny-t2v", "mode": "t2v", "status": "canceled", "code": "canceled"}
    canceled = process_value("tdserve_jobs_finished_total", **canceled_labels)
    assert api.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
    assert gauges() == (2, 0, 0, 0)
    assert process_value("tdserve_jobs_finished_total", **canceled_labels) == canceled + 1

    # A worker pops the next job (RQ's dequeue) and publishes itself busy with it.
    queue = Queue("tiny-t2v", connection=jobs.rq_redis, serializer=JSONSerializer)
    popped = Queue.dequeue_any([queue], None, connection=jobs.rq_redis, serializer=JSONSerializer)
    assert popped is not None
    assert gauges() == (1, 0, 0, 0)
    busy = WorkerPublic(
        id="w1",
        model="tiny-t2v",
        state="BUSY",
        device="cpu",
        current_job=ids[1],
        last_heartbeat=None,
        metrics_url=None,
    )
    jobs.publish_worker(busy, ttl_s=60)
    jobs.publish_worker(busy.model_copy(update={"id": "w2", "state": "READY", "current_job": None}), ttl_s=60)
    assert gauges() == (1, 1, 0, 0)
    jobs.remove_worker("w1")
    assert gauges() == (1, 0, 0, 0)


def test_metrics_answer_without_queue_gauges_while_redis_is_down(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # type: ignore[call-arg]  # nothing listens there
        storage_dir=tmp_path,
        models=["tiny-t2v"],
        auth_disabled=True,
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "tdserve_queue_depth" not in response.text  # no number rather than a wrong one
    assert "tdserve_http_request_duration_seconds" in response.text
