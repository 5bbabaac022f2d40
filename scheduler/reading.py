"""Reading jobs: the view a caller gets (with live progress), results, and the review of a match."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from facegate.calibration import Calibration
from facegate.db import session_scope
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent, ReviewDecision
from scheduler.access import Action, GalleryHidden
from scheduler.audit import AuditLog
from scheduler.dispatch import TaskQueue
from scheduler.gate import SubmissionGate
from scheduler.keys import Principal
from scheduler.reviews import ReviewEntry, needed_reviewers, review_state
from scheduler.users import USER_KEY_PREFIX
from scheduler.models import (
    NOT_SENT,
    Job,
    JobChunk,
    JobItem,
    JobKind,
    JobState,
    MatchReview,
    ProbeResult,
    utcnow,
)


NO_FACE_REASON = "no face found"


class JobRefused(ValueError):
    """The request was refused before anything was queued; the message says why."""


class JobNotFound(LookupError):
    pass


# No such gallery for this organisation (another's gallery is reported the same way): the access rule's.
UnknownGallery = GalleryHidden


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
    authorisation_id: str | None = None
    # What the reconciler did to keep the job going ("worker w1 stopped answering during chunk 3 ...; re-sent").
    notes: list[str] = field(default_factory=list)
    # A search job's probe images in which no face was found: an outcome of its own, never "no match".
    no_face: list[dict] = field(default_factory=list)
    # Items decided at submission, never sent to a worker: erased images an index job left out, and why.
    not_indexed: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return JobState(self.state).finished


def _false_match_rate(calibration: Calibration | None, similarity: float) -> dict:
    """What a similarity means for its model: the false-match rate, when the model version is calibrated."""
    if calibration is None:
        return {"false_match_rate": None, "false_match_rate_below_limit": None}
    estimate = calibration.fmr_at(similarity)
    return {"false_match_rate": estimate.fmr, "false_match_rate_below_limit": estimate.below_resolution_limit}


def _view(job: Job, in_flight_done: int = 0) -> JobView:
    return JobView(
        id=job.id, kind=job.kind, submitter=job.submitter, api_key_id=job.api_key_id, purpose=job.purpose,
        gallery=job.gallery_label or job.gallery, state=job.state,
        total_items=job.total_items, done_items=min(job.total_items, job.done_items + in_flight_done),
        failed_items=job.failed_items, faces=job.faces, model_version=job.model_version,
        untrained=job.untrained, error=job.error, params=dict(job.params or {}), registry_hash=job.registry_hash,
        decision_rule_ids=list(job.decision_rule_ids or []), decision_reason=job.decision_reason,
        review_required=job.review_required, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, authorisation_id=job.authorisation_id,
        notes=list(job.notes or []),
    )


class JobReading:
    """JobService's reading half."""

    settings: Settings
    queue: TaskQueue | None
    db_url: str
    audit: AuditLog
    gate: SubmissionGate

    def _with_errors(self, s, job: Job, in_flight: int = 0) -> JobView:
        view = _view(job, in_flight)
        failed = s.scalars(select(JobItem).where(JobItem.job_id == job.id, JobItem.ok.is_(False))
                           .order_by(JobItem.id).limit(1000)).all()
        view.errors = [{"path": i.path, "reason": i.reason} for i in failed]
        if job.kind == JobKind.SEARCH:
            view.no_face = self.no_face_items(job.id, s=s)
        not_sent = s.scalars(select(JobItem).where(JobItem.job_id == job.id, JobItem.chunk_no == NOT_SENT)
                             .order_by(JobItem.id).limit(1000)).all()
        view.not_indexed = [{"path": i.path, "reason": i.reason} for i in not_sent]
        return view

    def no_face_items(self, job_id: str, limit: int = 1000, *, s=None) -> list[dict]:
        """The probe images of a search job read without error in which the detector found no face."""
        if s is None:
            with session_scope(self.db_url) as s:
                return self.no_face_items(job_id, limit, s=s)
        rows = s.scalars(select(JobItem.path).where(JobItem.job_id == job_id, JobItem.ok.is_(True),
                                                    JobItem.faces == 0).order_by(JobItem.id).limit(limit)).all()
        return [{"path": path, "reason": NO_FACE_REASON} for path in rows]

    # Reading ------------------------------------------------------------------------------------

    def get(self, job_id: str, organisation_id: str | None = None) -> JobView:
        """One job; with an organisation, only if it is that organisation's (another's is 'not found')."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or (organisation_id is not None and job.submitter != organisation_id):
                raise JobNotFound(f"no job {job_id}")
            return self._with_errors(s, job)

    def chunks(self, job_id: str, organisation_id: str | None = None) -> list[dict]:
        """Where each chunk of a job is, as the reconciler last placed it: state, worker, since when, sends."""
        self.get(job_id, organisation_id)
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.chunk_no)).all()
            return [{"chunk": c.chunk_no, "task": c.task, "state": c.state, "images": len(c.paths or []),
                     "worker": c.worker, "running_since": c.running_since, "sends": c.sends,
                     "sent_at": c.sent_at, "unplaced_since": c.unplaced_since} for c in rows]

    def resolve_job_id(self, ref: str, organisation_id: str | None = None) -> str:
        """A job id from its whole id or a unique prefix of it (at least 4 characters), among this
        organisation's jobs; JobNotFound when none matches, JobRefused naming the candidates when several do."""
        ref = (ref or "").strip().lower()
        with session_scope(self.db_url) as s:
            job = s.get(Job, ref)
            if job is not None and (organisation_id is None or job.submitter == organisation_id):
                return job.id
            if len(ref) < 4 or not all(c in "0123456789abcdef" for c in ref):
                raise JobNotFound(f"no job {ref}")
            query = select(Job.id).where(Job.id.startswith(ref)).limit(6)
            if organisation_id is not None:
                query = query.where(Job.submitter == organisation_id)
            found = s.scalars(query).all()
        if not found:
            raise JobNotFound(f"no job {ref}")
        if len(found) > 1:
            raise JobRefused(f"job id {ref} is ambiguous: it starts {len(found) if len(found) < 6 else 'many'} jobs "
                             f"({', '.join(f[:12] for f in found[:5])}…); give more of it")
        return found[0]

    def list_jobs(self, limit: int = 50, organisation_id: str | None = None) -> list[JobView]:
        with session_scope(self.db_url) as s:
            query = select(Job).order_by(Job.created_at.desc()).limit(limit)
            if organisation_id is not None:
                query = query.where(Job.submitter == organisation_id)
            return [_view(j) for j in s.scalars(query).all()]

    def probe_results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[dict]:
        """One page of probe faces with their matches; each match's review state is read from its reviews."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            rows = s.scalars(select(ProbeResult).where(ProbeResult.job_id == job_id)
                             .order_by(ProbeResult.path, ProbeResult.face_no).offset(offset).limit(limit)).all()
            reviews = _reviews_of(s, job_id, [r.id for r in rows])
            review_required = bool(job.review_required) if job is not None else False
            needed = needed_reviewers(job.reviewers_required or 0, review_required) if job is not None else 1
            return [{"id": r.id, "path": r.path, "face_no": r.face_no, "box": r.box, "probability": r.probability,
                     "quality": r.quality, "not_searched": r.not_searched,
                     "matches": [{**m, **review_state(reviews.get((r.id, m["face_id"]), []), needed=needed,
                                                      review_required=review_required)} for m in r.matches]}
                    for r in rows]

    def count_probe_results(self, job_id: str) -> int:
        with session_scope(self.db_url) as s:
            return s.scalar(select(func.count()).where(ProbeResult.job_id == job_id)) or 0

    def review_match(self, job_id: str, probe_result_id: int, face_id: str, *, confirmed: bool, principal: Principal,
                     reviewer: str | None = None, note: str | None = None) -> dict:
        """Append one review of one match, by the signed-in user (`reviewer`, if given, must name that
        user); the match's review state follows from all its reviews. Audited."""
        if principal.is_user:
            if reviewer is not None and reviewer.strip() != principal.user:
                raise JobRefused(f"a review is recorded with the signed-in user ({principal.user!r}); it cannot "
                                 f"name another reviewer ({reviewer.strip()!r})")
        elif reviewer is not None:
            raise JobRefused("a review is recorded with the signed-in user, never a typed name: sign in as the "
                             "reviewer (HTTP Basic, or the CLI's --user) instead of naming one")
        decision = ReviewDecision.CONFIRMED if confirmed else ReviewDecision.REJECTED
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            gallery, purpose, human_review = job.gallery, job.purpose, job.review_required
        # Reviewing a match reads faces: decided for this organisation, now, like the search was; a match
        # that needs human review is reviewed by a user with the reviewer role, never by a machine key.
        self.gate.access.authorize(principal, Action.REVIEW, gallery, purpose=purpose, job_id=job_id, by_key=True,
                                   human_review=human_review)
        name = principal.user or f"key {principal.key_id}"
        user_id = principal.key_id.removeprefix(USER_KEY_PREFIX) if principal.is_user and principal.key_id else None
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            probe = s.get(ProbeResult, probe_result_id)
            if probe is None or probe.job_id != job_id:
                raise JobNotFound(f"no probe face {probe_result_id} in job {job_id}")
            target = next((dict(m) for m in probe.matches if m["face_id"] == face_id), None)
            if target is None:
                raise JobNotFound(f"no match {face_id} for probe face {probe_result_id}")
            s.add(MatchReview(job_id=job_id, probe_result_id=probe_result_id, face_id=face_id, decision=decision,
                              reviewer=name, reviewer_user_id=user_id, api_key_id=principal.key_id,
                              organisation_id=principal.organisation_id, note=note, at=utcnow()))
            s.flush()
            needed = needed_reviewers(job.reviewers_required or 0, job.review_required)
            state = review_state(_reviews_of(s, job_id, [probe_result_id]).get((probe_result_id, face_id), []),
                                 needed=needed, review_required=job.review_required)
            facts: dict[str, Any] = dict(organisation_id=principal.organisation_id, **principal.actor,
                                         job_id=job_id, capability=job.kind, purpose=job.purpose, gallery=job.gallery)
        self.audit.append(AuditEvent.review(decision), **facts,
                          detail={"probe_result_id": probe_result_id, "face_id": face_id, "reviewer": name,
                                  "user_id": user_id, "image_path": target["image_path"],
                                  "similarity": target["similarity"], "note": note, "state": state["review"],
                                  "confirmations": state["confirmations"], "reviewers_required": needed})
        return {**target, **state}


def _reviews_of(s, job_id: str, probe_ids: list[int]) -> dict[tuple[int, str], list[ReviewEntry]]:
    """Every review of the matches of these probe faces, by (probe face id, gallery face id)."""
    found: dict[tuple[int, str], list[ReviewEntry]] = {}
    if not probe_ids:
        return found
    for r in s.scalars(select(MatchReview).where(MatchReview.job_id == job_id,
                                                  MatchReview.probe_result_id.in_(probe_ids))
                       .order_by(MatchReview.at, MatchReview.id)):
        identity = r.reviewer_user_id or r.api_key_id or r.reviewer
        found.setdefault((r.probe_result_id, r.face_id), []).append(
            ReviewEntry(r.reviewer, identity, ReviewDecision(r.decision), r.at, r.note))
    return found
