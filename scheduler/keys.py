"""API keys that map a caller to an organisation: create (secret shown once), list, revoke, authenticate.

`organisations` is a local record of which organisations may hold keys here. What an organisation may
do stays with the policy registry (`policy.registry`): a key says who is asking, never what is allowed.

A key is shown once, as `fg_<key id>_<secret>`. The key id is public (it appears in audit rows and
listings); only a hash of the secret is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypedDict

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, mapped_column

from facegate.db import Base, UTCDateTime, create_schema, session_scope
from policy import SECTORS

KEY_PREFIX = "fg"
_KEY_ID_BYTES = 6  # 12 hex characters: short enough to read out, and an id is not a secret.
_SECRET_BYTES = 32  # token_urlsafe(32): 256 random bits, 43 characters.
# fg_<12 lowercase hex>_<urlsafe base64 secret>. The secret may itself contain '_' and '-'.
_ORG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TOKEN_PATTERN = re.compile(r"^fg_(?P<key_id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{32,})$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class KeyStoreError(Exception):
    """A key or organisation operation that cannot be done (unknown or duplicate organisation, unknown key)."""


class AuthenticationError(Exception):
    """A presented token does not identify an active key. The message says why, for the caller's logs."""


class OrganisationRecord(Base):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    sector: Mapped[str] = mapped_column(String(64))
    jurisdiction: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKeyRecord(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    label: Mapped[str] = mapped_column(String(255), default="")
    # sha256 of the secret, hex. Keys are 256 random bits, not passwords someone chose: a slow salted
    # KDF (scrypt, PBKDF2) defends guessable secrets against offline guessing, and there is nothing
    # to guess here. A plain hash keeps authentication, which runs on every request, cheap.
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


@dataclass(frozen=True)
class OrganisationInfo:
    """The local record of an organisation allowed to hold keys (its permissions live in the registry)."""

    id: str
    name: str
    sector: str
    jurisdiction: str | None
    created_at: datetime


@dataclass(frozen=True)
class CreatedKey:
    """A new key. `secret_token` is the whole `fg_..._...` string; it exists only here and is never stored."""

    key_id: str
    organisation_id: str
    # Kept out of repr so that logging the object does not log the secret.
    secret_token: str = field(repr=False)


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: everything about it except its secret and hash."""

    key_id: str
    organisation_id: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class Actor(TypedDict):
    """Who acted, as the audit log's columns say it (AuditLog.append's keyword arguments)."""

    api_key_id: str | None
    username: str | None


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the organisation, and which of its keys it used; for a signed-in user
    (scheduler/users.py), its username and roles, and `key_id` is `user:<user id>`."""

    organisation_id: str
    key_id: str | None  # None: the system itself (nightly tasks, retention), no key
    user: str | None = None
    roles: frozenset[str] = frozenset()

    @property
    def is_user(self) -> bool:
        return self.user is not None

    @property
    def actor(self) -> Actor:
        """The audit log's who-columns for what this principal does: its key (`user:<id>` for a user) and the
        user's name (None for a machine key)."""
        return {"api_key_id": self.key_id, "username": self.user}


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _organisation(record: OrganisationRecord) -> OrganisationInfo:
    return OrganisationInfo(record.id, record.name, record.sector, record.jurisdiction, record.created_at)


def _key_info(record: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(
        record.id, record.organisation_id, record.label, record.created_at, record.revoked_at, record.last_used_at
    )


class KeyStore:
    """Organisations and their API keys in one database."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        create_schema(db_url)

    # -- organisations -------------------------------------------------------------------------------

    def add_organisation(
        self, id: str, name: str, sector: str, jurisdiction: str | None = None,
        registry: Any = None,
    ) -> OrganisationInfo:
        """Record an organisation. With the policy registry (the authority on who an organisation is), a
        record that contradicts what the registry lists for this id (sector, name) is refused."""
        if not id or not name:
            raise KeyStoreError("an organisation needs an id and a name")
        if not _ORG_ID.fullmatch(id):
            raise KeyStoreError(f"organisation id {id!r} is not valid: letters, digits, '-', '_' or '.', "
                                "starting with a letter or digit (at most 128)")
        listed = registry.organisation(id) if registry is not None else None
        if listed is not None:
            if sector != listed.sector:
                raise KeyStoreError(f"organisation {id!r} is listed in the policy registry with sector "
                                    f"{listed.sector!r}, not {sector!r}: the registry decides who an organisation is")
            if name != listed.name:
                raise KeyStoreError(f"organisation {id!r} is listed in the policy registry as {listed.name!r}, "
                                    f"not {name!r}")
        # The registry only knows these sectors; a typo here would make the local record disagree with it.
        if sector not in SECTORS:
            raise KeyStoreError(f"unknown sector {sector!r} for organisation {id!r}; known sectors: {', '.join(SECTORS)}")
        with session_scope(self.db_url) as session:
            if session.get(OrganisationRecord, id) is not None:
                raise KeyStoreError(f"organisation {id!r} already exists")
            record = OrganisationRecord(id=id, name=name, sector=sector, jurisdiction=jurisdiction, created_at=utcnow())
            session.add(record)
            session.flush()
            return _organisation(record)

    def list_organisations(self) -> list[OrganisationInfo]:
        with session_scope(self.db_url) as session:
            records = session.scalars(select(OrganisationRecord).order_by(OrganisationRecord.id))
            return [_organisation(record) for record in records]

    # -- keys ----------------------------------------------------------------------------------------

    def create_key(self, organisation_id: str, label: str = "") -> CreatedKey:
        """Make a key for an existing organisation. The returned token is the only copy of its secret."""
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        with session_scope(self.db_url) as session:
            if session.get(OrganisationRecord, organisation_id) is None:
                raise KeyStoreError(
                    f"organisation {organisation_id!r} does not exist; add it before creating keys for it"
                )
            key_id = secrets.token_hex(_KEY_ID_BYTES)
            while session.get(ApiKeyRecord, key_id) is not None:  # 48 random bits: a clash is rare, not impossible
                key_id = secrets.token_hex(_KEY_ID_BYTES)
            session.add(
                ApiKeyRecord(
                    id=key_id,
                    organisation_id=organisation_id,
                    label=label,
                    key_hash=_hash_secret(secret),
                    created_at=utcnow(),
                )
            )
        return CreatedKey(key_id, organisation_id, f"{KEY_PREFIX}_{key_id}_{secret}")

    def revoke(self, key_id: str) -> bool:
        """Revoke a key: True if it was active and now is not, False if it was already revoked.

        An unknown key id raises KeyStoreError, so a mistyped id is not mistaken for success.
        """
        with session_scope(self.db_url) as session:
            record = session.get(ApiKeyRecord, key_id)
            if record is None:
                raise KeyStoreError(f"no key with id {key_id!r}")
            if record.revoked_at is not None:
                return False
            record.revoked_at = utcnow()
            return True

    def list_keys(self, organisation_id: str | None = None) -> list[KeyInfo]:
        with session_scope(self.db_url) as session:
            query = select(ApiKeyRecord).order_by(ApiKeyRecord.organisation_id, ApiKeyRecord.created_at)
            if organisation_id is not None:
                query = query.where(ApiKeyRecord.organisation_id == organisation_id)
            return [_key_info(record) for record in session.scalars(query)]

    def authenticate(self, token: str) -> Principal:
        """The organisation and key a token belongs to; AuthenticationError if it is not an active key."""
        match = _TOKEN_PATTERN.match(token or "")
        if match is None:
            # The token itself is not echoed: a malformed token may still be most of a real secret.
            raise AuthenticationError("malformed API key: expected fg_<12 hex key id>_<secret>")
        key_id, secret = match["key_id"], match["secret"]
        with session_scope(self.db_url) as session:
            record = session.get(ApiKeyRecord, key_id)
            if record is None:
                raise AuthenticationError(f"unknown API key id {key_id}")
            # Constant time, so response timing reveals nothing about how much of the hash matched.
            if not hmac.compare_digest(_hash_secret(secret), record.key_hash):
                raise AuthenticationError(f"wrong secret for API key {key_id}")
            # Checked after the secret, so only the key's holder learns that, and when, it was revoked.
            if record.revoked_at is not None:
                raise AuthenticationError(f"key {key_id} was revoked at {record.revoked_at.isoformat()}")
            record.last_used_at = utcnow()
            return Principal(record.organisation_id, record.id)


__all__ = [
    "ApiKeyRecord",
    "AuthenticationError",
    "CreatedKey",
    "KeyInfo",
    "KeyStore",
    "KeyStoreError",
    "OrganisationInfo",
    "OrganisationRecord",
    "Principal",
]
