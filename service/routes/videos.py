"""OpenAI Videos API (`client.videos.create/retrieve/list/download_content/delete` work unchanged)."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ApiKeyDep, IdempotencyKey, JobsDep, SettingsDep, VideoBody
from service.limits import submit_job
from service.queue import Jobs, submission_from_video
from service.routes.common import VIDEO_RESPONSE, errors, request_body, video_response
from service.schemas import VideoCreateRequest, VideoDeleted, VideoPublic, VideosPublic
from service.settings import Settings

router = APIRouter(prefix="/v1/videos", tags=["videos"])


@router.post(
    "",
    status_code=202,
    response_model=VideoPublic,
    openapi_extra=request_body("VideoCreateRequest", "VideoCreateForm"),
    responses=errors(400, 401, 409, 413, 415, 422, 429, 503),  # 400: malformed multipart
)
async def create_video(
    body: VideoBody,
    jobs: JobsDep,
    settings: SettingsDep,
    scope: ApiKeyDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> VideoPublic:
    """Create a video (OpenAI `videos.create`; multipart with `input_reference` as a file, or JSON)."""
    request, upload = body
    # The blocking part in one threadpool hop: for a sync route FastAPI takes a second one to validate the reply.
    video, replayed = await run_in_threadpool(
        _create, jobs, settings, request, upload, idempotency_key, scope
    )
    response.headers["Location"] = f"/v1/videos/{video.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return video


def _create(
    jobs: Jobs,
    settings: Settings,
    request: VideoCreateRequest,
    upload: bytes | None,
    idempotency_key: str | None,
    scope: str,
) -> tuple[VideoPublic, bool]:
    """Image checks, the submission and the reply's queue position and ETA (Redis)."""
    submission = submission_from_video(settings, request, upload)
    record, replayed, view = submit_job(jobs, submission, idempotency_key=idempotency_key, scope=scope)
    return jobs.to_video_public(record, view), replayed


@router.get("", response_model=VideosPublic, responses=errors(401, 422, 503))
def list_videos(
    jobs: JobsDep,
    scope: ApiKeyDep,
    after: Annotated[UUID | None, Query(description="Id of the last video of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> VideosPublic:
    """List the caller's videos (those its API key created) by creation time (OpenAI cursor page)."""
    records, has_more = jobs.page(
        after=None if after is None else str(after), limit=limit, order=order, scope=scope
    )
    data = [jobs.to_video_public(record) for record in records]
    return VideosPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{video_id}", response_model=VideoPublic, responses=errors(401, 404, 422, 503))
async def retrieve_video(video_id: UUID, jobs: JobsDep, scope: ApiKeyDep, response: Response) -> VideoPublic:
    """The video object; `openai-poll-after-ms` tells pollers when to ask again."""
    # One threadpool hop for Redis (a sync route takes a second one to validate the reply).
    video = await run_in_threadpool(lambda: jobs.to_video_public(jobs.get(str(video_id), scope=scope)))
    response.headers["openai-poll-after-ms"] = str(jobs.poll_after_ms(video.eta_seconds))
    return video


@router.get(
    "/{video_id}/content",
    response_class=FileResponse,
    responses={**VIDEO_RESPONSE, **errors(401, 404, 409, 416, 422, 503)},
)
def download_video(
    video_id: UUID,
    jobs: JobsDep,
    settings: SettingsDep,
    scope: ApiKeyDep,
    _variant: Annotated[
        Literal["video"],
        Query(alias="variant", description="Only `video` is produced (no thumbnail or spritesheet)."),
    ] = "video",
) -> FileResponse:
    """Download the MP4 (OpenAI `download_content`; Range requests answer 206)."""
    record, video = jobs.video(str(video_id), scope=scope)
    return video_response(record.id, video, settings.result_ttl_s)


@router.post("/{video_id}/cancel", response_model=VideoPublic, responses=errors(401, 404, 409, 422, 503))
def cancel_video(video_id: UUID, jobs: JobsDep, scope: ApiKeyDep) -> VideoPublic:
    """Cancel a video job (extension: OpenAI has no cancel)."""
    return jobs.to_video_public(jobs.cancel(str(video_id), scope=scope))


@router.delete("/{video_id}", response_model=VideoDeleted, responses=errors(401, 404, 422, 503))
def delete_video(video_id: UUID, jobs: JobsDep, scope: ApiKeyDep) -> VideoDeleted:
    """Delete a video and its files (a running job is canceled first)."""
    jobs.delete(str(video_id), scope=scope)
    return VideoDeleted(id=str(video_id))
