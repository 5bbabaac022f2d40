"""Named users inside an organisation: roles, their own passwords (argon2id), disable/enable, sign-in.

Organisation API keys (scheduler/keys.py) stay for machines; a user is a person, and what a person did
(a review, an erasure) is recorded with the user, never with a name someone typed. A user's roles say
which actions of its organisation it may take (scheduler/access.py decides with them); what the
organisation may do at all stays with the policy registry.

Passwords are hashed with argon2id (argon2-cffi's PasswordHasher, RFC 9106's low-memory profile); only
the hash is stored. A signed-in user acts as `Principal(org, "user:<user id>", user=<username>, roles=...)`:
the audit log's key column then names the user's id, and the access rule's rows name the user as well.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from facegate.audit import AuditLog
from facegate.db import create_schema, session_scope
from facegate.vocabulary import AuditEvent
from scheduler.keys import AuthenticationError, OrganisationRecord, Principal
from scheduler.models import UserRecord, utcnow

# Usernames are global (HTTP Basic sends a username, not an organisation): a safe alphabet, no look-alikes.
_USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
USER_KEY_PREFIX = "user:"
_HASHER = PasswordHasher()  # argon2id, time_cost 3, memory 64 MiB, parallelism 4 (RFC 9106 second choice)
# Verified against when the username is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
# The organisation a failed sign-in under a name nobody has is recorded for: the installation itself (the
# access rule's system organisation), read by whoever reads the whole log.
NO_SUCH_USER_ORGANISATION = "facegate-system"
# How much of a tried username the audit log keeps (a form or a header may send anything).
_TRIED_NAME_CHARS = 64


class Role(enum.StrEnum):
    SUBMITTER = "submitter"  # index, search, reindex, compare, register galleries
    REVIEWER = "reviewer"  # confirm or reject matches
    AUDITOR = "auditor"  # read the audit log
    ADMINISTRATOR = "administrator"  # everything in its organisation, erasure and grants included


ROLES = tuple(r.value for r in Role)


class UserError(Exception):
    """A user operation that cannot be done; the message names the input."""


@dataclass(frozen=True)
class UserInfo:
    """A user as listed: everything but the password hash."""

    id: str
    username: str
    organisation_id: str
    roles: tuple[str, ...]
    created_at: datetime
    disabled_at: datetime | None
    last_sign_in_at: datetime | None

    @property
    def active(self) -> bool:
        return self.disabled_at is None

    @property
    def key_id(self) -> str:
        """What the audit log's key column records for this user's actions."""
        return USER_KEY_PREFIX + self.id


def parse_roles(roles: Sequence[str]) -> list[str]:
    """Known roles, each once, in the order of ROLES; UserError naming an unknown one."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise UserError(f"unknown role {unknown[0]!r}; roles are: {', '.join(ROLES)}")
    return [r for r in ROLES if r in roles]


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password is too short: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password is too long: at most {MAX_PASSWORD_LENGTH} characters")
    if "\x00" in password:
        raise UserError("the password contains a NUL byte")
    return password


def _info(record: UserRecord) -> UserInfo:
    return UserInfo(record.id, record.username, record.organisation_id, tuple(parse_roles(record.roles or [])),
                    record.created_at, record.disabled_at, record.last_sign_in_at)


def principal_of(info: UserInfo) -> Principal:
    return Principal(info.organisation_id, info.key_id, user=info.username, roles=frozenset(info.roles))


class UserStore:
    def __init__(self, db_url: str, audit: AuditLog | None = None) -> None:
        """`audit`: where failed sign-ins are recorded (None: not recorded, for administration alone)."""
        self.db_url = db_url
        self.audit = audit
        create_schema(db_url)

    def add(self, organisation_id: str, username: str, password: str, roles: list[str]) -> UserInfo:
        if not _USERNAME.fullmatch(username or ""):
            raise UserError(f"username {username!r} is not valid: lowercase letters, digits, '.', '_' and '-', "
                            "starting with a letter or digit, at most 64 characters")
        chosen = parse_roles(roles)
        if not chosen:
            raise UserError(f"user {username!r} needs at least one role: {', '.join(ROLES)}")
        digest = _HASHER.hash(check_password(password))
        with session_scope(self.db_url) as s:
            if s.get(OrganisationRecord, organisation_id) is None:
                raise UserError(f"organisation {organisation_id!r} does not exist; add it with `facegate org add`")
            if s.scalars(select(UserRecord).where(UserRecord.username == username)).first() is not None:
                raise UserError(f"user {username!r} already exists")
            user_id = secrets.token_hex(6)
            while s.get(UserRecord, user_id) is not None:
                user_id = secrets.token_hex(6)
            record = UserRecord(id=user_id, username=username, organisation_id=organisation_id, roles=chosen,
                                password_hash=digest, created_at=utcnow())
            s.add(record)
            s.flush()
            return _info(record)

    def get(self, username: str) -> UserInfo:
        with session_scope(self.db_url) as s:
            return _info(self._record(s, username))

    def list_users(self, organisation_id: str | None = None) -> list[UserInfo]:
        with session_scope(self.db_url) as s:
            query = select(UserRecord).order_by(UserRecord.organisation_id, UserRecord.username)
            if organisation_id is not None:
                query = query.where(UserRecord.organisation_id == organisation_id)
            return [_info(r) for r in s.scalars(query)]

    def change_roles(self, username: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> UserInfo:
        added, removed = parse_roles(list(add)), parse_roles(list(remove))
        both = set(added) & set(removed)
        if both:
            raise UserError(f"role {sorted(both)[0]!r} is both added and removed")
        with session_scope(self.db_url) as s:
            record = self._record(s, username)
            roles = parse_roles([r for r in [*record.roles, *added] if r not in removed])
            if not roles:
                raise UserError(f"user {username!r} would have no role left; disable the user instead")
            record.roles = roles
            return _info(record)

    def set_password(self, username: str, password: str) -> UserInfo:
        digest = _HASHER.hash(check_password(password))
        with session_scope(self.db_url) as s:
            record = self._record(s, username)
            record.password_hash, record.password_changed_at = digest, utcnow()
            return _info(record)

    def set_disabled(self, username: str, disabled: bool) -> tuple[UserInfo, bool]:
        """Disable or enable; the bool says whether anything changed."""
        with session_scope(self.db_url) as s:
            record = self._record(s, username)
            changed = (record.disabled_at is None) == disabled
            if changed:
                record.disabled_at = utcnow() if disabled else None
            return _info(record), changed

    def authenticate(self, username: str, password: str, *, via: str = "api") -> Principal:
        """The user's principal, or AuthenticationError: unknown user, wrong password, or disabled. A refusal
        is audited (with the name tried and `via`, the way in: api, console or cli; never the password)."""
        try:
            return self._authenticate(username, password)
        except AuthenticationError as exc:
            self._audit_failure(username, str(exc), via)
            raise

    def _authenticate(self, username: str, password: str) -> Principal:
        with session_scope(self.db_url) as s:
            record = s.scalars(select(UserRecord).where(UserRecord.username == username)).first()
            try:
                _HASHER.verify(record.password_hash if record is not None else _DUMMY_HASH, password)
            except (VerificationError, InvalidHashError):
                # The same answer for an unknown name and a wrong password: nothing tells which names exist.
                raise AuthenticationError("wrong username or password") from None
            if record is None:
                raise AuthenticationError("wrong username or password")
            # Checked after the password, so only the user learns that it was disabled.
            if record.disabled_at is not None:
                raise AuthenticationError(f"user {username!r} was disabled at {record.disabled_at.isoformat()}")
            if _HASHER.check_needs_rehash(record.password_hash):
                record.password_hash = _HASHER.hash(password)
            record.last_sign_in_at = utcnow()
            return principal_of(_info(record))

    def _audit_failure(self, username: str, reason: str, via: str) -> None:
        if self.audit is None:
            return
        with session_scope(self.db_url) as s:
            record = s.scalars(select(UserRecord).where(UserRecord.username == username)).first()
            known = None if record is None else (record.organisation_id, record.id)
        tried = (username or "")[:_TRIED_NAME_CHARS]
        # A real user's name goes in the user column (its organisation's auditors see attempts on it); a name
        # nobody has stays in the detail only, so the column names people, not whatever was typed.
        self.audit.append(AuditEvent.USER_SIGN_IN_FAILED,
                          organisation_id=known[0] if known else NO_SUCH_USER_ORGANISATION,
                          api_key_id=USER_KEY_PREFIX + known[1] if known else None,
                          username=username if known else None, allowed=False,
                          detail={"username_tried": tried, "via": via, "reason": reason})

    @staticmethod
    def _record(s, username: str) -> UserRecord:
        record = s.scalars(select(UserRecord).where(UserRecord.username == username)).first()
        if record is None:
            raise UserError(f"no user {username!r}")
        return record


__all__ = ["MIN_PASSWORD_LENGTH", "NO_SUCH_USER_ORGANISATION", "ROLES", "Role", "UserError", "UserInfo", "UserRecord", "UserStore",
           "check_password", "parse_roles", "principal_of"]
