"""Idempotency keys on job creation (the `Idempotency-Key` header): the same key from the same organisation
within 24 hours gives back the job it made, never a second one; the same key on a different request is
refused. Kept in the database, so every API process sees the same keys."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone

from sqlalchemy.exc import IntegrityError

from facegate.db import session_scope
from scheduler.models import IdempotencyRecord, utcnow

IDEMPOTENCY_WINDOW = timedelta(hours=24)
# A claim whose request never recorded a job (a process that died mid-request) is given up after this.
ABANDONED_AFTER = timedelta(minutes=10)
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class IdempotencyError(ValueError):
    """The key cannot be used for this request; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def fingerprint(request: object) -> str:
    """sha256 of the request as canonical JSON: what "the same request" means."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class IdempotencyKeys:
    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    @staticmethod
    def check_key(key: str) -> str:
        if not _KEY.fullmatch(key):
            raise IdempotencyError("Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID will do)", 422)
        return key

    def claim(self, organisation_id: str, key: str, request_sha256: str, *, now: datetime | None = None) -> str | None:
        """None: the key is this request's now (record the job it makes, or release it). A job id: the key
        already made that job for the same request within the window."""
        self.check_key(key)
        now = now or utcnow()
        for _ in range(2):
            with session_scope(self.db_url) as s:
                row = s.get(IdempotencyRecord, (organisation_id, key))
                if row is not None and (now - _aware(row.created_at) >= IDEMPOTENCY_WINDOW or (
                        row.job_id is None and now - _aware(row.created_at) >= ABANDONED_AFTER)):
                    s.delete(row)  # expired, or abandoned by a request that never finished: the key is free
                    s.flush()
                    row = None
                if row is not None:
                    if row.request_sha256 != request_sha256:
                        raise IdempotencyError(
                            f"Idempotency-Key {key!r} was used for a different request (within "
                            f"{IDEMPOTENCY_WINDOW.total_seconds() / 3600:.0f} h): use a new key for a new request", 422)
                    if row.job_id is None:
                        raise IdempotencyError(f"a request with Idempotency-Key {key!r} is still being handled: "
                                               "try again in a moment", 409)
                    return row.job_id
            try:
                with session_scope(self.db_url) as s:
                    s.add(IdempotencyRecord(organisation_id=organisation_id, key=key, request_sha256=request_sha256,
                                            created_at=now))
                return None
            except IntegrityError:
                continue  # another request claimed it between the two sessions: read what it holds
        raise IdempotencyError(f"a request with Idempotency-Key {key!r} is still being handled: try again", 409)

    def record(self, organisation_id: str, key: str, job_id: str) -> None:
        with session_scope(self.db_url) as s:
            row = s.get(IdempotencyRecord, (organisation_id, key))
            if row is not None:
                row.job_id = job_id

    def release(self, organisation_id: str, key: str) -> None:
        """The request made no job (refused before anything was recorded): the key may be used again."""
        with session_scope(self.db_url) as s:
            row = s.get(IdempotencyRecord, (organisation_id, key))
            if row is not None and row.job_id is None:
                s.delete(row)
