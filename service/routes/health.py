from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.deps import JobsDep
from service.metrics import api_exposition
from service.schemas import HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """Liveness: the API process answers."""
    return HealthPublic()


@router.get("/readyz", response_model=ReadyPublic, responses={503: {"model": ReadyPublic}})
def readyz(jobs: JobsDep) -> JSONResponse:
    """Readiness: Redis answers and at least one worker is READY or BUSY (else 503)."""
    body = jobs.readiness()
    headers = {} if body.redis else {"Retry-After": "5"}
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503, headers=headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format 0.0.4.",
        }
    },
)
def metrics(jobs: JobsDep) -> Response:
    """Prometheus metrics (text format): HTTP latency, job outcomes, queue gauges read from Redis."""
    body, content_type = api_exposition(jobs)
    return Response(body, media_type=content_type)
