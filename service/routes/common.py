"""Pieces the routers share: the multipart/JSON request-body documentation, error responses, MP4 responses."""

from __future__ import annotations

from typing import Any

from fastapi.responses import FileResponse

from service.schemas import ErrorPublic
from service.storage import VideoFile


def request_body(json_schema: str, form_schema: str) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its body itself: JSON, or multipart with a file part."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_schema}"}},
                "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{form_schema}"}},
            },
        }
    }


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Bad request",
        401: "Missing or unknown API key",
        404: "Unknown id",
        409: "Conflict with the job's state or an Idempotency-Key",
        413: "Body too large",
        415: "Unsupported content type",
        416: "Range not satisfiable",
        422: "Invalid field (named in the body)",
        429: "Queue full, per-key rate limit or job quota; retry after Retry-After seconds",
        503: "Redis unavailable; retry after Retry-After",
    }
    if 401 in codes:  # a keyed route is also under the key's rate limit (service/limits.py)
        codes = tuple(sorted({*codes, 429}))
    return {code: {"model": ErrorPublic, "description": descriptions[code]} for code in codes}


VIDEO_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The MP4 (H.264, yuv420p, faststart).",
    },
    206: {
        "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The requested byte range (Range: bytes=a-b).",
    },
}


def video_response(job_id: str, video: VideoFile, result_ttl_s: int) -> FileResponse:
    """The MP4 with a content ETag; Starlette's FileResponse serves HEAD, Range (206/416) and If-Range."""
    return FileResponse(
        video.path,
        media_type="video/mp4",
        filename=f"{job_id}.mp4",
        content_disposition_type="inline",
        headers={"etag": f'"{video.sha256}"', "cache-control": f"private, max-age={result_ttl_s}"},
    )
