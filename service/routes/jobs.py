from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ApiKeyDep, JobsDep, SettingsDep
from service.routes.common import VIDEO_RESPONSE, errors, video_response
from service.schemas import JobPublic, JobsPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", response_model=JobsPublic, responses=errors(401, 422, 503))
def list_jobs(
    jobs: JobsDep,
    scope: ApiKeyDep,
    after: Annotated[UUID | None, Query(description="Id of the last job of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobsPublic:
    """List the caller's jobs (those its API key created), newest first."""
    records, has_more = jobs.page(after=None if after is None else str(after), limit=limit, scope=scope)
    data = [jobs.to_job_public(record) for record in records]
    return JobsPublic(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}", response_model=JobPublic, responses=errors(401, 404, 422, 503))
async def get_job(job_id: UUID, jobs: JobsDep, scope: ApiKeyDep, response: Response) -> JobPublic:
    """Status, stage, progress, queue position, ETA and timings of a job."""
    # One threadpool hop for Redis (a sync route takes a second one to validate the reply).
    job = await run_in_threadpool(lambda: jobs.to_job_public(jobs.get(str(job_id), scope=scope)))
    response.headers["openai-poll-after-ms"] = str(jobs.poll_after_ms(job.eta_seconds))
    return job


@router.get(
    "/{job_id}/video",
    response_class=FileResponse,
    responses={**VIDEO_RESPONSE, **errors(401, 404, 409, 416, 422, 503)},
)
def get_video(job_id: UUID, jobs: JobsDep, settings: SettingsDep, scope: ApiKeyDep) -> FileResponse:
    """Download the MP4 of a completed job (Range requests answer 206)."""
    record, video = jobs.video(str(job_id), scope=scope)
    return video_response(record.id, video, settings.result_ttl_s)


@router.head("/{job_id}/video", response_class=FileResponse, responses=errors(401, 404, 409, 422, 503))
def head_video(job_id: UUID, jobs: JobsDep, settings: SettingsDep, scope: ApiKeyDep) -> FileResponse:
    """Headers of the MP4 (size, ETag, Accept-Ranges) without its bytes."""
    record, video = jobs.video(str(job_id), scope=scope)
    return video_response(record.id, video, settings.result_ttl_s)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=errors(401, 404, 409, 422, 503))
def cancel_job(job_id: UUID, jobs: JobsDep, scope: ApiKeyDep) -> JobPublic:
    """Cancel a job: a queued one leaves the queue, a running one stops at its next step."""
    return jobs.to_job_public(jobs.cancel(str(job_id), scope=scope))


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=errors(401, 404, 422, 503))
def delete_job(job_id: UUID, jobs: JobsDep, scope: ApiKeyDep) -> Response:
    """Delete a job and its files (a running job is canceled first)."""
    jobs.delete(str(job_id), scope=scope)
    return Response(status_code=204)
