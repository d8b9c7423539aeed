from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service.deps import ApiKeyDep, GenerateBody, IdempotencyKey, JobsDep, SettingsDep
from service.limits import submit_job
from service.queue import Jobs, submission_from_generate
from service.routes.common import errors, request_body
from service.schemas import GenerateRequest, JobPublic
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post(
    "/generate",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=request_body("GenerateRequest", "GenerateForm"),
    responses=errors(400, 401, 409, 413, 415, 422, 429, 503),  # 400: malformed multipart
)
async def generate(
    body: GenerateBody,
    jobs: JobsDep,
    settings: SettingsDep,
    scope: ApiKeyDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Submit a generation job (JSON, or multipart with the I2V first frame as the `image` file part)."""
    request, upload = body
    # The blocking part in one threadpool hop: for a sync route FastAPI takes a second one to validate the reply.
    job, replayed = await run_in_threadpool(_submit, jobs, settings, request, upload, idempotency_key, scope)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job


def _submit(
    jobs: Jobs,
    settings: Settings,
    request: GenerateRequest,
    upload: bytes | None,
    idempotency_key: str | None,
    scope: str,
) -> tuple[JobPublic, bool]:
    """Image checks, the submission and the reply's queue position and ETA (Redis)."""
    submission = submission_from_generate(settings, request, upload)
    record, replayed, view = submit_job(jobs, submission, idempotency_key=idempotency_key, scope=scope)
    return jobs.to_job_public(record, view), replayed
