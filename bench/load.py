"""API load test on 127.0.0.1: concurrent submissions, then status polls, from one process; latency
percentiles, status counts and the API's memory across the run.

    python bench/load.py                                  # 500 concurrent submissions + 5000 polls (the bars)
    python bench/load.py --submissions 50 --polls 500     # the smoke version CI runs
    python bench/load.py --out load.json --check          # exit 1 when a bar is missed

The script starts everything it measures and nothing else: a redis-server of its own (free port, temporary
directory, appendonly), `tdserve api` with TD_API_WORKERS uvicorn workers (2 by default) and an API key, no
engine worker (the API is what is measured; jobs stay queued). Admission is set so both answers occur:
TD_QUEUE_MAX_DEPTH (default 250) jobs are accepted (202), the rest of the burst is refused with 429 +
Retry-After. Only 127.0.0.1 is ever contacted.

Besides latency, each phase reports the CPU time per request of the API processes, of Redis and of this client
(from /proc, over the measured requests): on a machine with C cores a burst of N requests cannot end sooner than
N × (the three together) / C.

The client is a lean asyncio HTTP/1.1 client on keep-alive connections opened before the clock starts (one per
in-flight request): httpx costs about 1 ms of client CPU per request, which on two cores would be measured as
server latency. Latency = first byte of the request written → last byte of the response read.

Bars (issue 7): every submission answered 202 or 429 with Retry-After, no 5xx, p99 submit ≤ 50 ms, p99 poll
≤ 20 ms with 2 uvicorn workers on a 2-core machine, API memory flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.auth import key_digest, new_api_key

SUBMIT_BODY = {"model": "tiny-t2v", "prompt": "a red fox running through snow", "num_frames": 5, "steps": 1}
BARS = {"submit_p99_ms": 50.0, "poll_p99_ms": 20.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --- A lean HTTP/1.1 client -----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    latency_ms: float


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Reply:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        start = time.perf_counter()
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        reply_headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            reply_headers[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(reply_headers.get("content-length", "0")))
        latency_ms = (time.perf_counter() - start) * 1000
        return Reply(int(status_line.split()[1]), reply_headers, content, latency_ms)

    def close(self) -> None:
        self.writer.close()


# --- The stack under test -------------------------------------------------------------------------------------


class Stack:
    def __init__(self, workdir: Path, api_workers: int, queue_depth: int, api_key: str) -> None:
        self.workdir = workdir
        self.redis_port, self.api_port = free_port(), free_port()
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed")
        self.redis = subprocess.Popen(
            [
                server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(workdir),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.redis_port)
        env = {name: value for name, value in os.environ.items() if not name.startswith("TD_")}
        env.update(
            {
                "TD_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "TD_STORAGE_DIR": str(workdir / "results"),
                "TD_MODELS": "tiny-t2v",
                "TD_API_HOST": "127.0.0.1",
                "TD_API_PORT": str(self.api_port),
                "TD_API_WORKERS": str(api_workers),
                "TD_API_KEYS": key_digest(api_key),
                "TD_QUEUE_MAX_DEPTH": str(queue_depth),
                # One client stands in for many: per-key limits would measure the limiter, not the API.
                "TD_RATE_LIMIT_PER_S": "100000",
                "TD_RATE_LIMIT_BURST": "100000",
                "TD_MAX_ACTIVE_JOBS_PER_KEY": "100000",
                "TD_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO),
            }
        )
        self.api_log = open(workdir / "api.log", "wb")  # noqa: SIM115 (closed in stop)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"],
            env=env,
            cwd=workdir,
            stdout=self.api_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_port(self.api_port)

    def api_pids(self) -> list[int]:
        """The uvicorn supervisor and its worker processes."""
        children = Path(f"/proc/{self.api.pid}/task/{self.api.pid}/children")
        pids = [self.api.pid]
        if children.exists():
            pids += [int(pid) for pid in children.read_text().split()]
        return pids

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system, all threads) the API processes and Redis have used so far."""
        api = sum(process_cpu_s(pid) for pid in self.api_pids())
        return {"api": api, "redis": process_cpu_s(self.redis.pid)}

    def api_rss_mib(self) -> float:
        total_kib = 0
        for pid in self.api_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            total_kib += next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
            )
        return total_kib / 1024

    def stop(self) -> None:
        for process in (self.api, self.redis):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.api_log.close()


# --- The run --------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    missing_retry_after: int = 0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=lambda: {"api": 0.0, "redis": 0.0, "client": 0.0})

    @contextmanager
    def timed(self, stack: Stack) -> Iterator[None]:
        """Count the wall time and the CPU time of the API, Redis and this client spent inside the block."""
        cpu, client, start = stack.cpu_s(), time.process_time(), time.perf_counter()
        yield
        self.wall_s += time.perf_counter() - start
        self.cpu_s["client"] += time.process_time() - client
        for name, seconds in stack.cpu_s().items():
            self.cpu_s[name] += seconds - cpu[name]

    def add(self, reply: Reply) -> None:
        self.latencies_ms.append(reply.latency_ms)
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        if reply.status == 429 and "retry-after" not in reply.headers:
            self.missing_retry_after += 1

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def pct(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        return {
            "requests": len(ordered),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "missing_retry_after": self.missing_retry_after,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": round(ordered[-1], 2),
            "mean_ms": round(statistics.fmean(ordered), 2),
            "wall_s": round(self.wall_s, 2),
            "throughput_rps": round(len(ordered) / self.wall_s, 1),
            "cpu_ms_per_request": {
                name: round(seconds * 1000 / len(ordered), 3) for name, seconds in self.cpu_s.items()
            },
        }


async def submit_round(
    args: argparse.Namespace, stack: Stack, headers: dict[str, str], body: bytes, phase: Phase
) -> list[str]:
    """`args.submissions` submissions, one connection each (opened before the clock starts): all at once, or
    arriving at `args.submit_rate` per second (open loop: each starts on schedule, whatever the others do)."""
    connections = await asyncio.gather(*(Connection.open(stack.api_port) for _ in range(args.submissions)))
    rng = random.Random(1)
    offsets = [0.0] * args.submissions
    if args.submit_rate > 0:
        for i in range(1, args.submissions):
            offsets[i] = offsets[i - 1] + rng.expovariate(args.submit_rate)

    async def one(conn: Connection, offset: float, start: float) -> Reply:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await conn.request("POST", "/v1/generate", headers, body)

    with phase.timed(stack):
        start = time.perf_counter()
        replies = await asyncio.gather(*(one(c, o, start) for c, o in zip(connections, offsets, strict=True)))
    for conn in connections:
        conn.close()
    accepted = []
    for reply in replies:
        phase.add(reply)
        if reply.status == 202:
            accepted.append(json.loads(reply.body)["id"])
    return accepted


async def poll_round(
    args: argparse.Namespace, stack: Stack, headers: dict[str, str], job_ids: list[str], phase: Phase
) -> None:
    """`args.polls` status polls of `job_ids` over `args.poll_concurrency` keep-alive connections."""
    pollers = [await Connection.open(stack.api_port) for _ in range(args.poll_concurrency)]
    per_poller = [args.polls // len(pollers) + (i < args.polls % len(pollers)) for i in range(len(pollers))]
    rng = random.Random(0)

    async def poll_loop(conn: Connection, count: int) -> None:
        for _ in range(count):
            phase.add(await conn.request("GET", f"/v1/jobs/{rng.choice(job_ids)}", headers))

    with phase.timed(stack):
        await asyncio.gather(*(poll_loop(c, n) for c, n in zip(pollers, per_poller, strict=True)))
    for conn in pollers:
        conn.close()


async def delete_jobs(stack: Stack, headers: dict[str, str], job_ids: list[str]) -> None:
    """Empty the queue between rounds (through the API), so every round meets the same admission."""
    connections = [await Connection.open(stack.api_port) for _ in range(8)]

    async def delete_loop(conn: Connection, ids: list[str]) -> None:
        for job_id in ids:
            reply = await conn.request("DELETE", f"/v1/jobs/{job_id}", headers)
            assert reply.status == 204, reply

    await asyncio.gather(*(delete_loop(c, job_ids[i :: len(connections)]) for i, c in enumerate(connections)))
    for conn in connections:
        conn.close()


async def run(args: argparse.Namespace, stack: Stack, api_key: str) -> dict[str, Any]:
    """A warm-up round (not measured: imports, connections, Lua scripts, allocator growth), then
    `args.rounds` measured rounds of submissions + polls; the API's RSS after each."""
    auth = {"Authorization": f"Bearer {api_key}"}
    body = json.dumps(SUBMIT_BODY).encode()
    submit_headers = {**auth, "Content-Type": "application/json"}
    submit, poll = Phase(), Phase()
    rss: dict[str, list[float]] = {"after_submissions": [], "after_polls": [], "after_deletes": []}
    for round_index in range(args.rounds + 1):
        measured = round_index > 0
        accepted = await submit_round(args, stack, submit_headers, body, submit if measured else Phase())
        rss["after_submissions"].append(round(stack.api_rss_mib(), 1))
        await poll_round(args, stack, auth, accepted, poll if measured else Phase())
        rss["after_polls"].append(round(stack.api_rss_mib(), 1))
        await delete_jobs(stack, auth, accepted)
        rss["after_deletes"].append(round(stack.api_rss_mib(), 1))
    # Growth while polling (keep-alive connections) vs over whole rounds (each opens `submissions` connections).
    poll_growth = sum(
        b - a for a, b in zip(rss["after_submissions"][1:], rss["after_polls"][1:], strict=True)
    )
    return {
        "config": {
            "submissions_per_round": args.submissions,
            "submit_rate_per_s": args.submit_rate or "all at once",
            "polls_per_round": args.polls,
            "poll_concurrency": args.poll_concurrency,
            "measured_rounds": args.rounds,
            "api_workers": args.api_workers,
            "queue_max_depth": args.queue_depth,
            "cpu_count": os.cpu_count(),
        },
        "submit": submit.summary(),
        "poll": poll.summary(),
        "api_rss_mib": {
            "after_warmup": rss["after_deletes"][0],
            "after_each_round": rss["after_deletes"][1:],
            "growth_while_polling": round(poll_growth, 1),
            "by_phase": rss,
        },
    }


def verdict(result: dict[str, Any]) -> list[str]:
    """The bars the result misses (empty: all met)."""
    missed = []
    submit, poll = result["submit"], result["poll"]
    if set(submit["statuses"]) - {"202", "429"}:
        missed.append(f"submissions answered {submit['statuses']} (only 202 and 429 allowed)")
    if submit["missing_retry_after"]:
        missed.append(f"{submit['missing_retry_after']} 429s without Retry-After")
    if any(status.startswith("5") for status in poll["statuses"]) or set(poll["statuses"]) != {"200"}:
        missed.append(f"polls answered {poll['statuses']}")
    if submit["p99_ms"] > BARS["submit_p99_ms"]:
        missed.append(f"submit p99 {submit['p99_ms']} ms > {BARS['submit_p99_ms']} ms")
    if poll["p99_ms"] > BARS["poll_p99_ms"]:
        missed.append(f"poll p99 {poll['p99_ms']} ms > {BARS['poll_p99_ms']} ms")
    rss = result["api_rss_mib"]
    if rss["after_each_round"][-1] - rss["after_warmup"] > 0.05 * rss["after_warmup"]:
        missed.append(f"API memory grew from {rss['after_warmup']} to {rss['after_each_round'][-1]} MiB")
    if rss["growth_while_polling"] > 1.0:
        missed.append(f"API memory grew {rss['growth_while_polling']} MiB while polling")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=500)
    parser.add_argument("--polls", type=int, default=5000)
    parser.add_argument("--submit-rate", type=float, default=0.0, help="arrivals per second (0: all at once)")
    parser.add_argument("--poll-concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--queue-depth", type=int, default=250, help="TD_QUEUE_MAX_DEPTH: jobs accepted")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a bar is missed")
    args = parser.parse_args()

    api_key = new_api_key()
    with tempfile.TemporaryDirectory(prefix="tdserve-load-") as tmp:
        stack = Stack(Path(tmp), args.api_workers, args.queue_depth, api_key)
        try:
            result = asyncio.run(run(args, stack, api_key))
        finally:
            stack.stop()
    result["missed"] = verdict(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if args.check and result["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
