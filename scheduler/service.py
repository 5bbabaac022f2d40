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
from scheduler.dispatch import TaskQueue
from scheduler.models import Job, JobChunk, JobItem, JobKind, JobState, ProbeResult, utcnow


class JobRefused(ValueError):
    """The request was refused before anything was queued; the message says why."""


class JobNotFound(LookupError):
    pass


@dataclass
class JobView:
    """A job as a caller sees it, with live progress from chunks still running."""

    id: str
    kind: str
    submitter: str
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
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    errors: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return JobState(self.state).finished


def _view(job: Job, in_flight_done: int = 0) -> JobView:
    return JobView(
        id=job.id, kind=job.kind, submitter=job.submitter, gallery=job.gallery, state=job.state,
        total_items=job.total_items, done_items=min(job.total_items, job.done_items + in_flight_done),
        failed_items=job.failed_items, faces=job.faces, model_version=job.model_version,
        untrained=job.untrained, error=job.error, params=dict(job.params or {}), created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


class JobService:
    def __init__(self, settings: Settings, queue: TaskQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.db_url = settings.resolved_database_url
        create_schema(self.db_url)

    # Submission ---------------------------------------------------------------------------------

    def submit_index(self, directory: str | Path, gallery: str, submitter: str) -> JobView:
        gallery = self._gallery(gallery)
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
        return self._create_and_queue(JobKind.INDEX, gallery, submitter, params, images,
                                      self.settings.index_chunk_size)

    def submit_search(self, paths: Sequence[str | Path], gallery: str, submitter: str, *, top_k: int | None = None,
                      threshold: float | None = None, aligned: bool = False) -> JobView:
        gallery = self._gallery(gallery)
        if not paths:
            raise JobRefused("a search job needs at least one probe file or folder")
        try:
            images = confined_images(paths, self.settings.resolved_gallery_roots)
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        if not images:
            raise JobRefused("no probe images found in " + ", ".join(str(p) for p in paths))
        top_k = top_k if top_k is not None else self.settings.default_top_k
        threshold = threshold if threshold is not None else self.settings.default_threshold
        if not 1 <= top_k <= 1000:
            raise JobRefused(f"top-k must be between 1 and 1000, got {top_k}")
        if not -1.0 <= threshold <= 1.0:
            raise JobRefused(f"threshold is a cosine similarity between -1 and 1, got {threshold}")
        params = {"probes": [str(p) for p in paths], "top_k": top_k, "threshold": threshold, "aligned": aligned}
        return self._create_and_queue(JobKind.SEARCH, gallery, submitter, params, images,
                                      self.settings.search_chunk_size)

    @staticmethod
    def _gallery(name: str) -> str:
        try:
            return validate_gallery_name(name)
        except ValueError as exc:
            raise JobRefused(str(exc)) from None

    def _create_and_queue(self, kind: JobKind, gallery: str, submitter: str, params: dict,
                          images: list[Path], chunk_size: int) -> JobView:
        if self.queue is None:
            raise RuntimeError("this JobService has no task queue: it can read jobs but not run them")
        job_id = uuid.uuid4().hex
        chunks = [[str(p) for p in images[i : i + chunk_size]] for i in range(0, len(images), chunk_size)]
        with session_scope(self.db_url) as s:
            s.add(Job(id=job_id, kind=kind.value, submitter=submitter, gallery=gallery, state=JobState.QUEUED.value,
                      params=params, total_items=len(images), total_chunks=len(chunks)))
            s.flush()
            s.add_all(JobChunk(job_id=job_id, chunk_no=n, paths=paths) for n, paths in enumerate(chunks))
        for n, paths in enumerate(chunks):
            self.queue.send(*self._message(kind, job_id, n, gallery, paths, params), task_id=chunk_task_id(job_id, n))
        return self.get(job_id)

    @staticmethod
    def _message(kind: JobKind, job_id: str, chunk_no: int, gallery: str, paths: list[str],
                 params: dict) -> tuple[str, dict]:
        if kind is JobKind.INDEX:
            msg = IndexChunk(job_id=job_id, chunk_no=chunk_no, gallery=gallery, paths=paths)
            return INDEX_CHUNK_TASK, msg.model_dump(mode="json")
        msg = SearchChunk(job_id=job_id, chunk_no=chunk_no, gallery=gallery, paths=paths, top_k=params["top_k"],
                          threshold=params["threshold"], aligned=params.get("aligned", False))
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
            if payload is not None:
                result = ChunkResult.model_validate(payload)
                chunk_error = result.error or result.refused
                items = result.items
                if chunk_error:
                    job.error = job.error or chunk_error
                    items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=p, ok=False, reason=chunk_error)
                             for p in chunk.paths]
                else:
                    items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=i.path, ok=i.ok, reason=i.reason,
                                     faces=i.faces, image_sha256=i.image_sha256) for i in result.items]
                if result.model_version:
                    job.model_version = result.model_version
                job.untrained = job.untrained or result.untrained
                if result.started_at and (job.started_at is None or result.started_at < job.started_at):
                    job.started_at = result.started_at
                s.add_all(ProbeResult(job_id=job_id, path=p.path, face_no=p.face_no, box=p.box,
                                      probability=p.probability, matches=[m.model_dump() for m in p.matches])
                          for p in result.probes)
            else:
                reason = f"chunk failed in the worker: {task_error}"
                job.error = job.error or reason
                items = [JobItem(job_id=job_id, chunk_no=chunk_no, path=p, ok=False, reason=reason)
                         for p in chunk.paths]
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
                if job.failed_items == 0:
                    job.state = JobState.DONE.value
                elif job.failed_items >= job.total_items:
                    job.state = JobState.FAILED.value
                else:
                    job.state = JobState.PARTLY_FAILED.value

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

    def get(self, job_id: str) -> JobView:
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            return self._with_errors(s, job)

    def list_jobs(self, limit: int = 50) -> list[JobView]:
        with session_scope(self.db_url) as s:
            jobs = s.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()
            return [_view(j) for j in jobs]

    def probe_results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[dict]:
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(ProbeResult).where(ProbeResult.job_id == job_id)
                             .order_by(ProbeResult.path, ProbeResult.face_no).offset(offset).limit(limit)).all()
            return [{"path": r.path, "face_no": r.face_no, "box": r.box, "probability": r.probability,
                     "matches": r.matches} for r in rows]
