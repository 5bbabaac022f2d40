"""The console's sign-in sessions: a random token in an HttpOnly cookie, its hash and CSRF token on the server.

The cookie carries 256 random bits and nothing else; only their sha256 is stored, with the user, when the
session began, when it expires (FACEGATE_CONSOLE_SESSION_MINUTES after sign-in, however busy) and when it
was ended. So signing out ends the session on the server (a copied cookie is then worth nothing), and a
disabled user or a lost role counts at the very next request: the user is read again
each time. Each session has its own CSRF token, which every form and every state-changing request of the
console's script must send back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from facegate.db import Base, UTCDateTime, create_schema, session_scope
from scheduler.keys import AuthenticationError, Principal
from scheduler.models import utcnow
from scheduler.users import UserError, UserStore, principal_of

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
    def __init__(self, db_url: str, users: UserStore, lifetime: timedelta) -> None:
        self.db_url, self.users, self.lifetime = db_url, users, lifetime
        create_schema(db_url)

    def sign_in(self, username: str, password: str) -> tuple[str, ConsoleSession]:
        """(cookie token, session) for a user's credentials; AuthenticationError when they are refused."""
        principal = self.users.authenticate(username, password)
        token = secrets.token_urlsafe(32)
        now = utcnow()
        record = ConsoleSessionRecord(token_sha256=_digest(token), username=username,
                                      organisation_id=principal.organisation_id, csrf_token=secrets.token_urlsafe(32),
                                      created_at=now, expires_at=now + self.lifetime)
        with session_scope(self.db_url) as s:
            s.add(record)
            return token, ConsoleSession(principal, record.csrf_token, record.expires_at)

    def get(self, token: str | None) -> ConsoleSession | None:
        """The live session of this cookie: not expired, not ended, its user still enabled; else None."""
        if not token or len(token) > 128:
            return None
        with session_scope(self.db_url) as s:
            record = s.get(ConsoleSessionRecord, _digest(token))
            if record is None or record.ended_at is not None or record.expires_at <= utcnow():
                return None
            username, csrf, expires = record.username, record.csrf_token, record.expires_at
        try:
            info = self.users.get(username)
        except UserError:
            return None
        if not info.active:
            return None
        return ConsoleSession(principal_of(info), csrf, expires)

    def sign_out(self, token: str | None) -> None:
        if not token:
            return
        with session_scope(self.db_url) as s:
            record = s.get(ConsoleSessionRecord, _digest(token))
            if record is not None and record.ended_at is None:
                record.ended_at = utcnow()

    def end_all(self, username: str) -> int:
        """End every session of a user (e.g. when it is disabled); how many were open."""
        with session_scope(self.db_url) as s:
            open_ = s.scalars(select(ConsoleSessionRecord).where(ConsoleSessionRecord.username == username,
                                                                 ConsoleSessionRecord.ended_at.is_(None))).all()
            for record in open_:
                record.ended_at = utcnow()
            return len(open_)


__all__ = ["COOKIE", "AuthenticationError", "ConsoleSession", "ConsoleSessionRecord", "SessionStore"]
