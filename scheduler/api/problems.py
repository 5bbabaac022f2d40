"""Errors as RFC 9457 problem details (application/problem+json), with a message a person understands."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_TYPE_BASE = "https://facegate.example/problems/"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, *, kind: str | None = None, headers: dict | None = None,
                 **extra: object) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers
        self.extra = extra


def problem_response(request: Request, status: int, title: str, detail: str, kind: str,
                     headers: dict | None = None, **extra: object) -> JSONResponse:
    body = {"type": PROBLEM_TYPE_BASE + kind, "title": title, "status": status, "detail": detail,
            "instance": request.url.path, **extra}
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    from scheduler.access import AccessRefused, GalleryHidden
    from facegate.db import DatabaseUnavailable
    from scheduler.dispatch import BROKER_ERRORS
    from scheduler.galleries import GalleryExists
    from scheduler.service import JobDenied, JobNotFound, JobRefused

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, exc.kind, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")} for e in exc.errors()]
        detail = "; ".join(f"{e['where']}: {e['problem']}" for e in errors) or "the request is not valid"
        return problem_response(request, 422, "Invalid request", detail, "invalid-request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail.startswith(("Too many files", "Too many fields")):
            # The multipart parser's own count limit (raised with FACEGATE_MAX_UPLOAD_FILES): too large.
            return problem_response(request, 413, "Too many files", detail, "too-large")
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return problem_response(request, exc.status_code, title, detail, title.lower().replace(" ", "-"))

    @app.exception_handler(JobDenied)
    async def _denied(request: Request, exc: JobDenied) -> JSONResponse:
        view = exc.view
        return problem_response(request, 403, "Denied by policy", view.decision_reason or "denied", "policy-denied",
                                job_id=view.id, rule_ids=view.decision_rule_ids, registry_hash=view.registry_hash)

    @app.exception_handler(JobRefused)
    async def _refused(request: Request, exc: JobRefused) -> JSONResponse:
        return problem_response(request, 422, "Request refused", str(exc), "request-refused")

    @app.exception_handler(AccessRefused)
    async def _access_refused(request: Request, exc: AccessRefused) -> JSONResponse:
        access = exc.access
        return problem_response(request, 403, "Refused", access.reason, "access-refused", rule_ids=access.rule_ids,
                                registry_hash=access.registry_hash)

    @app.exception_handler(JobNotFound)
    @app.exception_handler(GalleryHidden)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, 404, "Not found", str(exc).strip("'\""), "not-found")

    from scheduler.crops import CropGone

    @app.exception_handler(CropGone)
    async def _gone(request: Request, exc: CropGone) -> JSONResponse:
        return problem_response(request, 410, "Gone", str(exc), "gone")

    from scheduler.authorisations import AuthorisationError, AuthorisationNotFound

    @app.exception_handler(AuthorisationNotFound)
    async def _no_authorisation(request: Request, exc: AuthorisationNotFound) -> JSONResponse:
        return problem_response(request, 404, "Not found", str(exc), "not-found")

    @app.exception_handler(AuthorisationError)
    async def _bad_authorisation(request: Request, exc: AuthorisationError) -> JSONResponse:
        return problem_response(request, 422, "Request refused", str(exc), "request-refused")

    @app.exception_handler(DatabaseUnavailable)
    async def _database(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return problem_response(request, 503, "Service unavailable", str(exc), "database-unavailable",
                                {"Retry-After": "30"})

    async def _broker(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, 503, "Service unavailable", f"the job queue's broker is not reachable: "
                                f"{exc}", "broker-unavailable", {"Retry-After": "30"})

    for broker_error in BROKER_ERRORS:
        app.add_exception_handler(broker_error, _broker)

    from scheduler.idempotency import IdempotencyError
    from scheduler.webhooks import WebhookRefused

    @app.exception_handler(IdempotencyError)
    async def _idempotency(request: Request, exc: IdempotencyError) -> JSONResponse:
        title = "Conflict" if exc.status == 409 else "Idempotency key reused"
        return problem_response(request, exc.status, title, str(exc),
                                "conflict" if exc.status == 409 else "idempotency-key-reused")

    @app.exception_handler(WebhookRefused)
    async def _webhook(request: Request, exc: WebhookRefused) -> JSONResponse:
        return problem_response(request, 422, "Request refused", str(exc), "callback-refused")

    from scheduler.galleries import StoreNotShared

    @app.exception_handler(StoreNotShared)
    async def _store_not_shared(request: Request, exc: StoreNotShared) -> JSONResponse:
        return problem_response(request, 503, "Store not shared", str(exc), "store-not-shared")

    @app.exception_handler(GalleryExists)
    async def _exists(request: Request, exc: GalleryExists) -> JSONResponse:
        return problem_response(request, 409, "Conflict", str(exc), "conflict")
