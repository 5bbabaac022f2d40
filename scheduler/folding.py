"""Following a job: fold each finished chunk's result into it, once, whoever polls; what a finished job
changes beyond itself (generation swaps, erasure audit, uploads); cancel, wait, interrupted jobs."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, cast

from celery import states
from sqlalchemy import CursorResult, func, select, update

from facegate.calibration import CalibrationStore
from facegate.db import session_scope
from facegate.messages import (
    ChunkResult,
    chunk_task_id,
)
from facegate.paths import display_path
from facegate.settings import Settings
from facegate.vocabulary import PROGRESS, AuditEvent, ChunkKind, ChunkState
from policy import ERASE_CAPABILITY
from scheduler.access import SYSTEM_ORGANISATION, Action
from scheduler.audit import AuditLog
from scheduler.dispatch import BROKER_ERRORS, ChunkStatus, TaskQueue
from scheduler.gate import ERASURE_PURPOSE, SubmissionGate
from scheduler.keys import Principal
from scheduler.metrics import SEARCH_LATENCY
from scheduler.models import (
    Gallery,
    Job,
    JobChunk,
    JobItem,
    JobKind,
    JobState,
    MatchReview,
    ProbeResult,
    utcnow,
)

from scheduler.reconcile import JobReconciling
from scheduler.inventory import (
    finish_rebuild,
    forget_faces,
    forget_inventory,
    record_erasure,
    record_face_erasure,
    record_inventory,
)
from scheduler.reading import JobNotFound, JobView, _false_match_rate
from scheduler.submission import AUTHORISATION_DENIAL, ChunkSpec


log = logging.getLogger(__name__)


class JobFolding(JobReconciling):
    """JobService's following half; reconciling (scheduler/reconcile.py) keeps what it follows going."""

    # JobReading's and JobSubmission's, in the JobService this is part of.
    _with_errors: Callable[..., JobView]
    get: Callable[..., JobView]
    queue_job: Callable[..., JobView]

    settings: Settings
    queue: TaskQueue | None
    db_url: str
    audit: AuditLog
    gate: SubmissionGate

    # Tracking -----------------------------------------------------------------------------------

    def refresh(self, job_id: str) -> JobView:
        """Fold every finished chunk's result into the job; report live progress of the others."""
        return self.refresh_with_statuses(job_id)[0]

    def refresh_with_statuses(self, job_id: str) -> tuple[JobView, dict[int, ChunkStatus]]:
        """`refresh`, and the status it read of each chunk it left open (none where the broker was away)."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if JobState(job.state).finished or self.queue is None:
                return self._with_errors(s, job), {}
            pending = s.scalars(select(JobChunk.chunk_no).where(JobChunk.job_id == job_id,
                                                                JobChunk.folded_at.is_(None))).all()
        in_flight = 0
        open_statuses: dict[int, ChunkStatus] = {}
        try:
            for chunk_no in pending:
                status = self.queue.status(chunk_task_id(job_id, chunk_no))
                if status.finished:
                    self._fold(job_id, chunk_no, status.result, status.error)
                    self.queue.forget(chunk_task_id(job_id, chunk_no))
                    continue
                open_statuses[chunk_no] = status
                if status.state in (states.STARTED, PROGRESS, states.RETRY):
                    in_flight += status.progress_done
                    self._mark_running(job_id)
        except BROKER_ERRORS as exc:
            # The job as last folded: a broker that is away does not make the job unreadable.
            log.warning("results of job %s could not be read (%s); showing it as last folded", job_id, exc)
            open_statuses = {}
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return self._with_errors(s, job, in_flight), open_statuses

    def _mark_running(self, job_id: str) -> None:
        with session_scope(self.db_url) as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                      .values(state=JobState.RUNNING, started_at=utcnow()))

    def _fold(self, job_id: str, chunk_no: int, payload: dict | None, task_error: str | None,
              why: str | None = None) -> None:
        """Fold one chunk's result (or, with no payload, its failure: the task's error, or `why` it never ran)."""
        events: list[tuple[str, dict]] = []
        followups: list[Callable[[], object]] = []
        with session_scope(self.db_url) as s:
            # Only one folder wins a chunk, however many processes refresh the same job.
            # An UPDATE's result is a CursorResult, with the rows it matched.
            claimed = cast(CursorResult, s.execute(
                update(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.chunk_no == chunk_no, JobChunk.folded_at.is_(None))
                .values(folded_at=utcnow(), state=ChunkState.DONE if payload else ChunkState.FAILED)
            )).rowcount
            if claimed != 1:
                return
            job = s.get(Job, job_id)
            chunk = s.get(JobChunk, (job_id, chunk_no))
            assert job is not None and chunk is not None
            first_chunk = job.done_chunks == 0
            result = ChunkResult.model_validate(payload) if payload is not None else None
            reason: str | None
            if result is None:
                reason = why or f"chunk failed in the worker: {task_error}"
            else:
                reason = result.refused or result.error
            if reason or result is None:  # (no result: always a reason)
                job.error = job.error or reason
                items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=display_path(p), ok=False, reason=reason)
                         for p in chunk.paths]
            else:
                items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=display_path(i.path), ok=i.ok, reason=i.reason,
                                 faces=i.faces, image_sha256=i.image_sha256) for i in result.items]
            if result is not None and result.refused:
                # One refused chunk refuses the job: the policy no longer allows it, whatever else ran.
                job.state = JobState.REFUSED_AT_EXECUTION
                events.append((AuditEvent.JOB_REFUSED_AT_EXECUTION, {"reason": result.refused, "chunk": chunk_no}))
                if AUTHORISATION_DENIAL in result.refused:
                    # Its authorisation lapsed or was withdrawn: what the job found so far goes too.
                    refused = result.refused
                    followups.append(lambda: self.erase_results(job_id, "its authorisation is no longer valid: "
                                                                + refused))
            if result is not None and not reason:
                job.model_version = result.model_version or job.model_version
                job.untrained = job.untrained or result.untrained
                if result.started_at and (job.started_at is None or result.started_at < job.started_at):
                    job.started_at = result.started_at
                if (job.params or {}).get("results_erased"):
                    result.probes = []  # erased already (authorisation withdrawn): a late chunk adds nothing
                review = "unconfirmed" if job.review_required else "not_required"
                calibration = (CalibrationStore(self.settings.resolved_calibration_dir).get(result.model_version)
                               if result.probes and result.model_version else None)
                # Every match shows the probe face's quality: what was searched with, as measured.
                s.add_all(ProbeResult(job_id=job_id, path=display_path(p.path), face_no=p.face_no, box=p.box,
                                      probability=p.probability, quality=p.quality, not_searched=p.not_searched,
                                      matches=[{**m.model_dump(), "review": review, "probe_quality": p.quality,
                                                **_false_match_rate(calibration, m.similarity)}
                                               for m in p.matches])
                          for p in result.probes)
                gallery = s.get(Gallery, job.gallery)
                if chunk.task == ChunkKind.INDEX:
                    record_inventory(s, job.gallery, result.items)
                    if gallery is not None and chunk.generation == gallery.generation:
                        gallery.model_version = result.model_version or gallery.model_version
                        gallery.last_indexed_at = utcnow()
                    elif gallery is not None and chunk.generation == gallery.building_generation:
                        gallery.building_model_version = result.model_version
                elif chunk.task == ChunkKind.ERASE and (gallery is None or chunk.generation == gallery.generation):
                    # Retiring an old generation after a rebuild keeps the inventory: the images live on.
                    if job.kind == JobKind.ERASE and gallery is not None:
                        record_erasure(s, job, chunk)  # erased stays erased: no reindex brings it back
                    forget_inventory(s, job.gallery, chunk)
                    if not chunk.paths and not chunk.whole_gallery:
                        forget_faces(s, job.gallery, result.items)  # faces erased by id
                        if job.kind == JobKind.ERASE and gallery is not None:
                            # ...and they stay erased when their image is indexed again (changed, rebuilt).
                            record_face_erasure(s, job, result.erased_faces)
                if first_chunk:
                    events.append((AuditEvent.JOB_STARTED, {"worker_started_at": result.started_at.isoformat()
                                                   if result.started_at else None,
                                                   "model_version": result.model_version}))
            s.add_all(items)
            job.done_items += len(items)
            job.failed_items += sum(1 for i in items if not i.ok)
            job.faces += sum(i.faces or 0 for i in items if i.ok)
            job.done_chunks += 1
            if job.state == JobState.QUEUED:
                job.state = JobState.RUNNING
                job.started_at = job.started_at or utcnow()
            if job.done_chunks >= job.total_chunks:
                job.finished_at = utcnow()
                if job.state != JobState.REFUSED_AT_EXECUTION:
                    if job.failed_items == 0:
                        job.state = JobState.DONE
                    elif job.failed_items >= job.total_items:
                        job.state = JobState.FAILED
                    else:
                        job.state = JobState.PARTLY_FAILED
                followups.extend(self._on_job_finished(s, job))
                probes = s.scalars(select(ProbeResult.matches).where(ProbeResult.job_id == job_id,
                                                                     ProbeResult.not_searched.is_(None))).all()
                below_floor = s.scalar(select(func.count()).where(ProbeResult.job_id == job_id,
                                                                  ProbeResult.not_searched.is_not(None))) or 0
                searched = {}
                if job.kind == JobKind.SEARCH:
                    # What was searched with, by content: each probe image's sha256, and the generation read.
                    digests = s.execute(select(JobItem.path, JobItem.image_sha256).where(JobItem.job_id == job_id)
                                        .order_by(JobItem.id)).all()
                    searched = {"probe_images": [{"path": p, "sha256": d} for p, d in digests][:1000],
                                "generation": chunk.generation}
                events.append((AuditEvent.JOB_FINISHED, {**searched,
                    "state": job.state, "items": job.total_items, "failed_items": job.failed_items,
                    "faces": job.faces, "probe_faces": len(probes), "matches": sum(len(m) for m in probes),
                    "probe_faces_below_quality_floor": below_floor,
                    "threshold": (job.params or {}).get("threshold"), "top_k": (job.params or {}).get("top_k"),
                    "model_version": job.model_version, "untrained": job.untrained}))
            facts: dict[str, Any] = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, username=job.username, job_id=job_id, capability=job.kind,
                         purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
        for event, detail in events:
            self.audit.append(event, detail=detail, **facts)
        for followup in followups:
            followup()

    def _on_job_finished(self, s, job: Job) -> list[Callable[[], object]]:
        """What a finished job changes beyond itself: the gallery's generation swap, audit of erasure."""
        followups: list[Callable[[], object]] = []
        gallery = s.get(Gallery, job.gallery)
        params = job.params or {}
        if job.kind == JobKind.SEARCH and job.finished_at and job.created_at:
            SEARCH_LATENCY.observe((job.finished_at - job.created_at).total_seconds())
        if params.get("upload_folder"):
            snapshot = Job(id=job.id, submitter=job.submitter, api_key_id=job.api_key_id, username=job.username, kind=job.kind,
                           purpose=job.purpose, gallery=job.gallery, params=dict(params))
            followups.append(lambda: self._remove_uploads(snapshot, "job finished"))
        if job.kind in (JobKind.ERASE, JobKind.REINDEX):
            erased = s.scalars(select(JobChunk).where(JobChunk.job_id == job.id, JobChunk.task == ChunkKind.ERASE)).all()
            if erased:
                removed = s.scalars(select(JobItem).where(JobItem.job_id == job.id,
                                                          JobItem.chunk_no.in_([c.chunk_no for c in erased]))).all()
                facts: dict[str, Any] = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, username=job.username, job_id=job.id,
                             capability=ERASE_CAPABILITY, purpose=job.purpose, gallery=job.gallery,
                             registry_hash=job.registry_hash)
                detail = {"images": sorted(i.path for i in removed)[:1000], "image_count": len(removed),
                          "faces_removed": sum(i.faces or 0 for i in removed if i.ok), "scope": params.get("scope")}
                followups.append(lambda: self.audit.append(AuditEvent.ERASURE, detail=detail, **facts))
        if gallery is None:
            return followups
        if job.kind == JobKind.REINDEX:
            gallery.last_reindex_at = utcnow()
        retired = finish_rebuild(gallery, job)
        if retired is not None:
            name = gallery.name
            followups.append(lambda: self.queue_job(
                JobKind.ERASE, name, Principal(SYSTEM_ORGANISATION, None), ERASURE_PURPOSE,
                {"scope": f"generation {retired}"}, [ChunkSpec(ChunkKind.ERASE, [], retired, whole_gallery=True)],
                capability=ERASE_CAPABILITY))
        return followups

    def _authorisation_detail(self, params: dict) -> dict:
        """What a job's audit rows say of the authorisation it stands on: id, kind, reference, authority."""
        from facegate.authorisations import read_authorisation

        if not params.get("authorisation"):
            return {}
        fields = read_authorisation(self.db_url, params["authorisation"]) or {"id": params["authorisation"]}
        return {"authorisation": {k: fields.get(k) for k in ("id", "kind", "reference", "issuing_authority")}}

    def erase_results(self, job_id: str, why: str) -> int:
        """Delete what a search job found (its probe faces, their matches and reviews), audited; the number of
        probe faces erased. The job record stays, saying that its results were erased and why."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            probes = s.scalars(select(ProbeResult).where(ProbeResult.job_id == job_id)).all()
            matches = sum(len(p.matches or []) for p in probes)
            for review in s.scalars(select(MatchReview).where(MatchReview.job_id == job_id)).all():
                s.delete(review)
            s.flush()
            for probe in probes:
                s.delete(probe)
            job.params = {**(job.params or {}), "results_erased": why}
            facts: dict[str, Any] = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, username=job.username, job_id=job_id,
                         capability=job.kind, purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
            remaining = s.scalar(select(func.count()).where(ProbeResult.job_id == job_id))
        self.audit.append(AuditEvent.RESULTS_ERASED, **facts, detail={"why": why, "probe_faces": len(probes),
                                                             "matches": matches, "remaining": remaining})
        return len(probes)

    def withdraw_authorisation(self, principal: Principal, authorisation_id: str, *, reason: str):
        """Withdraw an authorisation: its queued jobs are refused by the worker from now on, and the results of
        every job that stood on it are erased (EU AI Act Art 5(3): stop, and delete the results)."""
        from scheduler.authorisations import AuthorisationService

        view = AuthorisationService(self.settings, self.audit).withdraw(principal, authorisation_id, reason=reason)
        with session_scope(self.db_url) as s:
            jobs = s.scalars(select(Job.id).where(Job.authorisation_id == authorisation_id,
                                                  Job.submitter == principal.organisation_id)).all()
        for job_id in jobs:
            self.erase_results(job_id, f"authorisation {authorisation_id} withdrawn: {reason}")
        return view

    def _remove_uploads(self, job: Job, why: str) -> None:
        """Uploaded probes go when their job ends (or is refused), unless the retention setting keeps them."""
        folder = (job.params or {}).get("upload_folder")
        if not folder:
            return
        facts: dict[str, Any] = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, username=job.username, job_id=job.id, capability=job.kind,
                     purpose=job.purpose, gallery=job.gallery)
        days = self.settings.upload_retention_days
        if days and why != "refused":
            self.audit.append(AuditEvent.UPLOADS_RETAINED, **facts, detail={"folder": folder, "retention_days": days})
            return
        shutil.rmtree(folder, ignore_errors=True)
        self.audit.append(AuditEvent.UPLOADS_REMOVED, **facts, detail={"folder": folder, "why": why,
                                                              "removed": not Path(folder).exists()})

    def wait(self, job_id: str, *, on_update: Callable[[JobView], None] | None = None, poll_s: float = 0.5,
             timeout_s: float | None = None) -> JobView:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # A waiting command heals its own job too (a worker killed, a broker restarted), as beat would.
        next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
        while True:
            if time.monotonic() >= next_reconcile:
                self.reconcile([job_id])
                next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
            view = self.refresh(job_id)
            if on_update:
                on_update(view)
            if view.finished:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s (state {view.state})")
            time.sleep(poll_s)

    def cancel(self, job_id: str, principal: Principal) -> JobView:
        """Stop a job of this organisation: queued chunks are dropped, its state says cancelled."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            kind, gallery = JobKind(job.kind), job.gallery
        # Cancelling is for whoever may start such a job: a user needs the role for its kind.
        self.gate.access.check_role(principal, Action(kind.value), job_id=job_id, gallery=gallery)
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if JobState(job.state).finished:
                return self._with_errors(s, job)
            job.state, job.finished_at = JobState.CANCELLED, utcnow()
            pending = s.scalars(select(JobChunk.chunk_no).where(JobChunk.job_id == job_id,
                                                                JobChunk.folded_at.is_(None))).all()
            facts: dict[str, Any] = dict(organisation_id=job.submitter, **principal.actor, job_id=job_id,
                         capability=job.kind, purpose=job.purpose, gallery=job.gallery)
        if self.queue is not None and pending:
            self.queue.revoke([chunk_task_id(job_id, n) for n in pending])
        self.audit.append(AuditEvent.JOB_CANCELLED, detail={"chunks_dropped": len(pending)}, **facts)
        with session_scope(self.db_url) as s:
            cancelled = s.get(Job, job_id)
        if cancelled is not None:
            self._remove_uploads(cancelled, "cancelled")
        return self.get(job_id)

    def refresh_unfinished(self, limit: int = 200) -> int:
        """Fold what finished for every open job: keeps jobs and the audit log current with nobody polling."""
        with session_scope(self.db_url) as s:
            ids = s.scalars(select(Job.id).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                            .order_by(Job.created_at).limit(limit)).all()
        for job_id in ids:
            self.refresh(job_id)
        return len(ids)

    def mark_interrupted(self, job_id: str, reason: str) -> None:
        """A job whose queue went away (the embedded broker stopped) cannot finish: say so, do not leave it queued."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is not None and not JobState(job.state).finished:
                job.state = JobState.FAILED
                job.error = reason
                job.finished_at = utcnow()
