"""The analyst's console: server-rendered pages (Jinja2) with a little script of its own, served at `/`.

Sign-in with a named user's credentials starts a server-side session (scheduler/console/sessions.py); its
cookie is HttpOnly and SameSite=Strict, and Secure over HTTPS. Every form carries the session's CSRF token
(the sign-in form a double-submit one) and a form posted without it is refused with 403. The pages read
through the same services as the API and the same access rule: another organisation's job is "not found",
also by URL; face crops are the API's crop endpoints, which the access rule decides and the audit log records.
Nothing is loaded from anywhere but this server (the Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Sequence
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from facegate.vocabulary import JobKind, ReviewDecision
from scheduler.access import AccessRefused, Action, GalleryHidden
from scheduler.api.deps import Services, services
from scheduler.audit_listing import AUDIT_FILTERS, AuditFilterError, audit_lines, audit_query, audit_rows
from scheduler.console.sessions import COOKIE, ConsoleSession
from scheduler.galleries import StoreNotShared
from scheduler.keys import AuthenticationError
from scheduler.reading import JobNotFound, JobRefused

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
SIGN_IN_CSRF_COOKIE = "facegate_sign_in_csrf"
PAGE_SIZE = 20
AUDIT_PAGE_SIZE = 100
# Only this server's own files, no inline script, no framing: a page can load nothing from a CDN.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


class SignInRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def _safe_next(value: str | None) -> str:
    # Only a path of this site: never an open redirect to another.
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/jobs"
    return value


def current_session(request: Request) -> ConsoleSession:
    session = services(request).sessions.get(request.cookies.get(COOKIE))
    if session is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(path)
    return session


SessionDep = Annotated[ConsoleSession, Depends(current_session)]
ServicesDep = Annotated[Services, Depends(services)]


def render(request: Request, name: str, context: dict[str, Any], status: int = 200,
           session: ConsoleSession | None = None) -> HTMLResponse:
    principal = session.principal if session else None
    base = {"session": session, "principal": principal, "csrf": session.csrf_token if session else None,
            "roles": sorted(principal.roles) if principal else [], "may_audit": _may_audit(principal)}
    response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def _may_audit(principal) -> bool:
    return principal is not None and bool({"auditor", "administrator"} & set(principal.roles))


def refused(request: Request, session: ConsoleSession | None, status: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "problem.html", {"title": title, "detail": detail, "status": status}, status, session)


def _check_csrf(request: Request, session: ConsoleSession, sent: str | None) -> HTMLResponse | None:
    if session.csrf_matches(sent):
        return None
    return refused(request, session, 403, "Refused", "This form was sent without its CSRF token (or with another "
                   "session's): nothing was done. Reload the page and try again.")


# Sign-in and sign-out ------------------------------------------------------------------------------------


@router.get("/")
def home(request: Request) -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=303)


def _sign_in_page(request: Request, next_path: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    import secrets

    token = secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", {"next": next_path, "error": error, "sign_in_csrf": token}, status)
    response.set_cookie(SIGN_IN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/sign-in",
                        secure=request.url.scheme == "https", max_age=3600)
    return response


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _sign_in_page(request, _safe_next(next))


@router.post("/sign-in")
def sign_in(request: Request, svc: ServicesDep, username: Annotated[str, Form(max_length=64)] = "",
            password: Annotated[str, Form(max_length=1024)] = "", next: Annotated[str, Form()] = "/jobs",
            csrf_token: Annotated[str | None, Form()] = None) -> Response:
    import hmac

    cookie = request.cookies.get(SIGN_IN_CSRF_COOKIE)
    if not csrf_token or not cookie or not hmac.compare_digest(csrf_token.encode(), cookie.encode()):
        return refused(request, None, 403, "Refused", "The sign-in form was sent without its CSRF token: "
                       "open the sign-in page again.")
    try:
        token, session = svc.sessions.sign_in(username.strip(), password)
    except AuthenticationError as exc:
        return _sign_in_page(request, _safe_next(next), str(exc), 401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https",
                        max_age=max(1, int((session.expires_at - datetime.now(timezone.utc)).total_seconds())))
    response.delete_cookie(SIGN_IN_CSRF_COOKIE, path="/sign-in")
    return response


@router.post("/sign-out")
def sign_out(request: Request, svc: ServicesDep, session: SessionDep,
             csrf_token: Annotated[str | None, Form()] = None) -> Response:
    if (bad := _check_csrf(request, session, csrf_token)) is not None:
        return bad
    svc.sessions.sign_out(request.cookies.get(COOKIE))
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# Jobs -----------------------------------------------------------------------------------------------------


def _resolve_job(request: Request, svc: Services, session: ConsoleSession, ref: str) -> str | HTMLResponse:
    """The whole id of the job a URL names by its id or a unique prefix (the API's and the CLI's resolver),
    or the page saying there is none for this organisation, or that the prefix names several."""
    org = session.principal.organisation_id
    try:
        return svc.jobs.resolve_job_id(ref, org)
    except JobNotFound:
        return refused(request, session, 404, "Not found", f"There is no job {ref} for {org}.")
    except JobRefused as exc:
        return refused(request, session, 422, "Ambiguous job id", str(exc))


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, svc: ServicesDep, session: SessionDep) -> HTMLResponse:
    jobs = svc.jobs.list_jobs(200, organisation_id=session.principal.organisation_id)
    return render(request, "jobs.html", {"jobs": jobs}, session=session)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, svc: ServicesDep, session: SessionDep,
             offset: Annotated[int, Query(ge=0)] = 0,
             limit: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE) -> HTMLResponse:
    job_id_or_page = _resolve_job(request, svc, session, job_id)
    if isinstance(job_id_or_page, HTMLResponse):
        return job_id_or_page
    job_id = job_id_or_page
    view = svc.jobs.refresh(job_id)
    probes: list[dict] = []
    total = 0
    if view.kind == JobKind.SEARCH:
        total = svc.jobs.count_probe_results(job_id)
        # Each match with its review state, confirmations and history, as the API gives them.
        probes = svc.jobs.probe_results(job_id, offset, limit)
    pages = max(1, math.ceil(total / limit)) if total else 1
    return render(request, "job.html", {
        "job": view, "probes": probes, "total": total, "offset": offset, "limit": limit,
        "page": offset // limit + 1, "pages": pages,
        "prev_offset": max(0, offset - limit) if offset > 0 else None,
        "next_offset": offset + limit if offset + limit < total else None,
        "may_review": "reviewer" in session.principal.roles or "administrator" in session.principal.roles,
        "quote": quote,
    }, session=session)


@router.post("/jobs/{job_id}/results/{probe_id}/reviews")
def review_form(request: Request, job_id: str, probe_id: int, svc: ServicesDep, session: SessionDep,
                face_id: Annotated[str, Form(max_length=64)], decision: Annotated[ReviewDecision, Form()],
                csrf_token: Annotated[str | None, Form()] = None,
                offset: Annotated[int, Form(ge=0)] = 0) -> Response:
    """The confirm/reject buttons without script: the review service as the API's, then back to the page."""
    if (bad := _check_csrf(request, session, csrf_token)) is not None:
        return bad
    job_id_or_page = _resolve_job(request, svc, session, job_id)
    if isinstance(job_id_or_page, HTMLResponse):
        return job_id_or_page
    job_id = job_id_or_page
    try:
        svc.jobs.review_match(job_id, probe_id, face_id, confirmed=decision is ReviewDecision.CONFIRMED,
                              principal=session.principal)
    except (JobNotFound, GalleryHidden):
        return refused(request, session, 404, "Not found", f"There is no such match in job {job_id}.")
    except AccessRefused as exc:
        return refused(request, session, 403, "Refused", exc.access.reason)
    except JobRefused as exc:
        return refused(request, session, 422, "Refused", str(exc))
    return RedirectResponse(f"/jobs/{quote(job_id)}?offset={offset}#probe-{probe_id}", status_code=303)


# Galleries ------------------------------------------------------------------------------------------------


@router.get("/galleries", response_class=HTMLResponse)
def galleries_page(request: Request, svc: ServicesDep, session: SessionDep) -> HTMLResponse:
    return render(request, "galleries.html", {"galleries": svc.galleries.list(session.principal)}, session=session)


@router.get("/galleries/{name}", response_class=HTMLResponse)
def gallery_page(request: Request, name: str, svc: ServicesDep, session: SessionDep,
                 offset: Annotated[int, Query(ge=0, le=16_000)] = 0,
                 limit: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE) -> HTMLResponse:
    """One gallery: its facts and a page of its faces, each a thumbnail from the API's face crop endpoint
    (decided by the access rule and audited per view, like every crop)."""
    try:
        info = svc.galleries.show(session.principal, name)
    except GalleryHidden:
        return refused(request, session, 404, "Not found", f"There is no gallery {name} for "
                       f"{session.principal.organisation_id}.")
    faces: Sequence = []
    total, unreadable = 0, None
    try:
        total, faces = svc.galleries.faces(session.principal, name, offset=offset, limit=limit)
    except StoreNotShared as exc:
        unreadable = str(exc)
    return render(request, "gallery.html", {
        "gallery": info, "faces": faces, "total": total, "offset": offset, "limit": limit, "unreadable": unreadable,
        "prev_offset": max(0, offset - limit) if offset > 0 else None,
        "next_offset": offset + limit if offset + limit < total else None, "quote": quote,
    }, session=session)


# Audit ----------------------------------------------------------------------------------------------------


def _audit_allowed(request: Request, svc: Services, session: ConsoleSession) -> HTMLResponse | None:
    try:
        # The auditor (or administrator) role, decided by the access rule like every other action.
        svc.jobs.gate.access.authorize(session.principal, Action.AUDIT, None)
    except AccessRefused as exc:
        return refused(request, session, 403, "Refused", exc.access.reason)
    return None


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, svc: ServicesDep, session: SessionDep,
               offset: Annotated[int, Query(ge=0)] = 0) -> HTMLResponse:
    if (bad := _audit_allowed(request, svc, session)) is not None:
        return bad
    filters = {k: request.query_params.get(k, "").strip() for k in AUDIT_FILTERS}
    try:
        query = audit_query(svc.jobs.db_url, session.principal.organisation_id, filters)
    except AuditFilterError as exc:
        return refused(request, session, 422, "Invalid filter", str(exc))
    rows = audit_rows(svc.jobs.db_url, query, offset, AUDIT_PAGE_SIZE + 1)
    chain = svc.jobs.audit.verify()
    given = {k: v for k, v in filters.items() if v}
    return render(request, "audit.html", {
        "rows": rows[:AUDIT_PAGE_SIZE], "filters": filters, "chain": chain, "offset": offset,
        "next_offset": offset + AUDIT_PAGE_SIZE if len(rows) > AUDIT_PAGE_SIZE else None,
        "prev_offset": max(0, offset - AUDIT_PAGE_SIZE) if offset else None,
        "query": urlencode(given), "export_url": "/audit/export.jsonl" + (f"?{urlencode(given)}" if given else ""),
        "json": json.dumps,
    }, session=session)


@router.get("/audit/export.jsonl")
def audit_export(request: Request, svc: ServicesDep, session: SessionDep) -> Response:
    if (bad := _audit_allowed(request, svc, session)) is not None:
        return bad
    filters = {k: request.query_params.get(k, "").strip() for k in AUDIT_FILTERS}
    try:
        query = audit_query(svc.jobs.db_url, session.principal.organisation_id, filters)
    except AuditFilterError as exc:
        return refused(request, session, 422, "Invalid filter", str(exc))

    def lines():
        for row in audit_lines(svc.jobs.db_url, query):
            yield json.dumps(row, default=str) + "\n"

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="facegate-audit-{stamp}.jsonl"', "Cache-Control": "no-store"})


__all__ = ["SECURITY_HEADERS", "STATIC", "SignInRequired", "current_session", "router"]
