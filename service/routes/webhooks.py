from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter

from service.deps import ApiKeyDep, JobsDep
from service.routes.common import errors
from service.schemas import WebhookDeliveryPublic
from service.webhooks import delivery_public

router = APIRouter(prefix="/v1/jobs", tags=["webhooks"])


@router.get(
    "/{job_id}/webhook", response_model=WebhookDeliveryPublic, responses=errors(401, 404, 422, 429, 503)
)
def get_webhook_delivery(job_id: UUID, jobs: JobsDep, scope: ApiKeyDep) -> WebhookDeliveryPublic:
    """The webhook delivery of a job: message id, status, attempts, last answer (404 without webhook_url)."""
    jobs.get(str(job_id), scope=scope)  # another key's job: 404, as if it did not exist
    return delivery_public(jobs, str(job_id))
