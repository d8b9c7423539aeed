"""The metrics of a live stack (real Redis, a uvicorn API, a tiny-t2v worker process on the CPU), read three ways:
the API's and the worker's /metrics, and a real Prometheus scraping both with a configuration generated from
docker/prometheus/prometheus.yml, which then evaluates every PromQL expression of the Grafana dashboard.

The Prometheus binary is Debian's `prometheus` package (`make test` and `.ci/run` install it when missing); the
Prometheus test skips, saying so, only where it is not installed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import stages_of
from service.worker import EXIT_SETUP_FAILED
from tests.integration.conftest import LiveStack, small_job, submit, wait_job, wait_until
from tests.integration.redis_server import METRICS_INTEGRATION_DB, flushed_db_url, free_port

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "tdserve.json"
SCRAPE_INTERVAL_S = 1  # the compose stack scrapes every 5 s; 1 s keeps this test short
WORKER = "metrics-worker"
STEPS = 2
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the exposition's samples named `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@dataclass
class MetricsStack:
    stack: LiveStack
    worker_port: int
    prometheus_url: str | None  # None where the prometheus binary is not installed
    prometheus_started: float  # time.monotonic() when Prometheus answered

    def api_metrics(self) -> str:
        return httpx.get(f"{self.stack.url}/metrics", timeout=10).text

    def worker_metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.worker_port}/metrics", timeout=10).text

    def ensure_worker(self) -> None:
        if WORKER not in self.stack.workers:
            self.stack.start_worker("tiny-t2v", WORKER, env={"TD_WORKER_METRICS_PORT": str(self.worker_port)})

    def query(self, promql: str) -> list[dict[str, Any]]:
        assert self.prometheus_url is not None
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def prometheus_config(api: str, worker: str, prometheus: str) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with its targets pointed at this host's processes (job names, metrics
    paths and everything else kept as the compose stack has them)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tdserve-api", "tdserve-worker", "prometheus"}, set(jobs)
    jobs["tdserve-api"]["static_configs"] = [{"targets": [api]}]
    # Docker's DNS finds the replicas in compose; here the one worker is a static target.
    assert jobs["tdserve-worker"].pop("dns_sd_configs")
    jobs["tdserve-worker"]["static_configs"] = [{"targets": [worker]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [prometheus]}]
    return config


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsStack]:
    """An API serving tiny-t2v, Prometheus scraping it and the (not yet started) worker's metrics port."""
    root = tmp_path_factory.mktemp("metrics")
    stack = LiveStack(root, flushed_db_url(METRICS_INTEGRATION_DB), ["tiny-t2v"])
    worker_port = free_port()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        stack.start_api()
        binary = shutil.which("prometheus")
        prometheus_url = None
        if binary is not None:
            port = free_port()
            prometheus_url = f"http://127.0.0.1:{port}"
            config = prometheus_config(
                f"127.0.0.1:{stack.port}", f"127.0.0.1:{worker_port}", f"127.0.0.1:{port}"
            )
            (root / "prometheus.yml").write_text(yaml.safe_dump(config))
            with open(root / "prometheus.log", "ab") as log:
                prometheus = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={root / 'prometheus.yml'}",
                        f"--storage.tsdb.path={root / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            url = prometheus_url

            def ready() -> bool:
                try:
                    return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, timeout=30, what="Prometheus to be ready")
        yield MetricsStack(stack, worker_port, prometheus_url, time.monotonic())
    except BaseException:
        print(stack.logs())
        raise
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=20)
        stack.stop()
        flushed_db_url(METRICS_INTEGRATION_DB)


def test_metrics_follow_jobs_through_the_api_and_the_worker(live: MetricsStack) -> None:
    """Queue gauges follow submit/cancel/expire/dequeue; after N jobs the worker's counters say N, its
    histograms hold N observations whose sums are the jobs' own timings; no job id is ever a label."""
    with httpx.Client(base_url=live.stack.url, timeout=30) as client:
        api = live.api_metrics()
        assert sample(api, "tdserve_queue_depth", model="tiny-t2v") == 0
        # No worker yet: submissions wait in the queue.
        ids = [submit(client, small_job(steps=STEPS, seed=i))["id"] for i in range(3)]
        api = live.api_metrics()
        assert sample(api, "tdserve_queue_depth", model="tiny-t2v") == 3
        assert sample(api, "tdserve_jobs_in_progress", model="tiny-t2v") == 0
        assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
        expiring = submit(client, small_job(deadline_seconds=0.2))["id"]
        assert wait_job(client, expiring, ("expired",), timeout=20)["error"]["code"] == "expired_in_queue"
        api = live.api_metrics()
        assert sample(api, "tdserve_queue_depth", model="tiny-t2v") == 2
        # The API ended these two, so the API counts them.
        finished = "tdserve_jobs_finished_total"
        assert sample(api, finished, model="tiny-t2v", mode="t2v", status="canceled", code="canceled") == 1
        assert sample(api, finished, model="tiny-t2v", status="expired", code="expired_in_queue") == 1
        assert sample(api, finished, status="completed") == 0

        live.ensure_worker()
        done = [wait_job(client, job_id, ("completed", "failed"), timeout=60) for job_id in ids[1:]]
        assert [job["status"] for job in done] == ["completed", "completed"]
        worker_record = next(w for w in client.get("/readyz").json()["workers"] if w["id"] == WORKER)
        wait_until(
            lambda: sample(live.api_metrics(), "tdserve_queue_depth", model="tiny-t2v") == 0,
            timeout=10,
            what="an empty queue",
        )
        api = live.api_metrics()
        assert sample(api, "tdserve_jobs_in_progress", model="tiny-t2v") == 0

    assert urlparse(worker_record["metrics_url"]).port == live.worker_port
    worker = live.worker_metrics()
    n = len(done)
    assert sample(worker, "tdserve_worker_state", model="tiny-t2v", state="READY") == 1
    assert sample(worker, "tdserve_worker_state", model="tiny-t2v") == 1  # exactly one state is current
    assert sample(worker, "tdserve_jobs_finished_total", model="tiny-t2v", status="completed") == n
    assert sample(worker, "tdserve_jobs_finished_total", status="failed") == 0
    model = {"model": "tiny-t2v"}
    assert sample(worker, "tdserve_job_latency_seconds_count", mode="t2v", **model) == n
    assert sample(worker, "tdserve_queue_wait_seconds_count", mode="t2v", **model) == n
    assert sample(worker, "tdserve_denoise_step_duration_seconds_count", **model) == n * STEPS
    assert sample(worker, "tdserve_job_gpu_memory_peak_bytes_count", **model) == n
    assert sample(worker, "tdserve_job_gpu_memory_peak_bytes_sum", **model) == 0  # a CPU worker
    # Sums against the jobs' own timings (the same measurements, reported through the API): exact for the
    # queue wait and stages; the latency is read just after the record's `total`, so it is a few ms longer.
    timings = [job["timings"] for job in done]
    assert sample(worker, "tdserve_queue_wait_seconds_sum", **model) == pytest.approx(
        sum(t["queue"] for t in timings), rel=1e-9
    )
    for stage in stages_of("t2v"):
        assert sample(worker, "tdserve_stage_duration_seconds_count", stage=stage, **model) == n, stage
        assert sample(worker, "tdserve_stage_duration_seconds_sum", stage=stage, **model) == pytest.approx(
            sum(t[stage] for t in timings), rel=1e-9
        ), stage
    assert sample(worker, "tdserve_denoise_step_duration_seconds_sum", **model) == pytest.approx(
        sum(t["denoise"] for t in timings), rel=1e-9
    )
    latency_sum = sample(worker, "tdserve_job_latency_seconds_sum", **model)
    total = sum(t["total"] for t in timings)
    assert total <= latency_sum <= total + 0.1 * n, (latency_sum, total)
    for text in (api, worker):
        assert not UUID_PATTERN.search(text), "a job id leaked into a label"


def test_a_worker_whose_metrics_port_is_taken_fails_setup(live: MetricsStack) -> None:
    """An unobservable worker is a misconfiguration: it says so and exits instead of serving blind."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = live.stack.start_worker(
            "tiny-t2v", "blind-worker", wait=False, env={"TD_WORKER_METRICS_PORT": str(port)}
        )
        assert process.wait(timeout=30) == EXIT_SETUP_FAILED
    record = live.stack.worker_state("blind-worker")
    assert record is not None and record["state"] == "SETUP_FAILED"
    assert f"metrics port {port} unavailable" in live.stack.logs()


def _grafana_variables(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, selector, label) of each `label_values(selector, label)` query variable."""
    variables = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        assert match, f"variable {variable['name']}: unsupported query {query!r}"
        variables.append((variable["name"], match.group(1), match.group(2)))
    return variables


def _panel_queries(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        yield from _panel_queries(panel.get("panels", []))  # rows hold their panels
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target["expr"]


def _grafana_regex_escape(value: str) -> str:
    """A variable value inside a PromQL `=~"..."` string, escaped as Grafana's Prometheus datasource does
    (prometheusSpecialRegexEscape): regex metacharacters get a backslash, itself escaped for the string."""
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def _substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unresolved variable in {expr!r}"
    return expr


def test_every_dashboard_query_returns_data_from_a_live_prometheus(live: MetricsStack) -> None:
    """Prometheus scrapes the API and the worker with the compose configuration; after a few jobs, each
    PromQL expression of the dashboard (variables substituted as Grafana does) returns finite numbers."""
    if live.prometheus_url is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian package `prometheus`; `make test` and .ci/run "
            "install it when apt-get is usable)"
        )
    live.ensure_worker()
    worker_target = f"127.0.0.1:{live.worker_port}"

    def scraped() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in live.query("up")}
        seen = live.query(f'tdserve_job_latency_seconds_count{{instance="{worker_target}"}}')
        return up.get("tdserve-api") == "1" and up.get("tdserve-worker") == "1" and bool(seen)

    wait_until(scraped, timeout=30, what="Prometheus to scrape the API and the worker", interval=0.5)

    def completed_in_prometheus() -> float:
        result = live.query('sum(tdserve_jobs_finished_total{status="completed"})')
        return float(result[0]["value"][1]) if result else 0.0

    def latency_count() -> float:
        result = live.query("sum(tdserve_job_latency_seconds_count)")
        return float(result[0]["value"][1]) if result else 0.0

    # Compare increases, not totals: jobs of earlier tests (and a replaced worker's stale series) may be
    # counted in one sum and not the other.
    before, latency_before = completed_in_prometheus(), latency_count()
    new_jobs = 3
    with httpx.Client(base_url=live.stack.url, timeout=30) as client:
        ids = [submit(client, small_job(steps=STEPS, seed=100 + i))["id"] for i in range(new_jobs)]
        for job_id in ids:
            assert wait_job(client, job_id, ("completed", "failed"), timeout=60)["status"] == "completed"
    wait_until(
        lambda: completed_in_prometheus() == before + new_jobs,
        timeout=20,
        what=f"Prometheus to count {before + new_jobs} completed jobs",
        interval=0.5,
    )
    assert latency_count() - latency_before == new_jobs

    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's $__rate_interval is at least four scrape intervals; this one spans the whole test, so every
    # rate() sees the samples from before the jobs ran.
    window_s = max(4 * SCRAPE_INTERVAL_S, math.ceil(time.monotonic() - live.prometheus_started) + 5)
    values = {"__rate_interval": f"{window_s}s"}
    for name, selector, label in _grafana_variables(dashboard):
        response = httpx.get(
            f"{live.prometheus_url}/api/v1/label/{label}/values",
            params={"match[]": _substitute(selector, values)},
            timeout=10,
        ).json()
        assert response["status"] == "success", response
        found = response["data"]
        assert found, f"variable {name}: label_values({selector}, {label}) found nothing"
        values[name] = "(" + "|".join(_grafana_regex_escape(v) for v in found) + ")"  # multi-value format
        if name == "instance":
            assert found == [worker_target], found
        if name == "model":
            assert found == ["tiny-t2v"], found

    queries = list(_panel_queries(dashboard["panels"]))
    assert len(queries) >= 20, "the dashboard lost its panels"
    failures = []
    for title, expr in queries:
        promql = _substitute(expr, values)
        result = live.query(promql)
        # A series may read NaN where its group saw no traffic in the window (p95 of a route nobody called);
        # the expression has data when some series holds a number.
        if not any(math.isfinite(float(r["value"][1])) for r in result):
            failures.append(f"{title}: {promql} → {result}")
    assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
    by_title = dict(queries)
    stages = live.query(_substitute(by_title["Stage breakdown (mean seconds per job)"], values))
    means = {r["metric"]["stage"]: float(r["value"][1]) for r in stages}
    assert set(means) == set(stages_of("t2v")) and all(math.isfinite(m) and m > 0 for m in means.values()), means
    throughput = live.query(_substitute(by_title["Throughput (videos/min)"], values))
    assert float(throughput[0]["value"][1]) > 0


def test_an_api_with_two_uvicorn_workers_reports_both_in_every_scrape(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """TD_API_WORKERS=2: two processes answer on one port, yet every scrape counts every request."""
    stack = LiveStack(
        tmp_path_factory.mktemp("two-api-workers"),
        flushed_db_url(METRICS_INTEGRATION_DB),
        ["tiny-t2v"],
        TD_API_WORKERS="2",
    )
    try:
        stack.start_api()
        requests = 40
        for _ in range(requests):  # a new connection each: the kernel hands them to either process
            assert httpx.get(f"{stack.url}/v1/models", timeout=10).status_code == 200
        for _ in range(8):
            text = httpx.get(f"{stack.url}/metrics", timeout=10).text
            count = sample(text, "tdserve_http_request_duration_seconds_count", route="/v1/models")
            assert count == requests
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        flushed_db_url(METRICS_INTEGRATION_DB)
