"""JobService: the whole life of a job, from the checked request to the assembled result."""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from celery import states
from sqlalchemy import func, select, update

from facegate.calibration import Calibration, CalibrationStore
from facegate.db import create_schema, session_scope
from facegate.messages import (
    ChunkMessage,
    ERASE_CHUNK_TASK,
    INDEX_CHUNK_TASK,
    SEARCH_CHUNK_TASK,
    ChunkResult,
    EraseChunk,
    IndexChunk,
    SearchChunk,
    chunk_task_id,
    model_queue,
    validate_gallery_name,
)
from facegate.paths import PathRefused
from facegate.settings import Settings
from facegate.vocabulary import PROGRESS, AuditEvent, ChunkKind, ChunkState, ReviewDecision
from policy import ERASE_CAPABILITY
from scheduler.access import SYSTEM_ORGANISATION, Access, AccessRefused, Action, GalleryHidden
from scheduler.audit import AuditLog
from scheduler.dispatch import TaskQueue
from scheduler.gate import ERASURE_PURPOSE, SubmissionGate
from scheduler.keys import Principal
from scheduler.metrics import SEARCH_LATENCY
from scheduler.models import (
    Gallery,
    GalleryImage,
    Job,
    JobChunk,
    JobItem,
    JobKind,
    JobState,
    MatchReview,
    ProbeResult,
    utcnow,
)

GENERAL_QUEUE = "facegate"
# The rule ids policy/authorisation.py denies with all start so; a worker's refusal that names one means
# the job's authorisation lapsed or was withdrawn.
AUTHORISATION_DENIAL = "deny.authorisation-"


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of a job: its task, its paths, and which generation of the gallery it addresses."""

    task: ChunkKind
    paths: list[str]
    generation: int = 0
    whole_gallery: bool = False
    # Set for a rebuild: only workers of this model version may fill the new generation.
    model_version: str | None = None


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

    def submit_index(self, directory: str | Path, gallery: str, principal: Principal, purpose: str, *,
                     quality_filter: str | None = None) -> JobView:
        """Index a folder into a gallery; `quality_filter` (a name in the registry's `quality_filters`)
        leaves out faces below it, and the gallery keeps it for its reindexing."""
        gallery = self._gallery(gallery)
        if quality_filter is not None:
            known = self.gate.quality_filters()
            if quality_filter not in known:
                raise JobRefused(f"quality filter {quality_filter!r} is not in the registry "
                                 f"(known: {', '.join(sorted(known)) or 'none'})")
        job_id = uuid.uuid4().hex
        access = self.gate.access.authorize(principal, Action.INDEX, gallery, purpose=purpose, job_id=job_id,
                                            raise_on_denial=False)
        label, gallery = gallery, access.gallery  # the caller's name for it; the store's key
        if not access.allowed:  # denied: recorded as a refused job, and no path of the request is read
            return self.queue_job(JobKind.INDEX, gallery, principal, purpose, {"directory": str(directory)}, [],
                                  capability="index", access=access, job_id=job_id, label=label)
        images = self._readable(principal, [directory], Action.INDEX, directory=True)
        if not images:
            raise JobRefused(f"no images found under {directory} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff)")
        params = {"directory": str(Path(directory).expanduser().resolve())}
        if quality_filter is not None:
            params["quality_filter"] = quality_filter
        return self._create_and_queue(JobKind.INDEX, gallery, principal, purpose, params, images,
                                      self.settings.index_chunk_size, access, job_id, label)

    def submit_search(self, paths: Sequence[str | Path], gallery: str, principal: Principal, purpose: str, *,
                      top_k: int | None = None, threshold: float | None = None, aligned: bool = False,
                      upload_folder: Path | None = None, authorisation: str | None = None) -> JobView:
        """Search probes against a gallery. `authorisation` names the recorded legal authorisation the
        search stands on (scheduler/authorisations.py), required when the purpose asks for one."""
        gallery = self._gallery(gallery)
        if not paths:
            raise JobRefused("a search job needs at least one probe file or folder")
        images = self._readable(principal, paths, Action.SEARCH)
        if not images:
            raise JobRefused("no probe images found in " + ", ".join(str(p) for p in paths))
        job_id = uuid.uuid4().hex
        access = self.gate.access.authorize(principal, Action.SEARCH, gallery, purpose=purpose, job_id=job_id,
                                            raise_on_denial=False)
        label, gallery = gallery, access.gallery
        top_k = top_k if top_k is not None else self.settings.default_top_k
        if threshold is None:
            # Unset: the purpose's floor for this gallery's model, never a number the policy would refuse.
            floor = self.gate.floor_for(purpose, access.model_version)
            threshold = max(self.settings.default_threshold_for(access.model_version), floor if floor is not None else -1.0)
        if not 1 <= top_k <= 1000:
            raise JobRefused(f"top-k must be between 1 and 1000, got {top_k}")
        if not -1.0 <= threshold <= 1.0:
            raise JobRefused(f"threshold is a cosine similarity between -1 and 1, got {threshold}")
        params = {"probes": [str(p) for p in paths], "top_k": top_k, "threshold": threshold, "aligned": aligned}
        if upload_folder is not None:
            params["upload_folder"] = str(upload_folder)
        if authorisation:
            params["authorisation"] = authorisation
        return self._create_and_queue(JobKind.SEARCH, gallery, principal, purpose, params, images,
                                      self.settings.search_chunk_size, access, job_id, label)

    def _readable(self, principal: Principal, paths: Sequence[str | Path], action: Action, *,
                  directory: bool = False) -> list[Path]:
        try:
            return self.gate.access.readable_paths(principal, paths, action=action, directory=directory)
        except PathRefused as exc:
            self.audit.append(AuditEvent.ACCESS_REFUSED, organisation_id=principal.organisation_id,
                              api_key_id=principal.key_id, capability=action.value, allowed=False,
                              rule_ids=["deny.path-not-readable"], detail={"reason": str(exc)})
            raise JobRefused(str(exc)) from None

    @staticmethod
    def _gallery(name: str) -> str:
        try:
            return validate_gallery_name(name)
        except ValueError as exc:
            raise JobRefused(str(exc)) from None

    def _create_and_queue(self, kind: JobKind, gallery: str, principal: Principal, purpose: str, params: dict,
                          images: list[Path], chunk_size: int, access: Access, job_id: str,
                          label: str | None = None) -> JobView:
        task = ChunkKind.SEARCH if kind is JobKind.SEARCH else ChunkKind.INDEX
        with session_scope(self.db_url) as s:
            known = s.get(Gallery, gallery)
            generation = known.generation if known else 0
        specs = [ChunkSpec(task, [str(p) for p in images[i : i + chunk_size]], generation)
                 for i in range(0, len(images), chunk_size)]
        return self.queue_job(kind, gallery, principal, purpose, params, specs, capability=kind.value,
                              access=access, job_id=job_id, label=label)

    def queue_job(self, kind: JobKind, gallery: str, principal: Principal, purpose: str, params: dict,
                  specs: list["ChunkSpec"], *, capability: str, access: Access | None = None,
                  job_id: str | None = None, label: str | None = None) -> JobView:
        """Gate, record and queue a job made of chunk specs; a denied job is recorded and never queued.

        `access` is the access rule's answer for this request (taken here when not given)."""
        if self.queue is None:
            raise RuntimeError("this JobService has no task queue: it can read jobs but not run them")
        job_id = job_id or uuid.uuid4().hex
        with session_scope(self.db_url) as s:
            known = s.get(Gallery, gallery)
            model_version = known.model_version if known else None
            current_generation = known.generation if known else 0
            label = label or (known.label if known else None) or gallery
        total_items = sum(1 if spec.whole_gallery else len(spec.paths) for spec in specs)
        if capability == ERASE_CAPABILITY:
            admission = self.gate.admit_erasure(principal, job_id=job_id, gallery=gallery, access=access)
        else:
            if access is None:
                action = Action.REINDEX if kind is JobKind.REINDEX else Action(capability)
                access = self.gate.access.authorize(principal, action, gallery, purpose=purpose, job_id=job_id,
                                                    raise_on_denial=False)
            admission = self.gate.admit(principal, capability, purpose, job_id=job_id, gallery=gallery,
                                        threshold=params.get("threshold"), model_version=model_version,
                                        access=access, authorisation=params.get("authorisation"))
        decision = admission.decision
        job = Job(id=job_id, kind=kind, submitter=principal.organisation_id, api_key_id=principal.key_id,
                  purpose=purpose, gallery=gallery, gallery_label=label, params=params, total_items=total_items,
                  registry_hash=decision.registry_hash, decision_rule_ids=list(decision.rule_ids),
                  decision_reason=decision.reason, review_required=admission.review_required,
                  authorisation_id=params.get("authorisation"))
        if not admission.allowed:
            job.state, job.error, job.finished_at = JobState.REFUSED, decision.reason, utcnow()
            with session_scope(self.db_url) as s:
                s.add(job)
            owner = access.owner if access is not None else None
            self.audit.append(AuditEvent.JOB_REFUSED, organisation_id=principal.organisation_id, api_key_id=principal.key_id,
                              job_id=job_id, capability=capability, purpose=purpose, gallery=gallery,
                              registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=False,
                              detail={"reason": decision.reason, "items": total_items,
                                      **({"on_behalf_of": owner} if owner and owner != principal.organisation_id
                                         else {})})
            self._remove_uploads(job, "refused")
            raise JobDenied(self.get(job_id))

        job.state, job.total_chunks = JobState.QUEUED, len(specs)
        if not specs:  # nothing to do (a reindex that found no change): done, and recorded as such
            job.state, job.started_at, job.finished_at = JobState.DONE, utcnow(), utcnow()
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, gallery)
            if kind in (JobKind.INDEX, JobKind.REINDEX) and row is None:
                row = Gallery(name=gallery, label=label, owner=principal.organisation_id, purpose=purpose)
                s.add(row)
            elif kind is JobKind.INDEX and row is not None and row.purpose is None:
                row.purpose = purpose
            if kind is JobKind.INDEX and params.get("quality_filter"):
                row.quality_filter = params["quality_filter"]
            s.add(job)
            s.flush()
            s.add_all(JobChunk(job_id=job_id, chunk_no=n, paths=spec.paths, task=spec.task,
                               generation=spec.generation, whole_gallery=spec.whole_gallery)
                      for n, spec in enumerate(specs))
        self.audit.append(AuditEvent.JOB_SUBMITTED, organisation_id=principal.organisation_id, api_key_id=principal.key_id,
                          job_id=job_id, capability=capability, purpose=purpose, gallery=gallery,
                          registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=True,
                          detail={"items": total_items, "chunks": len(specs), "generation": current_generation,
                                  **({"on_behalf_of": access.owner} if access is not None and access.owner
                                     and access.owner != principal.organisation_id else {}),
                                  **{k: v for k, v in params.items() if k not in ("probes", "paths", "authorisation")},
                                  **self._authorisation_detail(params)})
        erasure = None
        for n, spec in enumerate(specs):
            signer = admission
            if spec.task is ChunkKind.ERASE and capability != ERASE_CAPABILITY:
                # A reindex also removes deleted files: that part runs under an erasure ticket of its own.
                erasure = erasure or self.gate.admit_erasure(principal, job_id=job_id, gallery=gallery)
                signer = erasure
            task_name, message = self._message(job_id, n, gallery, spec, params)
            message.ticket = signer.ticket_for(message)
            self.queue.send(task_name, message.model_dump(mode="json"), task_id=chunk_task_id(job_id, n),
                            queue=self._route(spec, model_version, known))
        return self.get(job_id)

    @staticmethod
    def _route(spec: "ChunkSpec", model_version: str | None, gallery: Gallery | None) -> str:
        """Searches, and indexing into a gallery's current generation, go to workers of its model version."""
        if spec.model_version is not None:
            return model_queue(spec.model_version)
        if spec.task is ChunkKind.ERASE or model_version is None or gallery is None:
            return GENERAL_QUEUE
        if spec.generation == gallery.generation:
            return model_queue(model_version)
        return GENERAL_QUEUE  # a rebuild's new generation: any worker, whose model the rebuild adopts

    @staticmethod
    def _message(job_id: str, chunk_no: int, gallery: str, spec: "ChunkSpec",
                 params: dict) -> tuple[str, ChunkMessage]:
        common = dict(job_id=job_id, chunk_no=chunk_no, gallery=gallery, generation=spec.generation)
        if spec.task is ChunkKind.INDEX:
            return INDEX_CHUNK_TASK, IndexChunk(paths=spec.paths, quality_filter=params.get("quality_filter"),
                                                **common)
        if spec.task is ChunkKind.ERASE:
            return ERASE_CHUNK_TASK, EraseChunk(paths=spec.paths, whole_gallery=spec.whole_gallery, **common)
        return SEARCH_CHUNK_TASK, SearchChunk(paths=spec.paths, top_k=params["top_k"], threshold=params["threshold"],
                                              aligned=params.get("aligned", False), **common)

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
            elif status.state in (states.STARTED, PROGRESS, states.RETRY):
                in_flight += status.progress_done
                self._mark_running(job_id)
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return self._with_errors(s, job, in_flight)

    def _mark_running(self, job_id: str) -> None:
        with session_scope(self.db_url) as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                      .values(state=JobState.RUNNING, started_at=utcnow()))

    def _fold(self, job_id: str, chunk_no: int, payload: dict | None, task_error: str | None) -> None:
        events: list[tuple[str, dict]] = []
        followups: list[Callable[[], object]] = []
        with session_scope(self.db_url) as s:
            # Only one folder wins a chunk, however many processes refresh the same job.
            claimed = s.execute(
                update(JobChunk)
                .where(JobChunk.job_id == job_id, JobChunk.chunk_no == chunk_no, JobChunk.folded_at.is_(None))
                .values(folded_at=utcnow(), state=ChunkState.DONE if payload else ChunkState.FAILED)
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
                job.state = JobState.REFUSED_AT_EXECUTION
                events.append((AuditEvent.JOB_REFUSED_AT_EXECUTION, {"reason": result.refused, "chunk": chunk_no}))
                if AUTHORISATION_DENIAL in result.refused:
                    # Its authorisation lapsed or was withdrawn: what the job found so far goes too.
                    followups.append(lambda: self.erase_results(job_id, "its authorisation is no longer valid: "
                                                                + result.refused))
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
                s.add_all(ProbeResult(job_id=job_id, path=p.path, face_no=p.face_no, box=p.box,
                                      probability=p.probability, quality=p.quality, not_searched=p.not_searched,
                                      matches=[{**m.model_dump(), "review": review, "probe_quality": p.quality,
                                                **_false_match_rate(calibration, m.similarity)}
                                               for m in p.matches])
                          for p in result.probes)
                gallery = s.get(Gallery, job.gallery)
                if chunk.task == ChunkKind.INDEX:
                    self._record_inventory(s, job.gallery, result.items)
                    if gallery is not None and chunk.generation == gallery.generation:
                        gallery.model_version = result.model_version or gallery.model_version
                        gallery.last_indexed_at = utcnow()
                    elif gallery is not None and chunk.generation == gallery.building_generation:
                        gallery.building_model_version = result.model_version
                elif chunk.task == ChunkKind.ERASE and (gallery is None or chunk.generation == gallery.generation):
                    # Retiring an old generation after a rebuild keeps the inventory: the images live on.
                    self._forget_inventory(s, job.gallery, chunk)
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
            facts = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, job_id=job_id, capability=job.kind,
                         purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
        for event, detail in events:
            self.audit.append(event, detail=detail, **facts)
        for followup in followups:
            followup()

    def _record_inventory(self, s, gallery: str, items) -> None:  # noqa: ANN001
        for item in items:
            try:
                stat = Path(item.path).stat()
                size, mtime_ns = stat.st_size, stat.st_mtime_ns
            except OSError:
                size = mtime_ns = None
            s.merge(GalleryImage(gallery=gallery, path=item.path, image_sha256=item.image_sha256, faces=item.faces,
                                 ok=item.ok, reason=item.reason, size=size, mtime_ns=mtime_ns, indexed_at=utcnow()))

    @staticmethod
    def _forget_inventory(s, gallery: str, chunk: JobChunk) -> None:  # noqa: ANN001
        rows = select(GalleryImage).where(GalleryImage.gallery == gallery)
        if not chunk.whole_gallery:
            rows = rows.where(GalleryImage.path.in_(chunk.paths))
        for row in s.scalars(rows).all():
            s.delete(row)

    def _on_job_finished(self, s, job: Job) -> list[Callable[[], object]]:  # noqa: ANN001
        """What a finished job changes beyond itself: the gallery's generation swap, audit of erasure."""
        followups: list[Callable[[], object]] = []
        gallery = s.get(Gallery, job.gallery)
        params = job.params or {}
        if job.kind == JobKind.SEARCH and job.finished_at and job.created_at:
            SEARCH_LATENCY.observe((job.finished_at - job.created_at).total_seconds())
        if params.get("upload_folder"):
            snapshot = Job(id=job.id, submitter=job.submitter, api_key_id=job.api_key_id, kind=job.kind,
                           purpose=job.purpose, gallery=job.gallery, params=dict(params))
            followups.append(lambda: self._remove_uploads(snapshot, "job finished"))
        if job.kind in (JobKind.ERASE, JobKind.REINDEX):
            erased = s.scalars(select(JobChunk).where(JobChunk.job_id == job.id, JobChunk.task == ChunkKind.ERASE)).all()
            if erased:
                removed = s.scalars(select(JobItem).where(JobItem.job_id == job.id,
                                                          JobItem.chunk_no.in_([c.chunk_no for c in erased]))).all()
                facts = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, job_id=job.id,
                             capability=ERASE_CAPABILITY, purpose=job.purpose, gallery=job.gallery,
                             registry_hash=job.registry_hash)
                detail = {"images": sorted(i.path for i in removed)[:1000], "image_count": len(removed),
                          "faces_removed": sum(i.faces or 0 for i in removed if i.ok), "scope": params.get("scope")}
                followups.append(lambda: self.audit.append(AuditEvent.ERASURE, detail=detail, **facts))
        if gallery is None:
            return followups
        if job.kind == JobKind.REINDEX:
            gallery.last_reindex_at = utcnow()
        rebuild = params.get("rebuild_generation")
        if rebuild is not None and gallery.building_generation == rebuild:
            old_generation = gallery.generation
            if job.state in (JobState.DONE, JobState.PARTLY_FAILED):
                # Searches switch only now, to a complete collection; the old one is then erased.
                gallery.generation = rebuild
                gallery.model_version = gallery.building_model_version or job.model_version
                retired = old_generation
            else:
                retired = rebuild  # a failed rebuild leaves the old generation in place
            gallery.building_generation = gallery.building_model_version = None
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
            facts = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, job_id=job_id,
                         capability=job.kind, purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
            remaining = s.scalar(select(func.count()).where(ProbeResult.job_id == job_id))
        self.audit.append(AuditEvent.RESULTS_ERASED, **facts, detail={"why": why, "probe_faces": len(probes),
                                                             "matches": matches, "remaining": remaining})
        return len(probes)

    def withdraw_authorisation(self, principal: Principal, authorisation_id: str, *, reason: str):  # noqa: ANN201
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
        facts = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, job_id=job.id, capability=job.kind,
                     purpose=job.purpose, gallery=job.gallery)
        days = self.settings.upload_retention_days
        if days and why != "refused":
            self.audit.append(AuditEvent.UPLOADS_RETAINED, **facts, detail={"folder": folder, "retention_days": days})
            return
        shutil.rmtree(folder, ignore_errors=True)
        self.audit.append(AuditEvent.UPLOADS_REMOVED, **facts, detail={"folder": folder, "why": why,
                                                              "removed": not Path(folder).exists()})

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

    def cancel(self, job_id: str, principal: Principal) -> JobView:
        """Stop a job of this organisation: queued chunks are dropped, its state says cancelled."""
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            if JobState(job.state).finished:
                return self._with_errors(s, job)
            job.state, job.finished_at = JobState.CANCELLED, utcnow()
            pending = s.scalars(select(JobChunk.chunk_no).where(JobChunk.job_id == job_id,
                                                                JobChunk.folded_at.is_(None))).all()
            facts = dict(organisation_id=job.submitter, api_key_id=principal.key_id, job_id=job_id,
                         capability=job.kind, purpose=job.purpose, gallery=job.gallery)
        if self.queue is not None and pending:
            self.queue.revoke([chunk_task_id(job_id, n) for n in pending])
        self.audit.append(AuditEvent.JOB_CANCELLED, detail={"chunks_dropped": len(pending)}, **facts)
        with session_scope(self.db_url) as s:
            cancelled = s.get(Job, job_id)
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
                     "quality": r.quality, "not_searched": r.not_searched, "matches": r.matches} for r in rows]

    def count_probe_results(self, job_id: str) -> int:
        with session_scope(self.db_url) as s:
            return s.scalar(select(func.count()).where(ProbeResult.job_id == job_id)) or 0

    def review_match(self, job_id: str, probe_result_id: int, face_id: str, *, confirmed: bool, reviewer: str,
                     principal: Principal, note: str | None = None) -> dict:
        """Record a person's confirmation or rejection of one match; the match's review state follows."""
        if not reviewer or not reviewer.strip():
            raise JobRefused("a review names its reviewer: the reviewer was empty or only spaces")
        reviewer = reviewer.strip()
        decision = ReviewDecision.CONFIRMED if confirmed else ReviewDecision.REJECTED
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            gallery, purpose = job.gallery, job.purpose
        # Reviewing a match reads faces: decided for this organisation, now, like the search was.
        self.gate.access.authorize(principal, Action.REVIEW, gallery, purpose=purpose, job_id=job_id, by_key=True)
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
        self.audit.append(AuditEvent.review(decision), **facts,
                          detail={"probe_result_id": probe_result_id, "face_id": face_id, "reviewer": reviewer,
                                  "image_path": target["image_path"], "similarity": target["similarity"],
                                  "note": note})
        return target
