"""`tdserve`: the command line.

    tdserve generate --model tiny-t2v --prompt "a red fox" -o fox.mp4   # engine only, no service
    tdserve run [--host H] [--port P] [--models tiny-t2v,tiny-i2v]      # Redis if none answers, API, workers
    tdserve api [--host H] [--port P]                                   # the HTTP API (uvicorn)
    tdserve worker --model tiny-t2v                                     # one resident-engine worker
    tdserve submit "a red fox" --model tiny-t2v -o fox.mp4              # a job through the API, live progress
    tdserve openapi > openapi.yaml                                      # the API's OpenAPI document
    tdserve keygen [--webhook]                                          # an API key + digest (webhook secret)

Every service setting also comes from the environment (`TD_` prefix, see .env.example); flags override it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("tdserve")

BAR_WIDTH = 30


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("TD_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args.func(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate one video with the engine (no service)")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True)
    _add_generation_flags(generate)
    generate.add_argument("--checkpoint-dir", type=Path, default=None)
    generate.add_argument("--attention", choices=["sdpa", "sla", "sagesla"], default=None)
    generate.add_argument("--topk", type=float, default=None)
    generate.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda when available)")
    generate.add_argument("--quant", choices=["auto", "w8a8", "none"], default="auto",
                          help="W8A8 linears: auto = exactly when the checkpoint is a -quant file")
    generate.add_argument("--gemm", choices=["int8", "fp8"], default="int8",
                          help="the W8A8 GEMM: int8 (TurboDiffusion's numerics) or fp8 (cuBLAS, sm90; faster)")
    generate.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    generate.set_defaults(func=cmd_generate)

    run = commands.add_parser("run", help="Redis (if none answers) + the API + one worker per model")
    _add_server_flags(run)
    run.add_argument(
        "--models", default=None, help="comma-separated (default: TD_MODELS, else the tiny models)"
    )
    run.set_defaults(func=cmd_run)

    api = commands.add_parser("api", help="the HTTP API")
    _add_server_flags(api)
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="one resident-engine worker")
    worker.add_argument("--model", required=True)
    worker.add_argument("--name", default=None, help="worker name (default: model.host.pid)")
    worker.add_argument(
        "--metrics-port", type=int, default=None, help="default: TD_WORKER_METRICS_PORT (9100); 0: a free one"
    )
    worker.set_defaults(func=cmd_worker)

    submit = commands.add_parser("submit", help="submit a job to a running API and download the MP4")
    submit.add_argument("prompt")
    submit.add_argument("--model", default=None)
    _add_generation_flags(submit)
    submit.add_argument("--url", default=None, help="API base URL (default: http://TD_API_HOST:TD_API_PORT)")
    submit.add_argument("--api-key", default=os.environ.get("TD_API_KEY"))
    submit.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    submit.set_defaults(func=cmd_submit)

    quantize = commands.add_parser("quantize", help="write a TurboDiffusion-compatible W8A8 -quant checkpoint")
    quantize.add_argument("input", type=Path, help="float DiT weights: .pth or .safetensors (official/TurboWan keys)")
    quantize.add_argument("output", type=Path, help="the -quant file to write: .pth or .safetensors")
    quantize.add_argument("--device", default="cpu", help="where to quantize (cpu or cuda; identical output)")
    quantize.set_defaults(func=cmd_quantize)

    openapi = commands.add_parser("openapi", help="print the API's OpenAPI document (YAML)")
    openapi.set_defaults(func=cmd_openapi)

    keygen = commands.add_parser("keygen", help="make an API key and its TD_API_KEYS digest")
    keygen.add_argument("--webhook", action="store_true", help="make a TD_WEBHOOK_SECRET instead")
    keygen.set_defaults(func=cmd_keygen)
    return parser


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", type=Path, default=None, help="I2V first frame (PNG, JPEG, WebP)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--size", choices=["480p", "720p"], default=None)
    parser.add_argument("--aspect-ratio", choices=["16:9", "9:16", "1:1", "4:3"], default=None)
    parser.add_argument("--frames", type=int, default=None, help="4k+1 frames (default 81)")
    parser.add_argument("--sigma-max", type=float, default=None)
    parser.add_argument("--ode", action="store_true", help="deterministic ODE sampling")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="default: TD_API_HOST (127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="default: TD_API_PORT (8000)")


def _settings(**overrides: Any) -> Any:
    from service.settings import Settings

    return Settings(**{name: value for name, value in overrides.items() if value is not None})


# --- progress display ---------------------------------------------------------------------------------------


class ProgressBar:
    """One line on stderr, redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self) -> None:
        self.interactive = sys.stderr.isatty()
        self.last = ""

    def update(self, percent: int, label: str) -> None:
        filled = BAR_WIDTH * percent // 100
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent:3d}% {label}"
        if line == self.last:
            return
        self.last = line
        if self.interactive:
            sys.stderr.write(f"\r{line:<{BAR_WIDTH + 40}}")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.interactive and self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- commands -----------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """Load the pipeline, generate, encode; progress on stderr, stage timings at the end."""
    from PIL import Image

    from engine.pipeline import GenerationRequest, Pipeline
    from engine.video import write_mp4
    from service.queue import STAGE_PROGRESS

    start = time.perf_counter()
    pipeline = Pipeline.load(
        args.model, args.checkpoint_dir, device=args.device, attention=args.attention, topk=args.topk,
        quant=None if args.quant == "none" else args.quant, gemm=args.gemm,
    )
    load_s = time.perf_counter() - start
    image = Image.open(args.image).convert("RGB") if args.image else None
    request = GenerationRequest(
        prompt=args.prompt,
        image=image,
        size=args.size,
        aspect_ratio=args.aspect_ratio,
        num_frames=args.frames,
        steps=args.steps,
        seed=args.seed,
        sigma_max=args.sigma_max,
        ode=args.ode,
    )
    bar = ProgressBar()

    def on_progress(stage: str, step: int, total: int) -> None:
        low, high = STAGE_PROGRESS[stage]
        percent = low + (high - low) * step // max(total, 1) if stage == "denoise" else low
        bar.update(percent, f"{stage} {step}/{total}" if stage == "denoise" else stage)

    try:
        result = pipeline.generate(request, on_progress=on_progress)
    except ValueError as e:
        bar.close()
        print(f"tdserve generate: {e}", file=sys.stderr)
        return 2
    bar.update(STAGE_PROGRESS["encode_mp4"][0], "encode_mp4")
    encode_start = time.perf_counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(result.frames, args.output, fps=result.fps)
    timings = {"load": load_s, **result.timings, "encode_mp4": time.perf_counter() - encode_start}
    bar.update(100, "done")
    bar.close()
    print(
        f"wrote {args.output}: {result.num_frames} frames {result.width}x{result.height} "
        f"at {result.fps} fps, "
        f"{result.steps} steps, seed {result.seed}",
        file=sys.stderr,
    )
    print(
        "  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items())
        + f"  total {time.perf_counter() - start:.2f}s",
        file=sys.stderr,
    )
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings(api_host=args.host, api_port=args.port)
    multiprocess_dir = None
    if settings.api_workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes share one port, so one scrape reaches only one of them: each writes its metrics
        # to files in a fresh folder, which /metrics merges (service/metrics.py). Set before the workers
        # start, which import prometheus_client and read it then.
        multiprocess_dir = tempfile.mkdtemp(prefix="tdserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.api_host,
        "port": settings.api_port,
        "workers": settings.api_workers,
        "log_level": os.environ.get("TD_LOG_LEVEL", "info").lower(),
    }
    try:
        if settings.api_workers == 1:
            uvicorn.run("service.app:create_app", **options)
        else:
            from uvicorn.supervisors import Multiprocess

            from service.server import NoDelayConfig

            config = NoDelayConfig("service.app:create_app", **options)
            Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        if multiprocess_dir is not None:
            shutil.rmtree(multiprocess_dir, ignore_errors=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.worker import serve

    settings = _settings(worker_metrics_port=args.metrics_port)
    if args.model not in settings.models:
        print(
            f"tdserve worker: {args.model!r} is not in TD_MODELS ({','.join(settings.models)})",
            file=sys.stderr,
        )
        return 2
    return serve(settings, args.model, name=args.name)


def cmd_submit(args: argparse.Namespace) -> int:
    from service.client import APIError, Client, JobFailed
    from service.schemas import JobPublic

    settings = _settings()
    url = args.url or f"http://{settings.api_host}:{settings.api_port}"
    bar = ProgressBar()

    def progress(job: JobPublic) -> None:
        if job.status.value == "queued":
            position = "" if job.queue_position is None else f" (position {job.queue_position})"
            bar.update(0, f"queued{position}")
        else:
            eta = "" if job.eta_seconds is None else f" eta {job.eta_seconds:.0f}s"
            bar.update(job.progress, f"{job.stage}{eta}")

    params = {
        "num_frames": args.frames,
        "steps": args.steps,
        "seed": args.seed,
        "size": args.size,
        "aspect_ratio": args.aspect_ratio,
        "sigma_max": args.sigma_max,
        "ode": args.ode or None,
    }
    try:
        with Client(url, api_key=args.api_key) as client:
            job = client.generate(
                args.prompt, args.output, model=args.model, image=args.image, progress=progress, **params
            )
    except (APIError, JobFailed) as e:
        bar.close()
        print(f"tdserve submit: {e}", file=sys.stderr)
        return 1
    bar.close()
    print(f"job {job.id}: wrote {args.output} ({job.num_frames} frames, seed {job.seed})", file=sys.stderr)
    print("  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in job.timings.items()), file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Offline W8A8 quantizer: float DiT file → `-quant` file (int8 weights, 128×128 fp32 scales, metadata)."""
    from engine.checkpoint import CheckpointError
    from engine.quantize import quantize_checkpoint

    start = time.perf_counter()
    try:
        metadata = quantize_checkpoint(args.input, args.output, device=args.device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"tdserve quantize: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({metadata.to_strings()}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Print a new API key (for the client) and its digest (for TD_API_KEYS), or a webhook secret."""
    if args.webhook:
        from service.webhooks import new_webhook_secret

        print(f"TD_WEBHOOK_SECRET={new_webhook_secret()}")
        return 0
    from service.auth import key_digest, new_api_key

    api_key = new_api_key()
    print(f"API key (give it to the client, it is shown once): {api_key}")
    print(f"TD_API_KEYS entry (the server stores only this):   {key_digest(api_key)}")
    return 0


def cmd_openapi(_args: argparse.Namespace) -> int:
    import yaml

    from service.app import create_app
    from service.settings import Settings

    # The document must not depend on the local environment: build it from the defaults.
    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    sys.stdout.write(yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=120))
    return 0


# --- tdserve run: the whole stack ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Redis if none answers, the API, one worker per model; Ctrl-C (or SIGTERM) stops everything."""
    settings = _settings(
        api_host=args.host, api_port=args.port, models=args.models.split(",") if args.models else None
    )
    env = {
        **os.environ,
        "TD_REDIS_URL": settings.redis_url,
        "TD_MODELS": ",".join(settings.models),
        "TD_STORAGE_DIR": str(settings.storage_dir),
        "TD_API_HOST": settings.api_host,
        "TD_API_PORT": str(settings.api_port),
    }
    if not settings.api_keys and settings.environment == "local":
        # `tdserve run` is the zero-config local stack: no keys means no key required, said out loud.
        env["TD_AUTH_DISABLED"] = "true"
        log.warning("tdserve run: no TD_API_KEYS, so the API requires no key (local mode)")
    if settings.torch_threads is None and not _has_cuda_hint(settings):
        # CPU workers share the cores instead of each spinning one thread per core.
        env["TD_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(settings.models)))
    # The workers of one host cannot all take the default metrics port.
    explicit_metrics_port = (
        "worker_metrics_port" in settings.model_fields_set and settings.worker_metrics_port > 0
    )
    stack = Stack(env)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not _redis_answers(settings.redis_url):
            stack.start_redis(settings.redis_url, settings.storage_dir / ".redis")
        stack.start("api", ["api"])
        for index, model in enumerate(settings.models):
            # One metrics port each: TD_WORKER_METRICS_PORT + index when set, else free ports (see /readyz).
            port = settings.worker_metrics_port + index if explicit_metrics_port else 0
            stack.start(f"worker {model}", ["worker", "--model", model, "--metrics-port", str(port)])
        log.info(
            "tdserve: API on http://%s:%d, workers for %s (Ctrl-C stops)",
            settings.api_host,
            settings.api_port,
            ", ".join(settings.models),
        )
        while not stopping:
            if not stack.supervise():
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop(grace_s=settings.worker_stop_grace_s + 10)


def _has_cuda_hint(settings: Any) -> bool:
    if settings.device is not None:
        return str(settings.device).startswith("cuda")
    return shutil.which("nvidia-smi") is not None


def _redis_answers(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


class Stack:
    """The child processes of `tdserve run`, each in its own session so a terminal's Ctrl-C reaches only
    this supervisor, which then stops each child exactly once (a second signal would be a cold stop)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: dict[str, tuple[list[str], subprocess.Popen[bytes]]] = {}
        self.restarts: dict[str, float] = {}
        self.redis: subprocess.Popen[bytes] | None = None

    def start(self, name: str, command: list[str]) -> None:
        argv = [sys.executable, "-m", "service.cli", *command]
        self.children[name] = (command, subprocess.Popen(argv, env=self.env, start_new_session=True))

    def start_redis(self, url: str, data_dir: Path) -> None:
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"tdserve run: Redis at {url} does not answer (only a local one is started)")
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("tdserve run: no Redis answers and redis-server is not installed")
        data_dir.mkdir(parents=True, exist_ok=True)
        # appendonly: queued jobs survive a restart of the stack; noeviction: never drop a job silently.
        self.redis = subprocess.Popen(
            [
                server,
                "--bind",
                host,
                "--port",
                str(port),
                "--dir",
                str(data_dir.resolve()),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(100):
            if _redis_answers(url):
                log.info("tdserve: started redis-server on %s:%d (data in %s)", host, port, data_dir)
                return
            time.sleep(0.1)
        raise SystemExit("tdserve run: redis-server did not come up")

    def supervise(self) -> bool:
        """Restart workers that died (not those whose setup failed); False when the API died."""
        from service.worker import EXIT_SETUP_FAILED

        for name, (command, process) in list(self.children.items()):
            code = process.poll()
            if code is None:
                continue
            if name == "api":
                log.error("tdserve: the API exited with %s", code)
                return False
            if code == EXIT_SETUP_FAILED:
                log.error("tdserve: %s could not load its model; not restarting it", name)
                del self.children[name]
                continue
            # At most one restart every 5 s per worker, so a crash loop does not spin.
            if time.monotonic() - self.restarts.get(name, 0.0) >= 5:
                log.warning("tdserve: %s exited with %s; restarting it", name, code)
                self.restarts[name] = time.monotonic()
                self.start(name, command)
        return True

    def stop(self, grace_s: float) -> None:
        processes = [process for _, process in self.children.values()]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.redis is not None:
            self.redis.send_signal(signal.SIGTERM)
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()


if __name__ == "__main__":
    sys.exit(main())
