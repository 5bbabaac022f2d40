"""/v1/jobs: submit index, search and reindex jobs; follow them; page through results; cancel."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Annotated, Callable

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile, status

from facegate.vocabulary import UNTRAINED_WARNING, JobState
from scheduler.api.deps import JobIdDep, PrincipalDep, ServicesDep
from scheduler.api.problems import Problem
from scheduler.api.schemas import (
    ChunkOut,
    ItemError,
    JobCreate,
    JobOut,
    PolicyDecisionOut,
    ProbeFaceOut,
    ResultsPage,
)
from scheduler.idempotency import IdempotencyKeys, fingerprint
from scheduler.service import JobDenied, JobRefused, JobView
from scheduler.webhooks import WebhookRefused, check_callback_url, register_callback, secret_of

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(view: JobView) -> JobOut:
    return JobOut(
        id=view.id, kind=view.kind, state=JobState(view.state), submitter=view.submitter, purpose=view.purpose,
        gallery=view.gallery,
        progress={"done": view.done_items, "total": view.total_items, "failed": view.failed_items},
        faces=view.faces, model_version=view.model_version, untrained=view.untrained,
        warning=UNTRAINED_WARNING if view.untrained else None, review_required=view.review_required,
        policy=PolicyDecisionOut(reason=view.decision_reason, rule_ids=view.decision_rule_ids,
                                 registry_hash=view.registry_hash),
        params={k: v for k, v in view.params.items()}, error=view.error,
        errors=[ItemError(**e) for e in view.errors], not_indexed=[ItemError(**e) for e in view.not_indexed],
        notes=view.notes, no_face=[ItemError(**e) for e in view.no_face], created_at=view.created_at,
        started_at=view.started_at,
        finished_at=view.finished_at)


IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", max_length=255,
    description="Your own key for this request (a UUID): the same key with the same request within 24 h gives "
                "back the job it made (200), never a second job; with a different request, 422.")]
# How long GET /v1/jobs/{id}?wait= may hold a request.
MAX_WAIT_S = 60.0


def _checked_callback(svc, who, callback_url: str | None) -> str | None:
    """The callback URL if FaceGate may call it and the organisation can have it signed; refused otherwise."""
    if callback_url is None:
        return None
    url = check_callback_url(callback_url, svc.settings)
    if secret_of(svc.settings.resolved_database_url, who.organisation_id) is None:
        raise WebhookRefused(f"organisation {who.organisation_id!r} has no webhook secret to sign callbacks with: "
                             "create one (POST /v1/webhooks/secret, or `facegate org webhook-secret ORG`)")
    return url


def submit_once(svc, who, response: Response, key: str | None, request: object, callback_url: str | None,
                submit: Callable[[], JobView], on_replay: Callable[[], None] = lambda: None) -> JobOut:
    """Submit through the idempotency key, if one is given: a replay answers 200 with the job the key made
    (a denied one is denied again, naming the same job); a refusal before anything was recorded frees it."""
    url = _checked_callback(svc, who, callback_url)
    keys = IdempotencyKeys(svc.settings.resolved_database_url)
    if key is not None:
        made = keys.claim(who.organisation_id, key, fingerprint(request))
        if made is not None:
            on_replay()
            view = svc.jobs.refresh(made)
            if JobState(view.state) is JobState.REFUSED:
                raise JobDenied(view)
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
            return job_out(view)
    try:
        view = submit()
    except JobDenied as exc:
        if key is not None:
            keys.record(who.organisation_id, key, exc.view.id)
        raise
    except BaseException:
        if key is not None:
            keys.release(who.organisation_id, key)
        raise
    if key is not None:
        keys.record(who.organisation_id, key, view.id)
    if url is not None:
        register_callback(svc.settings.resolved_database_url, view.id, url)
    return job_out(view)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={200: {"description": "The job this Idempotency-Key already made", "model": JobOut},
                        403: {"description": "Denied by the policy gate (problem+json with the reason)"}})
def submit_job(body: JobCreate, who: PrincipalDep, svc: ServicesDep, response: Response,
               idempotency_key: IdempotencyKeyHeader = None) -> JobOut:
    """Submit an index, search or reindex job. The policy gate decides before anything is queued. With
    `callback_url`, the job's view is POSTed there, signed, when it ends (see the README's webhooks)."""

    def submit() -> JobView:
        if body.kind == "index":
            folder = body.folder
            if folder is None:
                folder = svc.galleries.show(who, body.gallery).folder
            if folder is None:
                raise JobRefused("an index job needs a folder, or a gallery registered with one")
            return svc.jobs.submit_index(folder, body.gallery, who, body.purpose, quality_filter=body.quality_filter,
                                         external_ids=body.external_ids)
        if body.kind == "search":
            if not body.probes:
                raise JobRefused("a search job needs probes: paths here, or upload files to /v1/jobs/uploads")
            return svc.jobs.submit_search(body.probes, body.gallery, who, body.purpose, top_k=body.top_k,
                                          threshold=body.threshold, aligned=body.aligned,
                                          authorisation=body.authorisation)
        # Decided for the organisation that asked, for the purpose it gives; another's gallery: not found.
        return svc.galleries.reindex(body.gallery, principal=who, purpose=body.purpose)

    return submit_once(svc, who, response, idempotency_key, body.model_dump(mode="json"), body.callback_url, submit)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


async def save_uploads(svc, who, files: list[UploadFile]) -> tuple[Path, list[Path], list[str]]:
    """The uploaded images, written to a new folder of the organisation's own uploads (which no other
    organisation may read): (folder, files, sha256 of each). Over a limit: 413, and nothing stays behind."""
    settings = svc.settings
    if len(files) > settings.max_upload_files:
        raise Problem(413, "Too many files", f"at most {settings.max_upload_files} files per request",
                      kind="too-large")
    folder = settings.uploads_for(who.organisation_id) / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    digests: list[str] = []
    try:
        for n, upload in enumerate(files):
            name = _SAFE_NAME.sub("_", Path(upload.filename or f"probe-{n}").name)[:120] or f"probe-{n}"
            target = folder / f"{n:04d}-{name}"
            size, digest = 0, hashlib.sha256()
            with open(target, "wb") as fh:
                while block := await upload.read(1 << 20):
                    size += len(block)
                    if size > settings.max_image_bytes:
                        raise Problem(413, "File too large", f"{upload.filename}: over the limit of "
                                      f"{settings.max_image_bytes} bytes per image", kind="too-large")
                    fh.write(block)
                    digest.update(block)
            saved.append(target)
            digests.append(digest.hexdigest())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, saved, digests


@router.post("/uploads", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={200: {"description": "The job this Idempotency-Key already made", "model": JobOut},
                        413: {"description": "A file or the request is over the size limit"}})
async def submit_search_with_uploads(
    who: PrincipalDep,
    svc: ServicesDep,
    response: Response,
    gallery: Annotated[str, Form()],
    purpose: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File(description="Probe images")],
    threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
    top_k: Annotated[int | None, Form(ge=1, le=1000)] = None,
    aligned: Annotated[bool, Form()] = False,
    authorisation: Annotated[str | None, Form(max_length=64)] = None,
    callback_url: Annotated[str | None, Form(max_length=2048)] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    """Search a gallery with uploaded probe images (multipart). They are kept under the uploads root."""
    folder, saved, digests = await save_uploads(svc, who, files)
    # The same request: the same fields and the same images (by content), in the same order.
    request = {"gallery": gallery, "purpose": purpose, "threshold": threshold, "top_k": top_k, "aligned": aligned,
               "authorisation": authorisation, "callback_url": callback_url, "images": digests}
    try:
        return submit_once(
            svc, who, response, idempotency_key, request, callback_url,
            lambda: svc.jobs.submit_search([str(p) for p in saved], gallery, who, purpose, top_k=top_k,
                                           threshold=threshold, aligned=aligned, upload_folder=folder,
                                           authorisation=authorisation),
            on_replay=lambda: shutil.rmtree(folder, ignore_errors=True))
    except BaseException:
        # Refused, over a limit, or denied: nothing uploaded stays behind (a denied job says so in the audit).
        shutil.rmtree(folder, ignore_errors=True)
        raise


@router.get("", response_model=list[JobOut])
def list_jobs(who: PrincipalDep, svc: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    """Your organisation's jobs, newest first."""
    return [job_out(v) for v in svc.jobs.list_jobs(limit, organisation_id=who.organisation_id)]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobIdDep, who: PrincipalDep, svc: ServicesDep,
            wait: Annotated[float | None, Query(ge=0, description="Long-poll: answer when the job ends or after "
                                                "this many seconds, whichever is first (at most 60)")] = None
            ) -> JobOut:
    """State, progress, the policy decision and per-item errors. The id may be a unique prefix (4+ characters)."""
    view = svc.jobs.refresh(job_id)
    if wait:
        deadline = time.monotonic() + min(wait, MAX_WAIT_S)
        while not view.finished and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            view = svc.jobs.refresh(job_id)
    return job_out(view)


@router.get("/{job_id}/results", response_model=ResultsPage)
def get_results(job_id: JobIdDep, who: PrincipalDep, svc: ServicesDep,
                offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ResultsPage:
    """One page of probe faces, each with its ranked matches (similarity, image path, review state)."""
    view = svc.jobs.refresh(job_id)
    total = svc.jobs.count_probe_results(job_id)
    items = svc.jobs.probe_results(job_id, offset, limit)
    nxt = offset + len(items) if offset + len(items) < total else None
    return ResultsPage(job_id=job_id, state=view.state, untrained=view.untrained, offset=offset, limit=limit,
                       total=total, next_offset=nxt, items=[ProbeFaceOut.model_validate(i) for i in items],
                       no_face=[ItemError(**e) for e in view.no_face])


@router.get("/{job_id}/chunks", response_model=list[ChunkOut])
def get_chunks(job_id: JobIdDep, who: PrincipalDep, svc: ServicesDep) -> list[ChunkOut]:
    """Where each chunk is: queued, running on which worker since when, lost (and re-sent), done or failed."""
    return [ChunkOut(**c) for c in svc.jobs.chunks(job_id, who.organisation_id)]


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(job_id: JobIdDep, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Re-send the chunks of an open job that nothing holds any more now (looked at twice, 2 s apart), instead
    of waiting for the reconciler's next pass."""
    svc.jobs.reconcile([job_id], resume=True)
    return job_out(svc.jobs.refresh(job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobIdDep, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    return job_out(svc.jobs.cancel(job_id, who))
