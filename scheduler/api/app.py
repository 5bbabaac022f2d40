"""create_app: the FastAPI application, wired to a JobService on the configured queue."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from urllib.parse import quote
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from facegate.settings import Settings
from scheduler.api.deps import Services
from scheduler.api.limits import RequestSizeLimit
from scheduler.api.problems import install_problem_handlers
from scheduler.api.routers import (
    audit,
    authorisations,
    crops,
    erasure,
    galleries,
    health,
    jobs,
    reviews,
    synchronous,
    webhooks,
)
from scheduler.console import router as console
from scheduler.console.sessions import SessionStore
from scheduler.dispatch import TaskQueue
from scheduler.galleries import GalleryService
from scheduler.keys import KeyStore
from scheduler.users import UserStore
from scheduler.metrics import registry_for
from scheduler.service import JobService
from scheduler.webhooks import WebhookDeliverer

log = logging.getLogger(__name__)

DESCRIPTION = """Face search with a moratorium policy enforced by software.

Authenticate with your organisation's API key in the `X-API-Key` header (machines), or as a named
user with HTTP Basic (people: a user acts within its roles). Every job passes the policy
gate before it is queued (a denial is a 403 problem with the registry's reason) and again in the worker.
Errors are RFC 9457 problem details (`application/problem+json`)."""


DOCS_ASSETS = "/docs-assets"


def _serve_docs_locally(app: FastAPI) -> None:
    """/docs from Swagger UI's files as the swagger-ui-bundle package ships them: no CDN, works offline
    (FastAPI's own recipe for self-hosted docs)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="FaceGate API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def create_app(settings: Settings, queue: TaskQueue | None, *, collect_every_s: float | None = 2.0) -> FastAPI:
    jobs_service = JobService(settings, queue)
    # With the audit log: failed sign-ins (HTTP Basic, the console) are recorded.
    users = UserStore(settings.resolved_database_url, jobs_service.audit)
    services = Services(settings=settings, jobs=jobs_service, galleries=GalleryService(jobs_service),
                        keys=KeyStore(settings.resolved_database_url),
                        users=users,
                        sessions=SessionStore(settings.resolved_database_url, users,
                                              timedelta(minutes=settings.console_session_minutes)))
    stop = threading.Event()
    # A finished job's callback: its view, as GET /v1/jobs/{id} gives it, signed (scheduler/webhooks.py).
    deliverer = WebhookDeliverer(settings, jobs_service.audit,
                                 lambda job_id: jobs.job_out(jobs_service.get(job_id)).model_dump(mode="json"))

    def collect_forever() -> None:
        # Jobs finish and get audited even when no client polls them, and heal (lost chunks re-sent) even
        # where no beat runs: the embedded `facegate api` has none.
        next_reconcile = time.monotonic() + settings.reconcile_interval_s
        while not stop.wait(collect_every_s):
            try:
                jobs_service.refresh_unfinished()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + settings.reconcile_interval_s
                    jobs_service.reconcile()
            except Exception as exc:  # noqa: BLE001 -- a broker hiccup must not end the collector
                log.warning("collecting finished chunks failed (%s); trying again", exc)
            try:
                deliverer.deliver_due()
            except Exception as exc:  # noqa: BLE001 -- nor a database hiccup while delivering webhooks
                log.warning("delivering webhooks failed (%s); trying again", exc)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        thread = None
        if queue is not None and collect_every_s:
            thread = threading.Thread(target=collect_forever, name="facegate-collector", daemon=True)
            thread.start()
        yield
        stop.set()
        if thread is not None:
            thread.join(timeout=10)

    # The multipart parser's own file count limit follows FACEGATE_MAX_UPLOAD_FILES (its default is 1000).
    app = FastAPI(title="FaceGate", version="1.0", description=DESCRIPTION, lifespan=lifespan,
                  form_limits={"max_files": settings.max_upload_files, "max_fields": 100},
                  docs_url=None, redoc_url=None)
    _serve_docs_locally(app)
    app.state.services = services
    app.state.webhooks = deliverer
    app.state.metrics = registry_for(settings.resolved_database_url)
    install_problem_handlers(app)
    for router in (jobs.router, crops.router, galleries.router, erasure.router, reviews.router, audit.router,
                   health.router, authorisations.router, webhooks.router, synchronous.router):
        app.include_router(router)
    # The console: its pages at /, its own script and style (no CDN) under /console/static.
    app.include_router(console.router)
    app.mount("/console/static", StaticFiles(directory=console.STATIC), name="console-static")

    @app.exception_handler(console.SignInRequired)
    async def _sign_in_first(_request: Request, exc: console.SignInRequired) -> RedirectResponse:
        return RedirectResponse("/sign-in?next=" + quote(exc.next_path, safe="/"), status_code=303)

    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    return app
