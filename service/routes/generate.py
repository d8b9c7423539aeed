from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import ApiKeyDep, GenerateBody, IdempotencyKey, JobsDep, SettingsDep
from service.limits import submit_job
from service.queue import submission_from_generate
from service.routes.common import errors, request_body
from service.schemas import JobPublic

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post(
    "/generate",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=request_body("GenerateRequest", "GenerateForm"),
    responses=errors(400, 401, 409, 413, 415, 422, 429, 503),  # 400: malformed multipart
)
def generate(
    body: GenerateBody,
    jobs: JobsDep,
    settings: SettingsDep,
    scope: ApiKeyDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Submit a generation job (JSON, or multipart with the I2V first frame as the `image` file part)."""
    request, upload = body
    record, replayed = submit_job(
        jobs,
        submission_from_generate(settings, request, upload),
        idempotency_key=idempotency_key,
        scope=scope,
    )
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return jobs.to_job_public(record)
