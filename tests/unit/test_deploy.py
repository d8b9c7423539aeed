"""Deployment files, checked statically (no Docker engine in CI); the two container scripts, run for real.

- docker-compose.yml: the five services, their wiring (ports, health-gated start, GPU reservation, volumes)
  and every file it mounts; the TD_* names it sets are real settings.
- Dockerfile + .dockerignore: stages, COPY sources inside the build context, rules in the spirit of hadolint
  (pinned bases, non-root user, healthcheck, apt hygiene, no secrets).
- docker/prometheus and docker/grafana: scrape targets match the compose services, the datasource uid matches
  the dashboard, and every dashboard PromQL expression names only metrics, labels and label values of the
  metric contract that service/metrics.py exports (promtool parses them too where it is installed).
- docker/entrypoint.py (one GPU per worker replica through flock) and docker/healthcheck.py, in subprocesses
  and against a real HTTP server.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
DASHBOARD_FILE = ROOT / "docker" / "grafana" / "dashboards" / "tdserve.json"

# The metric contract (issue 6): name → (type, labels). service/metrics.py exports exactly these.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "tdserve_http_request_duration_seconds": ("histogram", frozenset({"route", "method", "status"})),
    "tdserve_job_latency_seconds": ("histogram", frozenset({"model", "mode"})),
    "tdserve_queue_wait_seconds": ("histogram", frozenset({"model", "mode"})),
    "tdserve_stage_duration_seconds": ("histogram", frozenset({"model", "stage"})),
    "tdserve_denoise_step_duration_seconds": ("histogram", frozenset({"model"})),
    "tdserve_jobs_finished_total": ("counter", frozenset({"model", "mode", "status", "code"})),
    "tdserve_jobs_rejected_total": ("counter", frozenset({"model", "code"})),
    "tdserve_queue_depth": ("gauge", frozenset({"model"})),
    "tdserve_jobs_in_progress": ("gauge", frozenset({"model"})),
    "tdserve_worker_state": ("gauge", frozenset({"model", "state"})),
    "tdserve_gpu_memory_allocated_bytes": ("gauge", frozenset({"model"})),
    "tdserve_gpu_memory_reserved_bytes": ("gauge", frozenset({"model"})),
    "tdserve_job_gpu_memory_peak_bytes": ("histogram", frozenset({"model"})),
    "tdserve_webhook_deliveries_total": ("counter", frozenset({"status"})),
}
# Closed label vocabularies of the contract; a typo in a dashboard matcher would silently match nothing.
LABEL_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("tdserve_jobs_finished_total", "status"): frozenset({"completed", "failed", "canceled", "expired"}),
    ("tdserve_stage_duration_seconds", "stage"): frozenset(
        {"text_encode", "image_encode", "denoise", "vae_decode", "encode_mp4"}),
    ("tdserve_worker_state", "state"): frozenset({"STARTING", "READY", "BUSY", "UNHEALTHY"}),
}
TARGET_LABELS = frozenset({"instance", "job"})  # added by Prometheus to every scraped series
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana variables → a value that keeps the expression valid PromQL.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$model": ".*", "$instance": ".*"}
# TD_* names that only docker compose reads (interpolation), not Settings; .env.example lists them too.
COMPOSE_ONLY_VARIABLES = frozenset({"TD_WORKER_MODEL", "TD_CHECKPOINTS_HOST_DIR"})
# The worker's metrics port (metric contract; a Settings field of service/metrics.py's worker side).
METRICS_PORT_VARIABLE = "TD_WORKER_METRICS_PORT"
STACK = {"redis", "api", "worker", "prometheus", "grafana"}


def _load_script(name: str) -> ModuleType:
    """docker/<name>.py as a module (the scripts live outside any package; the image runs them by path)."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", ROOT / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = _load_script("entrypoint")
healthcheck = _load_script("healthcheck")


# --- parsing helpers ----------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(compose, dict)
    return compose


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _interpolate_default(value: str) -> str:
    """`${VAR:-default}` → default, as compose resolves it when VAR is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Short-syntax volume entries as {source, target, read_only}."""
    mounts = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        # The source may be a ${VAR:-default} interpolation, whose ':-' is not a separator.
        match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", entry)
        assert match, f"unreadable volume entry {entry!r}"
        source, target, mode = match.groups()
        mounts.append({"source": source, "target": target, "read_only": mode == "ro"})
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "$", "~"))


def _mount(service: dict[str, Any], target: str) -> dict[str, Any]:
    matches = [m for m in _mounts(service) if m["target"] == target]
    assert len(matches) == 1, f"expected one mount at {target}, got {matches}"
    return matches[0]


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments and parser directives dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line[:-1]}" if line.endswith("\\") else f"{pending} {line}"
        if line.endswith("\\"):
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base image, stage name, instructions) per FROM."""
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "FROM":
            words = arguments.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: FROM {arguments}"
            stages.append((words[0], words[2], []))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1][2].append((keyword, arguments))
    return stages


def _copy_arguments(arguments: str) -> tuple[dict[str, str], list[str], str]:
    """COPY [--flag=value …] src… dest → (flags, sources, destination)."""
    words = shlex.split(arguments)
    flags = dict(word[2:].split("=", 1) for word in words if word.startswith("--"))
    paths = [word for word in words if not word.startswith("--")]
    return flags, paths[:-1], paths[-1]


def _dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        bodies = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch.fnmatchcase(candidate, b) and (b.count("/") == candidate.count("/") or "**" in b)
               for candidate in candidates for b in bodies):
            excluded = not negate
    return excluded


def _dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def _graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in _graph_panels(dashboard) for target in panel["targets"]]


def _substitute(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = re.sub(re.escape(variable) + r"(?![A-Za-z0-9_])", value, expr)
    return expr


_SELECTOR = re.compile(r"\b(tdserve_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_RANGE_FUNCTION = re.compile(r"\b(?:rate|irate|increase)\(\s*(tdserve_[a-z0-9_]+)")


def _resolve_series(series: str) -> tuple[str, str]:
    """Series name → (contract metric, suffix); raises AssertionError for a name outside the contract."""
    if series in METRICS:
        assert METRICS[series][0] != "histogram", f"{series} is a histogram: use _bucket, _sum or _count"
        return series, ""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in METRICS:
            kind = METRICS[base][0]
            assert kind == "histogram", f"{series}: {base} is a {kind}, not a histogram"
            return base, suffix
    raise AssertionError(f"{series} is not in the metric contract")


def promql_problems(expr: str) -> list[str]:
    """Every way `expr` departs from the metric contract (an empty list when it conforms)."""
    problems: list[str] = []
    expr = _substitute(expr)
    if "$" in expr:
        problems.append(f"unknown Grafana variable in {expr!r}")
    used_labels: set[str] = set(TARGET_LABELS)
    selectors = _SELECTOR.findall(expr)
    if not selectors:
        problems.append(f"names no tdserve metric: {expr!r}")
    for series, matchers in selectors:
        try:
            metric, suffix = _resolve_series(series)
        except AssertionError as e:
            problems.append(str(e))
            continue
        labels = METRICS[metric][1] | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        used_labels |= labels
        for label, operator, value in _MATCHER.findall(matchers):
            if label not in labels:
                problems.append(f"{series} has no label {label!r}")
            vocabulary = LABEL_VALUES.get((metric, label))
            if vocabulary is not None and operator in ("=", "!="):
                values = {value}
            elif vocabulary is not None:
                values = set(value.split("|"))
            else:
                values = set()
            if vocabulary is not None and not values <= vocabulary:
                unknown = sorted(values - vocabulary)
                problems.append(f"{series}{{{label}}}: {unknown} not in {sorted(vocabulary)}")
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in used_labels:
                problems.append(f"groups by {label!r}, which none of its metrics carries")
    for series in _RANGE_FUNCTION.findall(expr):
        if series in METRICS and METRICS[series][0] == "gauge":
            problems.append(f"rate/increase over the gauge {series}")
    if "_bucket" in expr and not ("histogram_quantile(" in expr and re.search(r"\bby\s*\([^)]*\ble\b", expr)):
        problems.append(f"buckets outside histogram_quantile(…, sum by (…, le) …): {expr!r}")
    return problems


# --- docker-compose.yml -------------------------------------------------------------------------------------


def test_compose_parses_and_defines_the_stack() -> None:
    compose = _compose()
    assert set(compose["services"]) == STACK
    assert "version" not in compose, "the top-level version key is obsolete in the Compose Specification"


def test_compose_images_are_pinned() -> None:
    for name, service in _services().items():
        image = service["image"]
        if "build" in service:
            assert "/" not in image, f"{name}: the locally built image needs no registry: {image}"
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", f"{name}: unpinned image {image}"


def test_compose_services_all_have_healthchecks() -> None:
    for name, service in _services().items():
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] == "CMD" and len(test) > 1, f"{name}: no exec healthcheck"


def test_compose_redis_persists_and_never_evicts() -> None:
    redis = _services()["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    data = _mount(redis, "/data")
    assert not _is_bind(data["source"]) and data["source"] in _compose()["volumes"]


def test_compose_api_publishes_8000_once_redis_is_healthy() -> None:
    api = _services()["api"]
    assert api["command"] == ["api"]
    assert "8000:8000" in api["ports"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    env = _environment(api)
    assert env["TD_REDIS_URL"].startswith("redis://redis:6379/")
    assert env["TD_API_HOST"] == "0.0.0.0" and env["TD_API_PORT"] == "8000"


def test_compose_worker_reserves_gpus_and_can_scale() -> None:
    services = _services()
    worker = services["worker"]
    assert worker["command"][:2] == ["worker", "--model"] and len(worker["command"]) == 3
    # A fixed container name or a host port makes `--scale worker=N` fail on the second replica.
    assert "container_name" not in worker and "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    reserved = [(d["driver"], d["count"], "gpu" in d["capabilities"]) for d in devices]
    assert reserved == [("nvidia", "all", True)]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["restart"] == "unless-stopped"
    checkpoints = _mount(worker, "/checkpoints")
    assert checkpoints["read_only"] and _is_bind(checkpoints["source"])
    assert _environment(worker)["TD_CHECKPOINT_ROOT"] == "/checkpoints"
    # The API serves the MP4s that workers write: both mount the same results volume at TD_STORAGE_DIR.
    for name in ("api", "worker"):
        results = _mount(services[name], _environment(services[name])["TD_STORAGE_DIR"])
        assert results["source"] == "results" and not results["read_only"]
    assert _mount(worker, str(entrypoint.GPU_LOCK_DIR))["source"] in _compose()["volumes"]
    port = _environment(worker)[METRICS_PORT_VARIABLE]
    assert port in [str(p) for p in worker["expose"]]


def test_compose_worker_model_defaults_to_a_configured_model() -> None:
    from service.settings import Settings

    default_model = _interpolate_default(_services()["worker"]["command"][2])
    assert default_model in Settings.model_fields["models"].get_default(call_default_factory=True)


def test_compose_volumes_are_declared_and_bind_sources_exist() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, service in compose["services"].items():
        for mount in _mounts(service):
            source = mount["source"]
            if not _is_bind(source):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            elif mount["target"] != "/checkpoints":  # the operator's model folder, not part of the repository
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                assert mount["read_only"], f"{name}: configuration mount {source} should be read-only"
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_compose_env_file_is_optional() -> None:
    for name in ("api", "worker"):
        assert _services()[name]["env_file"] == [{"path": ".env", "required": False}]


def test_compose_and_dockerfile_set_only_real_settings() -> None:
    from service.settings import Settings

    settings = {f"TD_{field.upper()}" for field in Settings.model_fields}
    text = COMPOSE_FILE.read_text() + DOCKERFILE.read_text()
    names = set(re.findall(r"\bTD_[A-Z0-9_]+", text))
    assert names, "no TD_ variables found"
    unknown = names - settings - COMPOSE_ONLY_VARIABLES - {METRICS_PORT_VARIABLE}
    assert not unknown, f"not Settings fields: {sorted(unknown)}"


def test_compose_grafana_is_provisioned_with_anonymous_viewers() -> None:
    grafana = _services()["grafana"]
    env = _environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    provisioning = _mount(grafana, "/etc/grafana/provisioning")
    assert (ROOT / provisioning["source"]).resolve() == GRAFANA_PROVISIONING
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "tdserve.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    dashboards = _mount(grafana, dashboards_dir)
    assert (ROOT / dashboards["source"]).resolve() == DASHBOARD_FILE.parent
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards_dir) and (DASHBOARD_FILE.parent / home.name).is_file()


def test_compose_prometheus_loads_the_mounted_config() -> None:
    prometheus = _services()["prometheus"]
    flags = dict(flag.split("=", 1) for flag in prometheus["command"])
    config = _mount(prometheus, flags["--config.file"])
    assert (ROOT / config["source"]).resolve() == PROMETHEUS_CONFIG
    assert not _is_bind(_mount(prometheus, flags["--storage.tsdb.path"])["source"])


# --- Prometheus and the Grafana datasource ------------------------------------------------------------------


def _datasource() -> dict[str, Any]:
    config = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (datasource,) = config["datasources"]
    assert isinstance(datasource, dict)
    return datasource


def test_prometheus_scrapes_the_api_and_every_worker_replica() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = _services()
    (api_target,) = [t for static in jobs["tdserve-api"]["static_configs"] for t in static["targets"]]
    host, port = api_target.split(":")
    assert host == "api" and int(port) in _container_ports(services["api"])
    assert jobs["tdserve-api"].get("metrics_path", "/metrics") == "/metrics"
    # DNS service discovery returns one address per replica, so scaling needs no config change.
    (discovery,) = jobs["tdserve-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert str(discovery["port"]) == _environment(services["worker"])[METRICS_PORT_VARIABLE]
    assert discovery["port"] == healthcheck.DEFAULT_WORKER_METRICS_PORT


def test_grafana_datasource_is_prometheus_with_a_fixed_uid() -> None:
    datasource = _datasource()
    assert datasource["type"] == "prometheus" and datasource["uid"]
    host, port = datasource["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) == 9090
    scrape_interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package prometheus) not installed")


@needs_promtool
def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Grafana dashboard ---------------------------------------------------------------------------------


def test_dashboard_has_model_and_instance_variables_on_the_datasource() -> None:
    dashboard = _dashboard()
    uid = _datasource()["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"model", "instance"}
    for variable in variables.values():
        assert variable["type"] == "query" and variable["datasource"]["uid"] == uid
        assert variable["includeAll"] and variable["multi"]
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match and match.group(2) == variable["name"]
        assert not promql_problems(match.group(1))
    # Picking a model narrows the worker list.
    assert "$model" in variables["instance"]["definition"]


def test_dashboard_panels_query_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    uid = _datasource()["uid"]
    panels = _graph_panels(dashboard)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["y"] + dy, grid["x"] + dx) for dy in range(grid["h"]) for dx in range(grid["w"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]


def test_dashboard_promql_uses_only_the_metric_contract() -> None:
    problems = {expr: promql_problems(expr) for expr in _dashboard_expressions(_dashboard())}
    assert not {expr: found for expr, found in problems.items() if found}


def test_dashboard_shows_every_contract_metric() -> None:
    shown = {_resolve_series(series)[0] for expr in _dashboard_expressions(_dashboard())
             for series, _ in _SELECTOR.findall(expr)}
    assert shown == set(METRICS)


def _panel_using(dashboard: dict[str, Any], pattern: str) -> dict[str, Any]:
    matches = [panel for panel in _graph_panels(dashboard) if panel["type"] == "timeseries"
               and any(re.search(pattern, target["expr"]) for target in panel["targets"])]
    assert len(matches) >= 1, f"no time-series panel matches {pattern!r}"
    return matches[0]


def test_dashboard_has_the_panels_of_issue_6() -> None:
    dashboard = _dashboard()

    def exprs(panel: dict[str, Any]) -> str:
        return "\n".join(target["expr"] for target in panel["targets"])

    for histogram in ("tdserve_job_latency_seconds", "tdserve_queue_wait_seconds"):
        panel = _panel_using(dashboard, histogram)
        for quantile in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({quantile}, sum by \(model, le\)", exprs(panel)), quantile
    stages = _panel_using(dashboard, r"tdserve_stage_duration_seconds_sum")
    assert "by (stage)" in exprs(stages)
    assert stages["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "rate(tdserve_denoise_step_duration_seconds_count" in exprs(
        _panel_using(dashboard, "tdserve_denoise_step_duration_seconds"))
    throughput = _panel_using(dashboard, r'tdserve_jobs_finished_total\{status="completed"')
    assert exprs(throughput).endswith("* 60"), "throughput is in videos per minute"
    assert "code" in exprs(_panel_using(dashboard, r'tdserve_jobs_finished_total\{status!="completed"'))
    assert "tdserve_queue_depth" in exprs(_panel_using(dashboard, "tdserve_queue_depth"))
    assert "state" in exprs(_panel_using(dashboard, "tdserve_worker_state"))
    memory = exprs(_panel_using(dashboard, "tdserve_gpu_memory_allocated_bytes"))
    assert "tdserve_gpu_memory_reserved_bytes" in memory


@needs_promtool
def test_dashboard_promql_parses_with_promtool(tmp_path: Path) -> None:
    dashboard = _dashboard()
    rules = [{"record": f"dashboard:panel{panel['id']}_{target['refId']}",
              "expr": _substitute(target["expr"])}
             for panel in _graph_panels(dashboard) for target in panel["targets"]]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("expr", "complaint"), [
    ('rate(tdserve_jobs_total[1m])', "not in the metric contract"),
    ('tdserve_job_latency_seconds{model="x"}', "is a histogram"),
    ('rate(tdserve_queue_depth_count[1m])', "not a histogram"),
    ('sum(tdserve_queue_depth{stage="denoise"})', "has no label 'stage'"),
    ('sum(tdserve_worker_state{state="BUSSY"})', "not in ['BUSY'"),
    ('sum by (stage) (tdserve_queue_depth)', "groups by 'stage'"),
    ('rate(tdserve_jobs_in_progress[1m])', "over the gauge"),
    ('sum(rate(tdserve_job_latency_seconds_bucket[1m]))', "outside histogram_quantile"),
    ('tdserve_queue_depth{model=~"$models"}', "unknown Grafana variable"),
])
def test_promql_checker_rejects_departures_from_the_contract(expr: str, complaint: str) -> None:
    assert any(complaint in problem for problem in promql_problems(expr)), promql_problems(expr)


# --- Dockerfile and .dockerignore ---------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_a_pinned_cuda_runtime() -> None:
    stages = _stages()
    names = [name for _, name, _ in stages]
    assert len(stages) >= 3 and len(set(names)) == len(names) and names[-1] == "runtime"
    base_image = stages[0][0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base_image), base_image
    for index, (image, name, _) in enumerate(stages[1:], start=1):
        assert image in names[:index], f"stage {name} builds on {image}, not an earlier stage"
    for _, name, instructions in stages:
        for keyword, arguments in instructions:
            if keyword == "COPY" and "from" in _copy_arguments(arguments)[0]:
                source_stage = _copy_arguments(arguments)[0]["from"]
                assert source_stage in names[: names.index(name)], f"COPY --from={source_stage} in {name}"


def test_dockerfile_copies_only_existing_files_inside_the_build_context() -> None:
    copied = []
    for _, _, instructions in _stages():
        for keyword, arguments in instructions:
            assert keyword != "ADD", "use COPY (hadolint DL3020)"
            if keyword != "COPY" or "from" in _copy_arguments(arguments)[0]:
                continue
            for source in _copy_arguments(arguments)[1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not _dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
                copied.append(source.rstrip("/"))
    # `pip install .` needs the project metadata and the packages it lists.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for needed in ("pyproject.toml", project["readme"], "engine", "service"):
        assert needed in copied, f"{needed} is not copied into the build stage"


def test_dockerignore_keeps_heavy_and_private_paths_out() -> None:
    for path in (".venv/bin/python", ".git/config", "results/x.mp4", "checkpoints/wan/model.safetensors",
                 ".env", "tests/unit/test_deploy.py", "engine/__pycache__/x.pyc"):
        assert _dockerignore_excludes(path), path
    for path in ("pyproject.toml", "engine/pipeline.py", "service/app.py", "docker/entrypoint.py"):
        assert not _dockerignore_excludes(path), path


def test_dockerfile_installs_pinned_cuda_torch_then_the_app_as_a_package() -> None:
    runs = [arguments for _, _, instructions in _stages() for keyword, arguments in instructions
            if keyword == "RUN"]
    torch_installs = [run for run in runs if re.search(r"pip install .*\btorch\b", run)]
    assert len(torch_installs) == 1 and "==${TORCH_VERSION}" in torch_installs[0]
    assert "cpu" not in torch_installs[0], "the image needs the CUDA build of torch"
    args = [arguments for keyword, arguments in _dockerfile_instructions() if keyword == "ARG"]
    assert any(re.fullmatch(r"TORCH_VERSION=\d+\.\d+\.\d+", arg) for arg in args), args
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs), "install the app: `pip install .`"
    assert not any("ffmpeg" in run and "apt-get" in run for run in runs), "ffmpeg comes from imageio-ffmpeg"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tdserve" in scripts, "entrypoint.py execs the tdserve console script"


def test_dockerfile_runtime_runs_as_non_root_with_healthcheck_and_entrypoint() -> None:
    _, _, runtime = _stages()[-1]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final USER must not be root"
    copied_to: dict[str, str] = {}
    for keyword, arguments in runtime:
        if keyword == "COPY" and "from" not in _copy_arguments(arguments)[0]:
            _, sources, destination = _copy_arguments(arguments)
            copied_to.update({f"{destination.rstrip('/')}/{Path(s).name}": s for s in sources})
    (healthcheck_args,) = [arguments for keyword, arguments in runtime if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck_args.split(" CMD ", 1)[1])
    assert command[-1] in copied_to and copied_to[command[-1]] == "docker/healthcheck.py"
    (entrypoint_args,) = [arguments for keyword, arguments in runtime if keyword == "ENTRYPOINT"]
    command = json.loads(entrypoint_args)  # exec form (hadolint DL3025): signals reach the process
    assert command[-1] in copied_to and copied_to[command[-1]] == "docker/entrypoint.py"
    (default_command,) = [arguments for keyword, arguments in runtime if keyword == "CMD"]
    assert json.loads(default_command) == ["api"]


def test_dockerfile_follows_hadolint_rules() -> None:
    instructions = _dockerfile_instructions()
    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    for keyword, arguments in instructions:
        if keyword == "WORKDIR":
            assert arguments.startswith("/"), "DL3000: absolute WORKDIR"
        if keyword != "RUN":
            continue
        assert "sudo " not in arguments, "DL3004: no sudo"
        assert not re.search(r"(^|&&|;)\s*cd\s", arguments), "DL3003: use WORKDIR, not cd"
        assert "apt-get upgrade" not in arguments and "dist-upgrade" not in arguments, "DL3005"
        if "apt-get install" in arguments:
            assert "--no-install-recommends" in arguments, "DL3015"
            assert "-y" in arguments.split(), "DL3014"
            assert arguments.rstrip().endswith("rm -rf /var/lib/apt/lists/*"), "DL3009: clean the apt lists"
        if "pip install" in arguments:
            assert "--no-cache-dir" in arguments or "PIP_NO_CACHE_DIR=1" in env, "DL3042: no pip cache"


# --- secrets ------------------------------------------------------------------------------------------------

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b[A-Z0-9_]*(password|passwd|secret|token|api_?keys?|private_key)[A-Z0-9_]*\b\s*[:=]\s*"
    r"[\"']?(?!\$\{)([^\s\"']+)")
_SECRET_LITERALS = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\bAKIA[0-9A-Z]{16}\b"
                              r"|\bwhsec_[A-Za-z0-9+/=]{8,}|\bgh[pousr]_[A-Za-z0-9]{20,}")


def secrets_in(text: str) -> list[str]:
    """Lines of `text` that assign a literal credential or contain a known key format."""
    return [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")
            and (_SECRET_ASSIGNMENT.search(line) or _SECRET_LITERALS.search(line))]


def _deployment_files() -> Iterator[Path]:
    yield COMPOSE_FILE
    yield DOCKERFILE
    yield ROOT / ".dockerignore"
    yield from (path for path in sorted((ROOT / "docker").rglob("*"))
                if path.is_file() and "__pycache__" not in path.parts)


def test_deployment_files_hold_no_secrets() -> None:
    found = {str(path.relative_to(ROOT)): secrets_in(path.read_text()) for path in _deployment_files()}
    assert not {path: lines for path, lines in found.items() if lines}
    keywords = ("ARG", "ENV")
    for keyword, arguments in _dockerfile_instructions():
        if keyword in keywords:
            # Build args and image env are readable by anyone with the image (docker history / inspect).
            assert not re.search(r"(?i)(password|secret|token|api_?key)", arguments), f"{keyword} {arguments}"


@pytest.mark.parametrize("line", [
    "GF_SECURITY_ADMIN_PASSWORD: hunter2",
    "TD_API_KEYS=sk-live-123",
    "  webhook_secret: 'abc'",
    "key: -----BEGIN RSA PRIVATE KEY-----",
    "aws: AKIAABCDEFGHIJKLMNOP",
])
def test_secret_scanner_flags_literal_credentials(line: str) -> None:
    assert secrets_in(line) == [line.strip()]


def test_secret_scanner_accepts_references_to_the_environment() -> None:
    assert secrets_in("GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD}\n# TOKEN=abc in a comment") == []


# --- docker/entrypoint.py: one GPU per worker replica -------------------------------------------------------


def test_visible_gpu_count_counts_gpu_nodes_only(tmp_path: Path) -> None:
    for node in ("nvidia0", "nvidia1", "nvidia7", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools",
                 "nvidia-caps"):
        (tmp_path / node).touch()
    assert entrypoint.visible_gpu_count(tmp_path) == 3
    assert entrypoint.visible_gpu_count(tmp_path / "absent") == 0


def test_claim_gpu_gives_each_holder_its_own_gpu(tmp_path: Path) -> None:
    # flock locks belong to open file descriptions, so two claims in one process conflict like two containers.
    first, first_fd = entrypoint.claim_gpu(tmp_path, 2)
    second, second_fd = entrypoint.claim_gpu(tmp_path, 2)
    assert (first, second) == (0, 1)
    with pytest.raises(entrypoint.NoFreeGPU, match="all 2 GPUs are held"):
        entrypoint.claim_gpu(tmp_path, 2)
    os.close(first_fd)
    again, again_fd = entrypoint.claim_gpu(tmp_path, 2)
    assert again == 0
    assert os.get_inheritable(again_fd)
    os.close(again_fd)
    os.close(second_fd)


@pytest.fixture
def fake_container(tmp_path: Path) -> dict[str, Path]:
    """A /dev with two GPUs, a lock folder, and a `tdserve` on PATH that reports its GPU and then waits."""
    devices, locks, bin_dir = tmp_path / "dev", tmp_path / "locks", tmp_path / "bin"
    for folder in (devices, bin_dir):
        folder.mkdir()
    for node in ("nvidia0", "nvidia1", "nvidiactl"):
        (devices / node).touch()
    fake = bin_dir / "tdserve"
    fake.write_text('#!/bin/sh\necho "gpu=${CUDA_VISIBLE_DEVICES-unset} args=$*"\nexec sleep 60\n')
    fake.chmod(0o755)
    return {"devices": devices, "locks": locks, "bin": bin_dir}


def _start_entrypoint(fake_container: dict[str, Path], *args: str,
                      extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    script = str(ROOT / "docker" / "entrypoint.py")
    code = (f"import importlib.util, pathlib, sys\n"
            f"spec = importlib.util.spec_from_file_location('entrypoint', {script!r})\n"
            f"module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            f"module.DEVICE_DIR = pathlib.Path({str(fake_container['devices'])!r})\n"
            f"module.GPU_LOCK_DIR = pathlib.Path({str(fake_container['locks'])!r})\n"
            f"module.main(sys.argv[1:])\n")
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{fake_container['bin']}{os.pathsep}{env['PATH']}"
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    if process.stdout is not None and not process.stdout.closed:
        process.communicate(timeout=10)


def test_entrypoint_worker_keeps_its_gpu_lock_across_exec(fake_container: dict[str, Path]) -> None:
    worker_args = ("worker", "--model", "tiny-t2v")
    first = _start_entrypoint(fake_container, *worker_args)
    second = third = replacement = None
    try:
        # The exec'd `tdserve` (here sh, then sleep) still holds GPU 0's lock: the next replica gets GPU 1.
        assert _first_line(first) == "gpu=0 args=worker --model tiny-t2v"
        second = _start_entrypoint(fake_container, *worker_args)
        assert _first_line(second) == "gpu=1 args=worker --model tiny-t2v"
        third = _start_entrypoint(fake_container, *worker_args)
        _, stderr = third.communicate(timeout=30)
        assert third.returncode == 1 and "all 2 GPUs are held" in stderr
        # A replica that dies frees its GPU for the next one.
        _stop(first)
        replacement = _start_entrypoint(fake_container, *worker_args)
        assert _first_line(replacement) == "gpu=0 args=worker --model tiny-t2v"
    finally:
        for process in (first, second, third, replacement):
            if process is not None:
                _stop(process)


def test_entrypoint_leaves_the_api_and_preset_devices_alone(fake_container: dict[str, Path]) -> None:
    api = _start_entrypoint(fake_container, "api", "--port", "8000")
    preset = _start_entrypoint(fake_container, "worker", "--model", "tiny-t2v",
                               extra_env={"CUDA_VISIBLE_DEVICES": "MIG-4f1c"})
    try:
        assert _first_line(api) == "gpu=unset args=api --port 8000"
        assert _first_line(preset) == "gpu=MIG-4f1c args=worker --model tiny-t2v"
        assert not fake_container["locks"].exists(), "no lock is taken when no GPU is assigned"
    finally:
        _stop(api)
        _stop(preset)


# --- docker/healthcheck.py ----------------------------------------------------------------------------------

_TDSERVE = ["/opt/venv/bin/python3", "/opt/venv/bin/tdserve"]


def test_healthcheck_probes_the_right_port_for_each_role() -> None:
    assert healthcheck.probe_url([*_TDSERVE, "api"], {}) == ("api", "http://127.0.0.1:8000/healthz")
    assert healthcheck.probe_url([*_TDSERVE, "api", "--port", "8100"], {"TD_API_PORT": "8200"}) == (
        "api", "http://127.0.0.1:8100/healthz")
    assert healthcheck.probe_url([*_TDSERVE, "run"], {"TD_API_PORT": "8200"}) == (
        "run", "http://127.0.0.1:8200/healthz")
    worker = [*_TDSERVE, "worker", "--model", "tiny-t2v"]
    assert healthcheck.probe_url(worker, {"TD_WORKER_METRICS_PORT": "9105"}) == (
        "worker", "http://127.0.0.1:9105/metrics")
    with pytest.raises(ValueError, match="not a tdserve"):
        healthcheck.probe_url(["/bin/sh", "-c", "sleep 1"], {})


def _worker_metrics(ready: str, unhealthy: str) -> str:
    """A worker's exposition text, as prometheus_client writes it."""
    return (
        "# HELP tdserve_worker_state 1 for the worker's current state\n"
        "# TYPE tdserve_worker_state gauge\n"
        'tdserve_worker_state{model="tiny-t2v",state="STARTING"} 0.0\n'
        f'tdserve_worker_state{{model="tiny-t2v",state="READY"}} {ready}\n'
        'tdserve_worker_state{model="tiny-t2v",state="BUSY"} 0.0\n'
        f'tdserve_worker_state{{model="tiny-t2v",state="UNHEALTHY"}} {unhealthy}\n'
    )


def test_worker_unhealthy_reads_the_state_gauge() -> None:
    assert not healthcheck.worker_unhealthy(_worker_metrics(ready="1.0", unhealthy="0.0"))
    assert healthcheck.worker_unhealthy(_worker_metrics(ready="0.0", unhealthy="1.0"))
    assert not healthcheck.worker_unhealthy("")


class _Handler(http.server.BaseHTTPRequestHandler):
    responses: dict[str, tuple[int, str]] = {}

    def do_GET(self) -> None:
        status, body = self.responses.get(self.path, (404, "not found"))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, tuple[int, str]]]]:
    responses: dict[str, tuple[int, str]] = {}
    handler = type("Handler", (_Handler,), {"responses": responses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], responses
    server.shutdown()
    server.server_close()


def test_healthcheck_against_a_live_server(http_server: tuple[int, dict[str, tuple[int, str]]]) -> None:
    port, responses = http_server
    api = [*_TDSERVE, "api", "--port", str(port)]
    worker = ([*_TDSERVE, "worker", "--model", "tiny-t2v"], {"TD_WORKER_METRICS_PORT": str(port)})
    assert not healthcheck.check(api, {})[0], "no /healthz route yet → unhealthy"
    responses["/healthz"] = (200, '{"status": "ok"}')
    assert healthcheck.check(api, {})[0]
    responses["/healthz"] = (503, "down")
    assert not healthcheck.check(api, {})[0]
    responses["/metrics"] = (200, _worker_metrics(ready="1.0", unhealthy="0.0"))
    assert healthcheck.check(*worker)[0]
    responses["/metrics"] = (200, _worker_metrics(ready="0.0", unhealthy="1.0"))
    healthy, reason = healthcheck.check(*worker)
    assert not healthy and "UNHEALTHY" in reason


def test_healthcheck_fails_when_nothing_listens() -> None:
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler) as server:
        port = server.server_address[1]  # bound, then closed: nothing listens on it afterwards
    healthy, reason = healthcheck.check([*_TDSERVE, "api", "--port", str(port)], {})
    assert not healthy and "did not answer" in reason
