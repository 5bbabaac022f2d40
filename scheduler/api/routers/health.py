"""Health and metrics: unauthenticated, for load balancers and Prometheus on the private network."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from facegate.db import engine_for
from scheduler.api.deps import ServicesDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def health(svc: ServicesDep) -> dict:
    with engine_for(svc.settings.resolved_database_url).connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
