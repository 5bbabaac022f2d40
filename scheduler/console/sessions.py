"""The console's sign-in sessions: a random token in an HttpOnly cookie, its hash and CSRF token on the server.

The cookie carries 256 random bits and nothing else; only their sha256 is stored, with the user, when the
session began, when it expires (FACEGATE_CONSOLE_SESSION_MINUTES after sign-in, however busy) and when it
was ended. So signing out ends the session on the server (a copied cookie is then worth nothing), and a
disabled user or a lost role counts at the very next request: the user is read again
each time. Each session has its own CSRF token, which every form and every state-changing request of the
console's script must send back.

Every sign-in (refused ones too, by UserStore.authenticate), sign-out and end of a session is audited:
`user.signed_in`, `user.sign_in_failed`, `user.signed_out`; `user.session_expired` when an expired session's
cookie is next presented (nothing runs at the instant it expires), `user.session_ended` when its user was
disabled or removed. Each session's end is recorded once: the row is claimed by a conditional update.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import CursorResult, String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from facegate.audit import AuditLog
from facegate.db import Base, UTCDateTime, create_schema, session_scope
from facegate.vocabulary import AuditEvent
from scheduler.keys import AuthenticationError, Principal
from scheduler.models import utcnow
from scheduler.users import UserError, UserInfo, UserStore, principal_of

COOKIE = "facegate_session"


class ConsoleSessionRecord(Base):
    __tablename__ = "console_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    organisation_id: Mapped[str] = mapped_column(String(255))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


@dataclass(frozen=True)
class ConsoleSession:
    principal: Principal
    csrf_token: str
    expires_at: datetime

    def csrf_matches(self, sent: str | None) -> bool:
        return sent is not None and sent != "" and hmac.compare_digest(sent.encode(), self.csrf_token.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, db_url: str, users: UserStore, lifetime: timedelta, audit: AuditLog | None = None) -> None:
        self.db_url, self.users, self.lifetime = db_url, users, lifetime
        self.audit = audit if audit is not None else users.audit
        create_schema(db_url)

    def sign_in(self, username: str, password: str) -> tuple[str, ConsoleSession]:
        """(cookie token, session) for a user's credentials; AuthenticationError when they are refused."""
        principal = self.users.authenticate(username, password, via="console")
        token = secrets.token_urlsafe(32)
        now = utcnow()
        record = ConsoleSessionRecord(token_sha256=_digest(token), username=username,
                                      organisation_id=principal.organisation_id, csrf_token=secrets.token_urlsafe(32),
                                      created_at=now, expires_at=now + self.lifetime)
        with session_scope(self.db_url) as s:
            s.add(record)
        if self.audit is not None:
            self.audit.append(AuditEvent.USER_SIGNED_IN, organisation_id=principal.organisation_id, **principal.actor,
                              allowed=True, detail={"via": "console", "roles": sorted(principal.roles),
                                                    "session_expires_at": record.expires_at.isoformat()})
        return token, ConsoleSession(principal, record.csrf_token, record.expires_at)

    def get(self, token: str | None) -> ConsoleSession | None:
        """The live session of this cookie: not expired, not ended, its user still enabled; else None."""
        if not token or len(token) > 128:
            return None
        digest = _digest(token)
        with session_scope(self.db_url) as s:
            record = s.get(ConsoleSessionRecord, digest)
            if record is None or record.ended_at is not None:
                return None
            username, csrf, expires, started = (record.username, record.csrf_token, record.expires_at,
                                                record.created_at)
        if expires <= utcnow():
            self._end(digest, AuditEvent.USER_SESSION_EXPIRED, username,
                      {"started_at": started.isoformat(), "expired_at": expires.isoformat()})
            return None
        try:
            info = self.users.get(username)
        except UserError:
            self._end(digest, AuditEvent.USER_SESSION_ENDED, username, {"why": "the user no longer exists"})
            return None
        if not info.active:
            self._end(digest, AuditEvent.USER_SESSION_ENDED, username, {"why": "the user was disabled"}, info)
            return None
        return ConsoleSession(principal_of(info), csrf, expires)

    def sign_out(self, token: str | None) -> None:
        if not token:
            return
        digest = _digest(token)
        with session_scope(self.db_url) as s:
            record = s.get(ConsoleSessionRecord, digest)
            username = record.username if record is not None else None
        if username is not None:
            self._end(digest, AuditEvent.USER_SIGNED_OUT, username, {})

    def end_all(self, username: str) -> int:
        """End every session of a user (e.g. when it is disabled); how many were open."""
        with session_scope(self.db_url) as s:
            digests = s.scalars(select(ConsoleSessionRecord.token_sha256).where(
                ConsoleSessionRecord.username == username, ConsoleSessionRecord.ended_at.is_(None))).all()
        return sum(self._end(d, AuditEvent.USER_SESSION_ENDED, username, {"why": "all of the user's sessions were "
                                                                                  "ended"}) for d in digests)

    def _end(self, digest: str, event: AuditEvent, username: str, detail: dict,
             info: UserInfo | None = None) -> bool:
        """End one open session and audit `event`; False when it had already ended (then nothing is written)."""
        with session_scope(self.db_url) as s:
            claimed = cast(CursorResult, s.execute(update(ConsoleSessionRecord)
                                .where(ConsoleSessionRecord.token_sha256 == digest,
                                       ConsoleSessionRecord.ended_at.is_(None))
                                .values(ended_at=utcnow()))).rowcount
            organisation = s.scalars(select(ConsoleSessionRecord.organisation_id)
                                     .where(ConsoleSessionRecord.token_sha256 == digest)).first()
        if not claimed or self.audit is None or organisation is None:
            return bool(claimed)
        if info is None:
            try:
                info = self.users.get(username)
            except UserError:
                info = None
        self.audit.append(event, organisation_id=organisation,
                          api_key_id=info.key_id if info is not None else None, username=username,
                          detail={"via": "console", **detail})
        return True


__all__ = ["COOKIE", "AuthenticationError", "ConsoleSession", "ConsoleSessionRecord", "SessionStore"]
