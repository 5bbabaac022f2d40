"""/v1/webhooks: the organisation's webhook secret, which signs every callback of its jobs."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.webhooks import SIGNATURE_HEADER, create_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecretOut(BaseModel):
    organisation_id: str
    secret: str = Field(description="Shown this once: keep it to check the signature of every callback")
    header: str = SIGNATURE_HEADER
    scheme: str = "sha256=<hex HMAC-SHA256 of the request body, keyed by the secret>"


@router.post("/secret", status_code=status.HTTP_201_CREATED, response_model=WebhookSecretOut)
def new_secret(who: PrincipalDep, svc: ServicesDep) -> WebhookSecretOut:
    """Create (or replace) your organisation's webhook secret. Callbacks sent from now on are signed with it."""
    secret = create_secret(svc.settings.resolved_database_url, svc.jobs.audit, who.organisation_id, by=who.key_id,
                           by_user=who.user)
    return WebhookSecretOut(organisation_id=who.organisation_id, secret=secret)
