"""Route dependencies as `Annotated` aliases: settings, the job store, the API key, request bodies.

Authentication is written once, here (`ApiKeyDep`): with `TD_API_KEYS` set, every /v1 route needs
`Authorization: Bearer <key>`. The value a route receives is the caller's scope (a digest of the key), which
scopes Idempotency-Keys per client; per-key limits and quotas hang off the same dependency.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.auth import authenticate
from service.limits import PayloadTooLarge, RateLimiter
from service.queue import InvalidField, Jobs
from service.schemas import GenerateRequest, VideoCreateRequest
from service.settings import Settings


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with (`create_app` keeps them on app.state). Not a dependency
    override of get_settings: FastAPI re-analyses an override's signature on every request (~0.5 ms).
    `async` only so that FastAPI calls it in the event loop instead of a threadpool hop (as for get_jobs)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]

Body = TypeVar("Body", bound=BaseModel)

# Form fields whose value is an object: multipart carries them as JSON text.
_JSON_FORM_FIELDS = ("metadata", "input_reference")
# Room for the multipart framing and the text fields around an image of max_upload_bytes.
_FORM_OVERHEAD_BYTES = 64 * 1024


async def get_jobs(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]

_bearer = HTTPBearer(auto_error=False, description="An API key from TD_API_KEYS (when keys are configured).")


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's scope (service/auth.py), counted against its rate (service/limits.py); 401 when keys are
    configured and the request has none of them, 429 over the rate."""
    scope = authenticate(settings, None if credentials is None else credentials.credentials)
    limiter: RateLimiter = request.app.state.rate_limiter
    await limiter.check(scope)
    return scope


ApiKeyDep = Annotated[str, Depends(require_api_key)]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Same key and body → the same job; same key, different body → 409.",
    ),
]


class UnsupportedMediaType(Exception):
    def __init__(self, content_type: str) -> None:
        super().__init__(f"content type {content_type!r} is not application/json or multipart/form-data")


def _validation_errors(error: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors as FastAPI reports body errors (loc starts with "body", context made JSON-safe)."""
    errors = []
    for item in error.errors(include_url=False):
        entry: dict[str, Any] = {
            "type": item["type"],
            "loc": ("body", *item["loc"]),
            "msg": item["msg"],
            "input": item.get("input"),
        }
        if "ctx" in item:
            entry["ctx"] = {
                k: v if isinstance(v, int | float | str) else str(v) for k, v in item["ctx"].items()
            }
        errors.append(entry)
    return errors


async def read_body(
    request: Request, model: type[Body], file_field: str, settings: Settings
) -> tuple[Body, bytes | None]:
    """Parse a JSON body, or a multipart form whose one file part is `file_field`, into `model`.

    The declared Content-Length is checked before anything is read, and the file part is read in chunks up
    to the limit, so an oversized upload is refused without being held in memory.
    """
    limit = settings.max_upload_bytes + _FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    upload: bytes | None = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        data: dict[str, Any] = {}
        async with request.form(max_files=1, max_fields=64) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != file_field:
                        raise InvalidField(
                            name, f"{name} cannot be a file; only {file_field} is uploaded as one"
                        )
                    upload = await _read_limited(value, settings.max_upload_bytes, file_field)
                elif name in _JSON_FORM_FIELDS:
                    try:
                        data[name] = json.loads(value)
                    except json.JSONDecodeError:
                        raise InvalidField(name, f"{name} must be a JSON object in a form field") from None
                else:
                    data[name] = value
    elif content_type == "application/json":
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(limit)
        try:
            # Bytes that are not UTF-8 become lone surrogates, which the schema's string validation refuses
            # naming the field they sit in, instead of a decode error about the whole body.
            data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", 0),
                        "msg": f"JSON decode error: {e}",
                        "input": None,
                    }
                ]
            ) from None
        if not isinstance(data, dict):
            raise RequestValidationError(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": ("body",),
                        "msg": "the body must be a JSON object",
                        "input": None,
                    }
                ]
            )
    else:
        raise UnsupportedMediaType(content_type)
    try:
        return model.model_validate(data), upload
    except ValidationError as e:
        raise RequestValidationError(_validation_errors(e)) from None


async def _read_limited(upload: UploadFile, limit: int, field: str) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    if not size:
        raise InvalidField(field, f"{field} is an empty file")
    return b"".join(chunks)


async def generate_body(request: Request, settings: SettingsDep) -> tuple[GenerateRequest, bytes | None]:
    return await read_body(request, GenerateRequest, "image", settings)


async def video_body(request: Request, settings: SettingsDep) -> tuple[VideoCreateRequest, bytes | None]:
    return await read_body(request, VideoCreateRequest, "input_reference", settings)


GenerateBody = Annotated[tuple[GenerateRequest, bytes | None], Depends(generate_body)]
VideoBody = Annotated[tuple[VideoCreateRequest, bytes | None], Depends(video_body)]
