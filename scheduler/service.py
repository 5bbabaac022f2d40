"""JobService: the whole life of a job, from the checked request to the assembled result.

It is three parts, one module each: `scheduler.submission` (check, gate, record, send), `scheduler.folding`
(fold results in, finish, cancel) and `scheduler.reading` (views, results, review); the gallery inventory
and generation swaps are `scheduler.inventory`'s; `scheduler.reconcile` re-sends the chunks nothing runs any more.
"""

from __future__ import annotations

from facegate.db import create_schema
from facegate.settings import Settings
from scheduler.audit import AuditLog
from scheduler.dispatch import TaskQueue
from scheduler.folding import JobFolding
from scheduler.gate import SubmissionGate
from scheduler.reconcile import ReconcileReport
from scheduler.reading import JobDenied, JobNotFound, JobReading, JobRefused, JobView, UnknownGallery
from scheduler.submission import GENERAL_QUEUE, ChunkSpec, JobSubmission

__all__ = ["GENERAL_QUEUE", "ChunkSpec", "JobDenied", "JobNotFound", "JobRefused", "JobService", "JobView",
           "ReconcileReport", "UnknownGallery"]


class JobService(JobSubmission, JobFolding, JobReading):
    def __init__(self, settings: Settings, queue: TaskQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.db_url = settings.resolved_database_url
        create_schema(self.db_url)
        self.audit = AuditLog(self.db_url)
        self.gate = SubmissionGate(settings, self.audit)
