"""/v1/jobs: submit index, search and reindex jobs; follow them; page through results; cancel."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile, status

from facegate.vocabulary import UNTRAINED_WARNING
from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.problems import Problem
from scheduler.api.schemas import ChunkOut, ItemError, JobCreate, JobOut, PolicyDecisionOut, ResultsPage
from scheduler.service import JobRefused, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(view: JobView) -> JobOut:
    return JobOut(
        id=view.id, kind=view.kind, state=view.state, submitter=view.submitter, purpose=view.purpose,
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


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={403: {"description": "Denied by the policy gate (problem+json with the reason)"}})
def submit_job(body: JobCreate, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Submit an index, search or reindex job. The policy gate decides before anything is queued."""
    if body.kind == "index":
        folder = body.folder
        if folder is None:
            folder = svc.galleries.show(who, body.gallery).folder
        if folder is None:
            raise JobRefused("an index job needs a folder, or a gallery registered with one")
        return job_out(svc.jobs.submit_index(folder, body.gallery, who, body.purpose,
                                             quality_filter=body.quality_filter))
    if body.kind == "search":
        if not body.probes:
            raise JobRefused("a search job needs probes: paths here, or upload files to /v1/jobs/uploads")
        return job_out(svc.jobs.submit_search(body.probes, body.gallery, who, body.purpose, top_k=body.top_k,
                                              threshold=body.threshold, aligned=body.aligned,
                                              authorisation=body.authorisation))
    # Decided for the organisation that asked, for the purpose it gives; another's gallery: not found.
    return job_out(svc.galleries.reindex(body.gallery, principal=who, purpose=body.purpose))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@router.post("/uploads", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={413: {"description": "A file or the request is over the size limit"}})
async def submit_search_with_uploads(
    who: PrincipalDep,
    svc: ServicesDep,
    gallery: Annotated[str, Form()],
    purpose: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File(description="Probe images")],
    threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
    top_k: Annotated[int | None, Form(ge=1, le=1000)] = None,
    aligned: Annotated[bool, Form()] = False,
    authorisation: Annotated[str | None, Form(max_length=64)] = None,
) -> JobOut:
    """Search a gallery with uploaded probe images (multipart). They are kept under the uploads root."""
    settings = svc.settings
    if len(files) > settings.max_upload_files:
        raise Problem(413, "Too many files", f"at most {settings.max_upload_files} files per request",
                      kind="too-large")
    # The organisation's own upload folder: no other organisation may read it (Settings.roots_for).
    folder = settings.uploads_for(who.organisation_id) / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    try:
        saved: list[Path] = []
        for n, upload in enumerate(files):
            name = _SAFE_NAME.sub("_", Path(upload.filename or f"probe-{n}").name)[:120] or f"probe-{n}"
            target = folder / f"{n:04d}-{name}"
            size = 0
            with open(target, "wb") as fh:
                while block := await upload.read(1 << 20):
                    size += len(block)
                    if size > settings.max_image_bytes:
                        raise Problem(413, "File too large", f"{upload.filename}: over the limit of "
                                      f"{settings.max_image_bytes} bytes per image", kind="too-large")
                    fh.write(block)
            saved.append(target)
        view = svc.jobs.submit_search([str(p) for p in saved], gallery, who, purpose, top_k=top_k,
                                      threshold=threshold, aligned=aligned, upload_folder=folder,
                                      authorisation=authorisation)
    except BaseException:
        # Refused, over a limit, or denied: nothing uploaded stays behind (a denied job says so in the audit).
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return job_out(view)


@router.get("", response_model=list[JobOut])
def list_jobs(who: PrincipalDep, svc: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    """Your organisation's jobs, newest first."""
    return [job_out(v) for v in svc.jobs.list_jobs(limit, organisation_id=who.organisation_id)]


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """State, progress, the policy decision and per-item errors. The id may be a unique prefix (4+ characters)."""
    job_id = svc.jobs.resolve_job_id(job_id, who.organisation_id)
    return job_out(svc.jobs.refresh(job_id))


@router.get("/{job_id}/results", response_model=ResultsPage)
def get_results(job_id: str, who: PrincipalDep, svc: ServicesDep,
                offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ResultsPage:
    """One page of probe faces, each with its ranked matches (similarity, image path, review state)."""
    job_id = svc.jobs.resolve_job_id(job_id, who.organisation_id)
    view = svc.jobs.refresh(job_id)
    total = svc.jobs.count_probe_results(job_id)
    items = svc.jobs.probe_results(job_id, offset, limit)
    nxt = offset + len(items) if offset + len(items) < total else None
    return ResultsPage(job_id=job_id, state=view.state, untrained=view.untrained, offset=offset, limit=limit,
                       total=total, next_offset=nxt, items=items,
                       no_face=[ItemError(**e) for e in view.no_face])


@router.get("/{job_id}/chunks", response_model=list[ChunkOut])
def get_chunks(job_id: str, who: PrincipalDep, svc: ServicesDep) -> list[ChunkOut]:
    """Where each chunk is: queued, running on which worker since when, lost (and re-sent), done or failed."""
    job_id = svc.jobs.resolve_job_id(job_id, who.organisation_id)
    return [ChunkOut(**c) for c in svc.jobs.chunks(job_id, who.organisation_id)]


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(job_id: str, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Re-send the chunks of an open job that nothing holds any more now (looked at twice, 2 s apart), instead
    of waiting for the reconciler's next pass."""
    job_id = svc.jobs.resolve_job_id(job_id, who.organisation_id)
    svc.jobs.reconcile([job_id], resume=True)
    return job_out(svc.jobs.refresh(job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    return job_out(svc.jobs.cancel(svc.jobs.resolve_job_id(job_id, who.organisation_id), who))
