"""JobService: the whole life of a job, from the checked request to the assembled result."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from sqlalchemy import select, update

from facegate.db import create_schema, session_scope
from facegate.messages import (
    INDEX_CHUNK_TASK,
    SEARCH_CHUNK_TASK,
    ChunkResult,
    IndexChunk,
    SearchChunk,
    chunk_task_id,
    validate_gallery_name,
)
from facegate.paths import PathRefused, confine, confined_images
from facegate.settings import Settings
from scheduler.audit import AuditLog
from scheduler.dispatch import TaskQueue
from scheduler.gate import SubmissionGate
from scheduler.keys import Principal
from scheduler.models import Gallery, Job, JobChunk, JobItem, JobKind, JobState, MatchReview, ProbeResult, utcnow

# FaceGate's own maintenance submitter (nightly reindexing): may touch every gallery, still gated.
SYSTEM_ORGANISATION = "facegate-system"


class JobRefused(ValueError):
    """The request was refused before anything was queued; the message says why."""


class JobNotFound(LookupError):
    pass


class JobDenied(PermissionError):
    """The policy gate denied the job; it is stored with the reason and was never queued."""

    def __init__(self, view: "JobView") -> None:
        super().__init__(view.decision_reason or "denied by policy")
        self.view = view


@dataclass
class JobView:
    """A job as a caller sees it, with live progress from chunks still running."""

    id: str
    kind: str
    submitter: str
    api_key_id: str | None
    purpose: str | None
    gallery: str
    state: str
    total_items: int
    done_items: int
    failed_items: int
    faces: int
    model_version: str | None
    untrained: bool
    error: str | None
    params: dict
    registry_hash: str | None
    decision_rule_ids: list[str]
    decision_reason: str | None
    review_required: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    errors: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return JobState(self.state).finished


def _view(job: Job, in_flight_done: int = 0) -> JobView:
    return JobView(
        id=job.id, kind=job.kind, submitter=job.submitter, api_key_id=job.api_key_id, purpose=job.purpose,
        gallery=job.gallery, state=job.state,
        total_items=job.total_items, done_items=min(job.total_items, job.done_items + in_flight_done),
        failed_items=job.failed_items, faces=job.faces, model_version=job.model_version,
        untrained=job.untrained, error=job.error, params=dict(job.params or {}), registry_hash=job.registry_hash,
        decision_rule_ids=list(job.decision_rule_ids or []), decision_reason=job.decision_reason,
        review_required=job.review_required, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


class JobService:
    def __init__(self, settings: Settings, queue: TaskQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.db_url = settings.resolved_database_url
        create_schema(self.db_url)
        self.audit = AuditLog(self.db_url)
        self.gate = SubmissionGate(settings, self.audit)

    # Submission ---------------------------------------------------------------------------------

    def submit_index(self, directory: str | Path, gallery: str, principal: Principal, purpose: str) -> JobView:
        gallery = self._gallery(gallery)
        self._check_gallery_access(principal, gallery, must_exist=False)
        roots = self.settings.resolved_gallery_roots
        try:
            real = confine(directory, roots)
            if not real.is_dir():
                raise JobRefused(f"{directory} is not a directory: an index job takes a gallery folder")
            images = confined_images([real], roots)
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        if not images:
            raise JobRefused(f"no images found under {real} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff)")
        params = {"directory": str(real)}
        return self._create_and_queue(JobKind.INDEX, gallery, principal, purpose, params, images,
                                      self.settings.index_chunk_size)

    def submit_search(self, paths: Sequence[str | Path], gallery: str, principal: Principal, purpose: str, *,
                      top_k: int | None = None, threshold: float | None = None, aligned: bool = False) -> JobView:
        gallery = self._gallery(gallery)
        if not paths:
            raise JobRefused("a search job needs at least one probe file or folder")
        try:
            images = confined_images(paths, self.settings.resolved_gallery_roots)
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        if not images:
            raise JobRefused("no probe images found in " + ", ".join(str(p) for p in paths))
        known = self._check_gallery_access(principal, gallery, must_exist=True)
        top_k = top_k if top_k is not None else self.settings.default_top_k
        if threshold is None:
            # Unset: the purpose's floor for this gallery's model, never a number the policy would refuse.
            floor = self.gate.floor_for(purpose, known.model_version if known else None)
            threshold = max(self.settings.default_threshold, floor if floor is not None else -1.0)
        if not 1 <= top_k <= 1000:
            raise JobRefused(f"top-k must be between 1 and 1000, got {top_k}")
        if not -1.0 <= threshold <= 1.0:
            raise JobRefused(f"threshold is a cosine similarity between -1 and 1, got {threshold}")
        params = {"probes": [str(p) for p in paths], "top_k": top_k, "threshold": threshold, "aligned": aligned}
        return self._create_and_queue(JobKind.SEARCH, gallery, principal, purpose, params, images,
                                      self.settings.search_chunk_size)

    def _check_gallery_access(self, principal: Principal, gallery: str, *, must_exist: bool) -> Gallery | None:
        """An organisation works only on its own galleries; another's is answered as if it did not exist."""
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, gallery)
        if row is not None and row.owner != principal.organisation_id and \
                principal.organisation_id != SYSTEM_ORGANISATION:
            raise JobRefused(f"no gallery {gallery!r} for organisation {principal.organisation_id!r}")
        if row is None and must_exist:
            raise JobRefused(f"no gallery {gallery!r} for organisation {principal.organisation_id!r}: index it first")
        return row

    @staticmethod
    def _gallery(name: str) -> str:
        try:
            return validate_gallery_name(name)
        except ValueError as exc:
            raise JobRefused(str(exc)) from None

    def _create_and_queue(self, kind: JobKind, gallery: str, principal: Principal, purpose: str, params: dict,
                          images: list[Path], chunk_size: int) -> JobView:
        if self.queue is None:
            raise RuntimeError("this JobService has no task queue: it can read jobs but not run them")
        job_id = uuid.uuid4().hex
        with session_scope(self.db_url) as s:
            known = s.get(Gallery, gallery)
            model_version = known.model_version if known else None
        admission = self.gate.admit(principal, kind.value, purpose, job_id=job_id, gallery=gallery,
                                    threshold=params.get("threshold"), model_version=model_version)
        decision = admission.decision
        job = Job(id=job_id, kind=kind.value, submitter=principal.organisation_id, api_key_id=principal.key_id,
                  purpose=purpose, gallery=gallery, params=params, total_items=len(images),
                  registry_hash=decision.registry_hash, decision_rule_ids=list(decision.rule_ids),
                  decision_reason=decision.reason, review_required=admission.review_required)
        if not admission.allowed:
            job.state, job.error, job.finished_at = JobState.REFUSED.value, decision.reason, utcnow()
            with session_scope(self.db_url) as s:
                s.add(job)
            self.audit.append("job.refused", organisation_id=principal.organisation_id, api_key_id=principal.key_id,
                              job_id=job_id, capability=kind.value, purpose=purpose, gallery=gallery,
                              registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=False,
                              detail={"reason": decision.reason, "items": len(images)})
            raise JobDenied(self.get(job_id))

        chunks = [[str(p) for p in images[i : i + chunk_size]] for i in range(0, len(images), chunk_size)]
        job.state, job.total_chunks = JobState.QUEUED.value, len(chunks)
        with session_scope(self.db_url) as s:
            if kind is JobKind.INDEX and s.get(Gallery, gallery) is None:
                s.add(Gallery(name=gallery, owner=principal.organisation_id))
            s.add(job)
            s.flush()
            s.add_all(JobChunk(job_id=job_id, chunk_no=n, paths=paths) for n, paths in enumerate(chunks))
        self.audit.append("job.submitted", organisation_id=principal.organisation_id, api_key_id=principal.key_id,
                          job_id=job_id, capability=kind.value, purpose=purpose, gallery=gallery,
                          registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=True,
                          detail={"items": len(images), "chunks": len(chunks), **{k: v for k, v in params.items()
                                                                                   if k != "probes"}})
        for n, paths in enumerate(chunks):
            task_name, message = self._message(kind, job_id, n, gallery, paths, params, admission.ticket)
            self.queue.send(task_name, message, task_id=chunk_task_id(job_id, n))
        return self.get(job_id)

    @staticmethod
    def _message(kind: JobKind, job_id: str, chunk_no: int, gallery: str, paths: list[str],
                 params: dict, ticket: str | None) -> tuple[str, dict]:
        if kind is JobKind.INDEX:
            msg = IndexChunk(job_id=job_id, chunk_no=chunk_no, gallery=gallery, paths=paths, ticket=ticket)
            return INDEX_CHUNK_TASK, msg.model_dump(mode="json")
        msg = SearchChunk(job_id=job_id, chunk_no=chunk_no, gallery=gallery, paths=paths, top_k=params["top_k"],
                          threshold=params["threshold"], aligned=params.get("aligned", False), ticket=ticket)
        return SEARCH_CHUNK_TASK, msg.model_dump(mode="json")

    # Tracking -----------------------------------------------------------------------------------

    def refresh(self, job_id: str) -> JobView:
        """Fold every finished chunk's result into the job; report live progress of the others."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if JobState(job.state).finished or self.queue is None:
                return self._with_errors(s, job)
            pending = s.scalars(select(JobChunk.chunk_no).where(JobChunk.job_id == job_id,
                                                                JobChunk.folded_at.is_(None))).all()
        in_flight = 0
        for chunk_no in pending:
            status = self.queue.status(chunk_task_id(job_id, chunk_no))
            if status.finished:
                self._fold(job_id, chunk_no, status.result, status.error)
                self.queue.forget(chunk_task_id(job_id, chunk_no))
            elif status.state in ("STARTED", "PROGRESS", "RETRY"):
                in_flight += status.progress_done
                self._mark_running(job_id)
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return self._with_errors(s, job, in_flight)

    def _mark_running(self, job_id: str) -> None:
        with session_scope(self.db_url) as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
                      .values(state=JobState.RUNNING.value, started_at=utcnow()))

    def _fold(self, job_id: str, chunk_no: int, payload: dict | None, task_error: str | None) -> None:
        events: list[tuple[str, dict]] = []
        with session_scope(self.db_url) as s:
            # Only one folder wins a chunk, however many processes refresh the same job.
            claimed = s.execute(
                update(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.chunk_no == chunk_no, JobChunk.folded_at.is_(None))
                .values(folded_at=utcnow(), state="done" if payload else "failed")
            ).rowcount
            if claimed != 1:
                return
            job = s.get(Job, job_id)
            chunk = s.get(JobChunk, (job_id, chunk_no))
            assert job is not None and chunk is not None
            first_chunk = job.done_chunks == 0
            result = ChunkResult.model_validate(payload) if payload is not None else None
            if result is None:
                reason = f"chunk failed in the worker: {task_error}"
            else:
                reason = result.refused or result.error
            if reason:
                job.error = job.error or reason
                items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=p, ok=False, reason=reason)
                         for p in chunk.paths]
            else:
                items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=i.path, ok=i.ok, reason=i.reason,
                                 faces=i.faces, image_sha256=i.image_sha256) for i in result.items]
            if result is not None and result.refused:
                # One refused chunk refuses the job: the policy no longer allows it, whatever else ran.
                job.state = JobState.REFUSED_AT_EXECUTION.value
                events.append(("job.refused_at_execution", {"reason": result.refused, "chunk": chunk_no}))
            if result is not None and not reason:
                job.model_version = result.model_version or job.model_version
                job.untrained = job.untrained or result.untrained
                if result.started_at and (job.started_at is None or result.started_at < job.started_at):
                    job.started_at = result.started_at
                review = "unconfirmed" if job.review_required else "not_required"
                s.add_all(ProbeResult(job_id=job_id, path=p.path, face_no=p.face_no, box=p.box,
                                      probability=p.probability,
                                      matches=[{**m.model_dump(), "review": review} for m in p.matches])
                          for p in result.probes)
                if job.kind == JobKind.INDEX.value:
                    gallery = s.get(Gallery, job.gallery)
                    if gallery is not None:
                        gallery.model_version = result.model_version or gallery.model_version
                        gallery.last_indexed_at = utcnow()
                if first_chunk:
                    events.append(("job.started", {"worker_started_at": result.started_at.isoformat()
                                                   if result.started_at else None,
                                                   "model_version": result.model_version}))
            s.add_all(items)
            job.done_items += len(items)
            job.failed_items += sum(1 for i in items if not i.ok)
            job.faces += sum(i.faces or 0 for i in items if i.ok)
            job.done_chunks += 1
            if job.state == JobState.QUEUED.value:
                job.state = JobState.RUNNING.value
                job.started_at = job.started_at or utcnow()
            if job.done_chunks >= job.total_chunks:
                job.finished_at = utcnow()
                if job.state != JobState.REFUSED_AT_EXECUTION.value:
                    if job.failed_items == 0:
                        job.state = JobState.DONE.value
                    elif job.failed_items >= job.total_items:
                        job.state = JobState.FAILED.value
                    else:
                        job.state = JobState.PARTLY_FAILED.value
                probes = s.scalars(select(ProbeResult.matches).where(ProbeResult.job_id == job_id)).all()
                events.append(("job.finished", {
                    "state": job.state, "items": job.total_items, "failed_items": job.failed_items,
                    "faces": job.faces, "probe_faces": len(probes), "matches": sum(len(m) for m in probes),
                    "threshold": (job.params or {}).get("threshold"), "top_k": (job.params or {}).get("top_k"),
                    "model_version": job.model_version, "untrained": job.untrained}))
            facts = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, job_id=job_id, capability=job.kind,
                         purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
        for event, detail in events:
            self.audit.append(event, detail=detail, **facts)

    def _with_errors(self, s, job: Job, in_flight: int = 0) -> JobView:  # noqa: ANN001
        view = _view(job, in_flight)
        failed = s.scalars(select(JobItem).where(JobItem.job_id == job.id, JobItem.ok.is_(False))
                           .order_by(JobItem.id).limit(1000)).all()
        view.errors = [{"path": i.path, "reason": i.reason} for i in failed]
        return view

    def wait(self, job_id: str, *, on_update: Callable[[JobView], None] | None = None, poll_s: float = 0.5,
             timeout_s: float | None = None) -> JobView:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            view = self.refresh(job_id)
            if on_update:
                on_update(view)
            if view.finished:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s (state {view.state})")
            time.sleep(poll_s)

    def mark_interrupted(self, job_id: str, reason: str) -> None:
        """A job whose queue went away (the embedded broker stopped) cannot finish: say so, do not leave it queued."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is not None and not JobState(job.state).finished:
                job.state = JobState.FAILED.value
                job.error = reason
                job.finished_at = utcnow()

    # Reading ------------------------------------------------------------------------------------

    def get(self, job_id: str, organisation_id: str | None = None) -> JobView:
        """One job; with an organisation, only if it is that organisation's (another's is 'not found')."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or (organisation_id is not None and job.submitter != organisation_id):
                raise JobNotFound(f"no job {job_id}")
            return self._with_errors(s, job)

    def list_jobs(self, limit: int = 50, organisation_id: str | None = None) -> list[JobView]:
        with session_scope(self.db_url) as s:
            query = select(Job).order_by(Job.created_at.desc()).limit(limit)
            if organisation_id is not None:
                query = query.where(Job.submitter == organisation_id)
            return [_view(j) for j in s.scalars(query).all()]

    def probe_results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[dict]:
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(ProbeResult).where(ProbeResult.job_id == job_id)
                             .order_by(ProbeResult.path, ProbeResult.face_no).offset(offset).limit(limit)).all()
            return [{"id": r.id, "path": r.path, "face_no": r.face_no, "box": r.box, "probability": r.probability,
                     "matches": r.matches} for r in rows]

    def review_match(self, job_id: str, probe_result_id: int, face_id: str, *, confirmed: bool, reviewer: str,
                     principal: Principal, note: str | None = None) -> dict:
        """Record a person's confirmation or rejection of one match; the match's review state follows."""
        if not reviewer.strip():
            raise ValueError("a review names its reviewer")
        decision = "confirmed" if confirmed else "rejected"
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            probe = s.get(ProbeResult, probe_result_id)
            if probe is None or probe.job_id != job_id:
                raise JobNotFound(f"no probe face {probe_result_id} in job {job_id}")
            matches = [dict(m) for m in probe.matches]
            target = next((m for m in matches if m["face_id"] == face_id), None)
            if target is None:
                raise JobNotFound(f"no match {face_id} for probe face {probe_result_id}")
            target.update(review=decision, reviewer=reviewer, reviewed_at=utcnow().isoformat())
            probe.matches = matches
            s.add(MatchReview(job_id=job_id, probe_result_id=probe_result_id, face_id=face_id, decision=decision,
                              reviewer=reviewer, organisation_id=principal.organisation_id, note=note))
            facts = dict(organisation_id=principal.organisation_id, api_key_id=principal.key_id, job_id=job_id,
                         capability=job.kind, purpose=job.purpose, gallery=job.gallery)
        self.audit.append(f"review.{decision}", **facts,
                          detail={"probe_result_id": probe_result_id, "face_id": face_id, "reviewer": reviewer,
                                  "image_path": target["image_path"], "similarity": target["similarity"],
                                  "note": note})
        return target
