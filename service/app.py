"""FastAPI application factory: routers, error mapping, the janitor thread, the OpenAPI document.

Run with `tdserve api` (uvicorn, factory mode). `openapi.yaml` at the repository root is this app's schema
(`tdserve openapi > openapi.yaml`); a test fails when the two drift.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import limits
from service.auth import check_auth_configured
from service.deps import UnsupportedMediaType
from service.limits import PayloadTooLarge, RateLimiter
from service.metrics import HttpMetricsMiddleware, init_job_series
from service.queue import InvalidField, JobConflict, JobNotFound, Jobs, QueueFull
from service.routes import generate, health, jobs, models, videos, webhooks
from service.schemas import GenerateRequest, VideoCreateRequest
from service.settings import Settings, get_settings
from service.webhooks import WebhookDispatcher

log = logging.getLogger("tdserve.api")

try:
    VERSION = version("tdserve")
except PackageNotFoundError:
    VERSION = "0.0.0"

DESCRIPTION = (
    "TurboDiffusion video generation: submit a prompt (and a first frame for image-to-video), poll the job, "
    "download the MP4. `/v1/generate` + `/v1/jobs` are the native routes; `/v1/videos` speaks the OpenAI "
    "Videos API, so the official `openai` SDK works unchanged."
)

# Request bodies parsed by the routes themselves (JSON or multipart), documented here: (model, file field).
MULTIPART_BODIES: tuple[tuple[type[BaseModel], str], ...] = (
    (GenerateRequest, "image"),
    (VideoCreateRequest, "input_reference"),
)


class Janitor:
    """A daemon thread running `Jobs.janitor_pass` every `janitor_interval_s` (one replica at a time)."""

    def __init__(self, jobs: Jobs, interval_s: float) -> None:
        self.jobs = jobs
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.jobs.janitor_pass()
            except RedisError as e:
                log.warning("janitor: Redis unavailable (%s)", e)
            except Exception:
                log.exception("janitor pass failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_auth_configured(settings)
        if not settings.api_keys:
            log.warning("TD_AUTH_DISABLED: the API accepts requests without a key (local use only)")
        app.state.jobs = Jobs.from_settings(settings)
        app.state.rate_limiter = RateLimiter(settings)  # what require_api_key counts with (service/deps.py)
        janitor = Janitor(app.state.jobs, settings.janitor_interval_s)
        janitor.start()
        dispatcher = WebhookDispatcher(app.state.jobs, settings)
        dispatcher.start()
        yield
        dispatcher.stop()
        janitor.stop()
        await app.state.rate_limiter.aclose()

    app = FastAPI(
        title="tdserve",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings  # what SettingsDep hands the routes (service/deps.py)
    for module in (generate, jobs, videos, webhooks, models, health):
        app.include_router(module.router)
    limits.install(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Location", "openai-poll-after-ms", "Retry-After"],
        )
    # Outermost, so that it times every request, CORS preflights included.
    app.add_middleware(HttpMetricsMiddleware)
    init_job_series(settings.models)
    _add_error_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _operation_id(route: APIRoute) -> str:
    """Operation ids read `tag-name` (clean generated clients)."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model, file_field in MULTIPART_BODIES:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in body.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = body
        form_name = model.__name__.removesuffix("Request") + "Form"
        components[form_name] = _form_schema(body, file_field, form_name)
    return schema


def _form_schema(body: dict[str, Any], file_field: str, title: str) -> dict[str, Any]:
    """The multipart version of a JSON body schema: the image is a file part, objects are JSON text."""
    form = copy.deepcopy(body)
    form["title"] = title
    form.pop("examples", None)
    for name, prop in form["properties"].items():
        if name == file_field:
            form["properties"][name] = {
                "type": "string",
                "format": "binary",
                "title": prop.get("title", name),
                "description": "The I2V first frame (PNG, JPEG or WebP file).",
            }
        elif name in ("metadata", "input_reference"):
            form["properties"][name] = {
                "type": "string",
                "contentMediaType": "application/json",
                "title": prop.get("title", name),
                "description": "A JSON object.",
            }
    return form


def _error(
    status: int,
    code: str,
    message: str,
    detail: Any,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {
        "detail": jsonable_encoder(detail),
        "error": {"message": message, "type": error_type, "code": code, "param": param},
    }
    return _EscapedJSONResponse(body, status_code=status, headers=headers)


class _EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may echo client text holding lone surrogates (bytes that were
    not UTF-8), which cannot be encoded as UTF-8 but can be written as \\u escapes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(part) for part in first["loc"][1:]) or None
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        return _error(422, "invalid_request", message, errors, param=field)

    @app.exception_handler(InvalidField)
    async def invalid_field(_request: Request, exc: InvalidField) -> JSONResponse:
        detail = [{"type": "value_error", "loc": ["body", exc.field], "msg": exc.message, "input": exc.value}]
        return _error(422, "invalid_request", f"{exc.field}: {exc.message}", detail, param=exc.field)

    @app.exception_handler(JobNotFound)
    async def not_found(_request: Request, exc: JobNotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc), str(exc))

    @app.exception_handler(JobConflict)
    async def conflict(_request: Request, exc: JobConflict) -> JSONResponse:
        return _error(409, "conflict", str(exc), str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, "queue_full", str(exc), str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(PayloadTooLarge)
    async def too_large(_request: Request, exc: PayloadTooLarge) -> JSONResponse:
        return _error(413, "payload_too_large", str(exc), str(exc))

    @app.exception_handler(UnsupportedMediaType)
    async def unsupported(_request: Request, exc: UnsupportedMediaType) -> JSONResponse:
        return _error(415, "unsupported_media_type", str(exc), str(exc))

    @app.exception_handler(RedisError)
    async def redis_down(_request: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        message = "the job store is unavailable; retry shortly"
        return _error(503, "unavailable", message, message, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return _error(
            exc.status_code,
            code,
            str(exc.detail),
            exc.detail,
            headers=dict(exc.headers) if exc.headers else None,
        )
