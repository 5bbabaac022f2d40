"""Jobs that heal: find the chunks nothing will run any more, send them again, or fail them with a reason.

A chunk is acknowledged only when its worker is done with it (late acks), yet work can still be lost: a
worker killed while it holds a chunk leaves the message unacknowledged until the visibility timeout (hours),
and a Redis restarted without persistence forgets every queued chunk. The reconciler looks at each open
chunk (after folding what finished) and places it: in a queue, held by a live worker (Celery's remote
control: every live worker answers, and says which tasks it holds), or nowhere. A chunk seen nowhere on two
looks at least `reconcile_grace_s` apart is lost: it is sent again exactly as it was (the message with its
ticket, recorded at submission) under its deterministic task id, so that a re-send never duplicates work;
after `chunk_max_sends` sends in all it fails with the reason. Every re-send and loss is audited and noted
on the job in a sentence ("worker w1 stopped answering during chunk 3 at 10:42 UTC; re-sent").

It runs from beat every `reconcile_interval_s`, on `facegate jobs ID`, from `facegate jobs resume ID` (which
looks twice, two seconds apart, instead of waiting for the grace), and from every command that waits on a job.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import select

from facegate.db import session_scope
from facegate.messages import chunk_task_id
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent, ChunkState, JobState
from scheduler.audit import AuditLog
from scheduler.dispatch import BrokerSnapshot, ChunkStatus, TaskQueue
from scheduler.models import Job, JobChunk, utcnow
from scheduler.submission import GENERAL_QUEUE

if TYPE_CHECKING:
    from scheduler.reading import JobView

# How long `resume` waits between its two looks: far longer than a message spends between a queue and the
# worker that takes it (milliseconds), far shorter than the grace a beat-driven pass waits.
RESUME_SECOND_LOOK_S = 2.0


@dataclass
class ReconcileReport:
    """What one reconciling pass saw and did."""

    observed: bool  # False: no broker to look into (no queue, or not Redis): nothing was decided
    jobs: int = 0
    chunks: int = 0
    resent: list[tuple[str, int, str]] = field(default_factory=list)  # (job, chunk, why)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)


def _why_lost(chunk_no: int, status: ChunkStatus, snapshot: BrokerSnapshot, task_id: str,
              sends: int = 1) -> tuple[str, str]:
    """(kind, sentence) for a chunk that nothing holds: which of the ways to lose one it was."""
    if sends == 0:
        return "unsent", f"chunk {chunk_no} was never sent (the broker was not reachable when it was submitted)"
    if status.worker:
        if status.worker in snapshot.workers:
            return "worker", f"worker {status.worker} stopped running chunk {chunk_no} without a result (restarted?)"
        return "worker", f"worker {status.worker} stopped answering during chunk {chunk_no}"
    if task_id in snapshot.unacked:
        return "delivered", f"chunk {chunk_no} was delivered to a worker that is gone before it started"
    return "broker", f"the broker lost queued chunk {chunk_no} (in no queue, held by no worker)"


class JobReconciling:
    """JobService's healing part (see the module docstring)."""

    settings: Settings
    queue: TaskQueue | None
    db_url: str
    audit: AuditLog

    # JobFolding's, in the JobService this is part of.
    refresh_with_statuses: Callable[[str], tuple[JobView, dict[int, ChunkStatus]]]
    _fold: Callable[..., None]

    def reconcile(self, job_ids: list[str] | None = None, *, resume: bool = False, limit: int = 200) -> ReconcileReport:
        """Place every open chunk of these jobs (default: every open job) and re-send or fail the lost ones."""
        if self.queue is None:
            return ReconcileReport(observed=False)
        if job_ids is None:
            with session_scope(self.db_url) as s:
                job_ids = list(s.scalars(select(Job.id).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                                         .order_by(Job.created_at).limit(limit)).all())
        if not resume:
            return self._pass(job_ids, timedelta(seconds=self.settings.reconcile_grace_s))
        first = self._pass(job_ids, None)
        if not first.observed or first.chunks == 0:
            return first
        time.sleep(RESUME_SECOND_LOOK_S)
        return self._pass(job_ids, timedelta(0))

    def _pass(self, job_ids: list[str], grace: timedelta | None) -> ReconcileReport:
        """One look. A chunk seen nowhere for `grace` (None: only note it as nowhere) is lost.

        The look comes first, the chunks' statuses after it (read once, by the fold): a chunk that finished
        while the broker was looked into is folded, never taken for lost.
        """
        assert self.queue is not None
        with session_scope(self.db_url) as s:
            chunks = [(c.job_id, c.chunk_no, c.queue or GENERAL_QUEUE) for c in s.scalars(
                select(JobChunk).join(Job).where(JobChunk.job_id.in_(job_ids), JobChunk.folded_at.is_(None),
                                                 Job.state.in_([JobState.QUEUED, JobState.RUNNING]))).all()]
        snapshot = self.queue.observe({q for _, _, q in chunks}, {chunk_task_id(j, n) for j, n, _ in chunks}) \
            if chunks else None
        statuses: dict[tuple[str, int], ChunkStatus] = {}
        for job_id in job_ids:
            _, open_chunks = self.refresh_with_statuses(job_id)  # fold what finished: it is never "lost"
            statuses.update({(job_id, n): status for n, status in open_chunks.items()})
        now = utcnow()
        lost: list[tuple[str, int, str, str]] = []
        with session_scope(self.db_url) as s:
            open_jobs = set(s.scalars(select(Job.id).where(Job.id.in_(job_ids),
                                                           Job.state.in_([JobState.QUEUED, JobState.RUNNING]))).all())
            report = ReconcileReport(observed=True, jobs=len(open_jobs),
                                     chunks=sum(1 for j, _ in statuses if j in open_jobs))
            if chunks and snapshot is None:
                return ReconcileReport(observed=False, jobs=report.jobs, chunks=report.chunks)
            if snapshot is None or not report.chunks:
                return report
            report.workers = sorted(snapshot.workers)
            for job_id, chunk_no, _ in chunks:
                task_id = chunk_task_id(job_id, chunk_no)
                status = statuses.get((job_id, chunk_no))
                chunk = s.get(JobChunk, (job_id, chunk_no))
                if status is None or job_id not in open_jobs or chunk is None or chunk.folded_at is not None:
                    continue  # folded, its job ended, or its status could not be read: nothing to decide on
                if task_id in snapshot.active:
                    worker = snapshot.active[task_id]
                    if chunk.state != ChunkState.RUNNING or chunk.worker != worker:
                        chunk.running_since = now
                    chunk.state, chunk.worker, chunk.unplaced_since = ChunkState.RUNNING, worker, None
                elif task_id in snapshot.held or task_id in snapshot.queued:
                    chunk.state, chunk.worker = ChunkState.QUEUED, snapshot.held.get(task_id)
                    chunk.running_since = chunk.unplaced_since = None
                elif chunk.unplaced_since is None or grace is None:
                    chunk.unplaced_since = chunk.unplaced_since or now
                elif now - chunk.unplaced_since >= grace:
                    kind, why = _why_lost(chunk_no, status, snapshot, task_id, chunk.sends)
                    chunk.state = ChunkState.LOST
                    lost.append((job_id, chunk_no, kind, why))
        stale = [snapshot.unacked[chunk_task_id(j, n)] for j, n, _, _ in lost if chunk_task_id(j, n) in snapshot.unacked]
        # A delivery to a worker that is gone would be run again when its visibility timeout ends: forget it.
        self.queue.drop_unacked(stale)
        by_job: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
        for job_id, chunk_no, kind, why in lost:
            by_job[job_id].append((chunk_no, kind, why))
        for job_id, items in by_job.items():
            self._recover(job_id, items, report)
        return report

    def _recover(self, job_id: str, items: list[tuple[int, str, str]], report: ReconcileReport) -> None:
        assert self.queue is not None
        at = utcnow().strftime("%H:%M UTC")
        resent: list[tuple[int, str, str]] = []
        failed: list[tuple[int, str]] = []
        with session_scope(self.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            facts: dict[str, Any] = dict(organisation_id=job.submitter, api_key_id=job.api_key_id, username=job.username, job_id=job_id, capability=job.kind,
                         purpose=job.purpose, gallery=job.gallery, registry_hash=job.registry_hash)
            for chunk_no, kind, why in items:
                chunk = s.get(JobChunk, (job_id, chunk_no))
                assert chunk is not None
                if chunk.message is None or chunk.task_name is None:
                    failed.append((chunk_no, f"{why} at {at}; it cannot be sent again: it was queued by an older "
                                             "FaceGate, which did not record its message"))
                elif chunk.sends >= self.settings.chunk_max_sends:
                    failed.append((chunk_no, f"{why} at {at}; failed after {chunk.sends} sends"))
                else:
                    chunk.sends += 1
                    chunk.sent_at, chunk.unplaced_since, chunk.worker, chunk.running_since = utcnow(), None, None, None
                    chunk.state = ChunkState.QUEUED
                    self.queue.send(chunk.task_name, chunk.message, task_id=chunk_task_id(job_id, chunk_no),
                                    queue=chunk.queue or GENERAL_QUEUE)
                    resent.append((chunk_no, kind, why))
            job.notes = [*(job.notes or []), *_notes(resent, at)]
        for chunk_no, kind, why in resent:
            report.resent.append((job_id, chunk_no, why))
            self.audit.append(AuditEvent.CHUNK_RESENT, detail={"chunk": chunk_no, "why": why, "cause": kind}, **facts)
        for chunk_no, why in failed:
            report.failed.append((job_id, chunk_no, why))
            self.audit.append(AuditEvent.CHUNK_LOST, detail={"chunk": chunk_no, "why": why}, **facts)
            with session_scope(self.db_url) as s:
                job = s.get(Job, job_id)
                assert job is not None
                job.notes = [*(job.notes or []), why]
            self._fold(job_id, chunk_no, None, None, why=f"chunk {chunk_no} could not be run: {why}")


def _notes(resent: list[tuple[int, str, str]], at: str) -> list[str]:
    """One sentence per cause: the broker's losses together ("the broker lost 9 queued chunks"), workers' one each."""
    notes = [f"{why}; sent at {at}" if kind == "unsent" else f"{why} at {at}; re-sent"
             for _, kind, why in resent if kind != "broker"]
    broker = [n for n, kind, _ in resent if kind == "broker"]
    if len(broker) == 1:
        notes.append(f"the broker lost queued chunk {broker[0]} at {at}; re-sent")
    elif broker:
        notes.append(f"the broker lost {len(broker)} queued chunks ({_ranges(broker)}) at {at}; re-sent")
    return notes


def _ranges(numbers: list[int]) -> str:
    """0, 1, 2, 5 -> '0-2, 5': chunk numbers short enough for one line."""
    out: list[str] = []
    numbers = sorted(numbers)
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)
