from __future__ import annotations

from fastapi import APIRouter

from service.deps import ApiKeyDep, JobsDep
from service.routes.common import errors
from service.schemas import ModelsPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsPublic, responses=errors(401, 503))
def list_models(jobs: JobsDep, _: ApiKeyDep) -> ModelsPublic:
    """Served models with their workers, queue depth, defaults and limits."""
    return jobs.models()
