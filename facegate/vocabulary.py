"""The shared vocabulary: job, chunk, review and task states, chunk kinds and audit event names.

Each is a `StrEnum`, so a member is the very string that is stored, sent and shown (`JobState.DONE ==
"done"`): the database columns (SQLAlchemy's non-native `Enum`, a plain string column, no migration), the
audit log and the API all keep the strings they always had. A misspelt member fails at import; a
misspelt string would have been a silent new state.
"""

from __future__ import annotations

import enum

__all__ = [
    "PROGRESS",
    "UNTRAINED_WARNING",
    "AuditEvent",
    "ChunkKind",
    "ChunkState",
    "JobKind",
    "JobState",
    "ReviewDecision",
]

# The custom Celery task state a worker reports while it works through a chunk (meta: done, total).
PROGRESS = "PROGRESS"
# What every view of a job run on untrained weights says (the API's `warning`, the CLI).
UNTRAINED_WARNING = "UNTRAINED WEIGHTS: similarities say nothing about identity"


class JobKind(enum.StrEnum):
    INDEX = "index"
    SEARCH = "search"
    ERASE = "erase"
    # Incremental: new and changed files indexed, deleted files erased; a full rebuild on a model change.
    REINDEX = "reindex"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    PARTLY_FAILED = "partly_failed"
    FAILED = "failed"
    # Denied by the policy gate at submission: stored with its reason, never queued.
    REFUSED = "refused"
    # Allowed at submission, refused by the worker's second check (a moratorium began, a ticket was bad).
    REFUSED_AT_EXECUTION = "refused_at_execution"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)

    @property
    def refused(self) -> bool:
        return self in (JobState.REFUSED, JobState.REFUSED_AT_EXECUTION)


class ChunkKind(enum.StrEnum):
    """What one queued chunk does; the `kind` of its message and of its result."""

    INDEX = "index"
    SEARCH = "search"
    ERASE = "erase"
    COMPARE = "compare"


class ChunkState(enum.StrEnum):
    """Where a chunk is, as the reconciler last saw it (scheduler/reconcile.py); done or failed once folded."""

    QUEUED = "queued"  # in a broker queue, or reserved by a live worker
    RUNNING = "running"  # a live worker is executing it (JobChunk.worker, since running_since)
    # In no queue and held by no live worker, with no result: re-sent after a grace period, failed after N sends.
    LOST = "lost"
    DONE = "done"
    FAILED = "failed"


class ReviewDecision(enum.StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"


class AuditEvent(enum.StrEnum):
    """Every event name the audit log is written with."""

    POLICY_DECISION = "policy.decision"
    ACCESS_DECISION = "access.decision"
    ACCESS_REFUSED = "access.refused"
    JOB_SUBMITTED = "job.submitted"
    JOB_REFUSED = "job.refused"
    JOB_STARTED = "job.started"
    JOB_REFUSED_AT_EXECUTION = "job.refused_at_execution"
    JOB_FINISHED = "job.finished"
    JOB_CANCELLED = "job.cancelled"
    CHUNK_RESENT = "chunk.resent"
    CHUNK_LOST = "chunk.lost"
    TASK_REFUSED_AT_EXECUTION = "task.refused_at_execution"
    ERASURE = "erasure"
    UPLOADS_RETAINED = "uploads.retained"
    UPLOADS_REMOVED = "uploads.removed"
    REVIEW_CONFIRMED = "review.confirmed"
    REVIEW_REJECTED = "review.rejected"
    # Someone looked at a face (a crop of a probe or a gallery image): seeing a biometric record is a use of it.
    FACE_VIEWED = "face.viewed"
    GALLERY_REGISTERED = "gallery.registered"
    GALLERY_GRANTED = "gallery.granted"
    GALLERY_GRANT_REVOKED = "gallery.grant_revoked"
    # An owner's explicit re-enrolment of erased images: their erased marks go, the next index indexes them.
    GALLERY_REENROLLED = "gallery.reenrolled"
    KEY_CREATED = "key.created"
    KEY_REVOKED = "key.revoked"
    USER_ADDED = "user.added"
    USER_ROLES_CHANGED = "user.roles_changed"
    USER_PASSWORD_CHANGED = "user.password_changed"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    # Sign-in and sign-out of a person (never a password; a failure names the username tried and the way in).
    USER_SIGNED_IN = "user.signed_in"
    USER_SIGN_IN_FAILED = "user.sign_in_failed"
    USER_SIGNED_OUT = "user.signed_out"
    # A console session found past its lifetime (recorded when its cookie is next presented) or ended because
    # its user was disabled.
    USER_SESSION_EXPIRED = "user.session_expired"
    USER_SESSION_ENDED = "user.session_ended"
    AUDIT_CHECKPOINT = "audit.checkpoint"
    EVALUATION_STARTED = "evaluation.started"
    EVALUATION_FINISHED = "evaluation.finished"
    EVALUATION_FAILED = "evaluation.failed"
    EVALUATION_REFUSED_AT_EXECUTION = "evaluation.refused_at_execution"
    RESULTS_ERASED = "results.erased"
    AUTHORISATION_DECISION = "authorisation.decision"
    AUTHORISATION_RECORDED = "authorisation.recorded"
    AUTHORISATION_CONFIRMED = "authorisation.confirmed"
    AUTHORISATION_WITHDRAWN = "authorisation.withdrawn"
    RETENTION_PERIOD_SET = "retention.period_set"
    RETENTION_GALLERY_ERASED = "retention.gallery_erased"
    RETENTION_RUN = "retention.run"
    WEBHOOK_SECRET_CREATED = "webhook.secret_created"
    WEBHOOK_ATTEMPT = "webhook.attempt"

    @classmethod
    def review(cls, decision: ReviewDecision) -> AuditEvent:
        return cls.REVIEW_CONFIRMED if decision is ReviewDecision.CONFIRMED else cls.REVIEW_REJECTED
