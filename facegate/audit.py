"""Append-only, hash-chained audit log: every policy decision, job step, erasure and key change, in the database.

Why: EU AI Act Art 12(3) asks for logs of each use (start and end, the reference database searched, the
input that matched, who verified it); Illinois BIPA makes erasure an operation someone must be able to
prove happened. A log that an operator can quietly edit proves nothing, so each row carries
`row_hash = sha256(canonical JSON of all its other fields, including prev_hash and seq)`, and each
row's `prev_hash` is the previous row's `row_hash` (64 zeros for the first row). Changing, deleting or
reordering any row breaks the chain from that row on, and `AuditLog.verify()` names the first broken row.
The acting user's name (`username`, a later column) is hashed whenever it is set; see OPTIONAL_HASHED_FIELDS.

Append-only, at two levels:
- This API has no update or delete: `AuditLog` only appends, reads, verifies and exports.
- In production the database user the service runs as should hold INSERT and SELECT on `audit_log`
  but not UPDATE, DELETE or TRUNCATE (PostgreSQL: `REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM
  facegate;`). The chain is what makes edits by anyone who bypasses that (a superuser, a restored
  backup) detectable.

What the chain cannot show on its own: removal of the newest rows (a truncated chain is still a valid
chain), or a tail rewritten with correct hashes. Anchor it: `AuditLog.checkpoint()` signs the head (row
count and last hash, HMAC-SHA256 under a secret from settings) for a compliance officer to keep
somewhere the database's operators cannot write; `verify(checkpoint=...)` then catches both.

Exports keep `prev_hash` and `row_hash`, and `row_hash_of` recomputes a row's hash from its exported
JSON, so a reader can check exported rows without database access.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, TextIO

from sqlalchemy import JSON, Boolean, Integer, String, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from facegate.db import Base, UTCDateTime, create_schema, engine_for
from facegate.vocabulary import AuditEvent

GENESIS_HASH = "0" * 64

# Key for pg_advisory_xact_lock: any constant that no other FaceGate lock uses. It spells "FGAUDIT".
_PG_AUDIT_LOCK_KEY = 0x46474155444954

# Only reached on a backend without one of the locks below, where two appenders can race for the same
# seq; the primary key on seq makes the loser fail instead of forking the chain, and it tries again.
_MAX_APPEND_ATTEMPTS = 20


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AuditRow(Base):
    """One audit event. Rows are written once; `seq` is assigned by `AuditLog.append`, not by the database."""

    __tablename__ = "audit_log"

    # Explicit (no autoincrement): seq is part of the hashed content, so it must be known before insert,
    # and an explicit primary key also refuses a second row claiming the same place in the chain.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(64), index=True)
    organisation_id: Mapped[str] = mapped_column(String(255), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    capability: Mapped[str | None] = mapped_column(String(64), nullable=True)
    purpose: Mapped[str | None] = mapped_column(String(255), nullable=True)
    gallery: Mapped[str | None] = mapped_column(String(255), nullable=True)
    registry_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)
    rule_ids: Mapped[list] = mapped_column(JSON, default=list)
    allowed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    # The named user who acted (scheduler/users.py; usernames are unique and never renamed), None for a machine
    # key or the system. Added after the first release: rows written before it have NULL here.
    username: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Unique: no two rows may claim the same predecessor, so the chain cannot fork even if a lock fails.
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    row_hash: Mapped[str] = mapped_column(String(64))


# The fields that go into row_hash: every column but row_hash itself.
HASHED_FIELDS: tuple[str, ...] = (
    "seq",
    "at",
    "event",
    "organisation_id",
    "api_key_id",
    "job_id",
    "capability",
    "purpose",
    "gallery",
    "registry_hash",
    "rule_ids",
    "allowed",
    "detail",
    "prev_hash",
)
# Hashed only when set. A row written before the column existed was hashed without it and reads back NULL,
# so its hash still verifies; a row with a user hashes it, so changing, adding or removing the user of any
# row breaks the chain (a key present or absent changes the canonical JSON). This needs no per-row hash
# version, and an old export (which lacks the field) checks the same way.
OPTIONAL_HASHED_FIELDS: tuple[str, ...] = ("username",)


@dataclass(frozen=True)
class AuditEntry:
    """One row as read back or as just appended."""

    seq: int
    at: datetime
    event: str
    organisation_id: str
    api_key_id: str | None
    job_id: str | None
    capability: str | None
    purpose: str | None
    gallery: str | None
    registry_hash: str | None
    rule_ids: list[str]
    allowed: bool | None
    detail: dict[str, Any]
    prev_hash: str
    row_hash: str
    username: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """All fields, with the time as an ISO string: the form that is hashed (minus row_hash) and exported."""
        values = asdict(self)
        values["at"] = _iso(self.at)
        return values


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows_checked: int
    first_broken_seq: int | None = None
    reason: str | None = None
    # (row count, last row's hash) of the rows checked: what to record elsewhere.
    head_rows: int = 0
    head_hash: str = GENESIS_HASH


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of the log's head at an instant: `rows` rows, the last with hash `head_hash`."""

    rows: int
    head_hash: str
    at: str
    signature: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Checkpoint":
        try:
            return cls(rows=int(data["rows"]), head_hash=str(data["head_hash"]), at=str(data["at"]),
                       signature=str(data["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an audit checkpoint: {exc}") from None


def _checkpoint_signature(rows: int, head_hash: str, at: str, secret: str) -> str:
    message = f"facegate-audit-checkpoint\n{rows}\n{head_hash}\n{at}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def checkpoint_is_genuine(checkpoint: Checkpoint, secret: str) -> bool:
    expected = _checkpoint_signature(checkpoint.rows, checkpoint.head_hash, checkpoint.at, secret)
    return hmac.compare_digest(expected, checkpoint.signature)


def _iso(at: datetime) -> str:
    # Fixed precision and zone, so the text hashed at append equals the text rebuilt from the database.
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _canonical(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and PostgreSQL's json type would refuse it at insert anyway.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def row_hash_of(row: dict[str, Any]) -> str:
    """sha256 (hex) of a row's canonical JSON: all HASHED_FIELDS, the OPTIONAL_HASHED_FIELDS that are set,
    `at` as an ISO string, row_hash left out."""
    content = {name: row[name] for name in HASHED_FIELDS}
    content.update({name: row[name] for name in OPTIONAL_HASHED_FIELDS if row.get(name) is not None})
    if isinstance(content["at"], datetime):
        content["at"] = _iso(content["at"])
    return hashlib.sha256(_canonical(content).encode("utf-8")).hexdigest()


def _json_safe(value: Any) -> Any:
    """The value as it will read back from a JSON column, so what is hashed is exactly what is stored.

    Tuples become lists and anything json cannot encode (datetimes, UUIDs, enums) becomes its str().
    """
    return json.loads(_canonical(value))


def _entry_from_mapping(values: Any) -> AuditEntry:
    return AuditEntry(**{name: values[name] for name in (*HASHED_FIELDS, *OPTIONAL_HASHED_FIELDS, "row_hash")})


class AuditLog:
    """The audit log in one database. Safe to share between threads; appends serialise across processes."""

    def __init__(self, db_url: str, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.db_url = db_url
        self._clock = clock
        self._engine = engine_for(db_url)
        self._table = Base.metadata.tables[AuditRow.__tablename__]
        create_schema(db_url)

    # -- writing -------------------------------------------------------------------------------------

    def append(
        self,
        event: str,
        *,
        organisation_id: str,
        api_key_id: str | None = None,
        username: str | None = None,
        job_id: str | None = None,
        capability: str | None = None,
        purpose: str | None = None,
        gallery: str | None = None,
        registry_hash: str | None = None,
        rule_ids: list[str] | tuple[str, ...] | None = None,
        allowed: bool | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one event at the end of the chain and return it as stored (with seq and hashes).
        `username`: the named user who acted, if a person did (the key column then says `user:<id>`)."""
        if not event:
            raise ValueError("an audit event needs a name, e.g. 'policy.decision'")
        if not organisation_id:
            raise ValueError(f"audit event {event!r} needs the organisation it concerns")
        if isinstance(rule_ids, str):
            raise TypeError("rule_ids must be a list of rule ids, not one string")
        fields = {
            "event": event,
            "organisation_id": organisation_id,
            "api_key_id": api_key_id,
            "username": username or None,
            "job_id": job_id,
            "capability": capability,
            "purpose": purpose,
            "gallery": gallery,
            "registry_hash": registry_hash,
            "rule_ids": _json_safe(list(rule_ids or [])),
            "allowed": None if allowed is None else bool(allowed),
            "detail": _json_safe(dict(detail or {})),
        }
        for attempt in range(1, _MAX_APPEND_ATTEMPTS + 1):
            try:
                with self._engine.connect() as conn:
                    self._lock_chain(conn)
                    entry = self._insert_after_last(conn, fields)
                    conn.commit()
                    return entry
            except IntegrityError:
                # Another appender took this seq first (only possible without a lock); read the new end.
                if attempt == _MAX_APPEND_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def append_decision(
        self,
        decision: Any,
        *,
        event: str = AuditEvent.POLICY_DECISION,
        api_key_id: str | None = None,
        username: str | None = None,
        job_id: str | None = None,
        gallery: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Append a `policy.Decision` (read by attribute, so any object with those attributes will do).

        The decision's reason and the instant it was decided for go into `detail`; given `detail` keys win.
        """
        organisation_id = getattr(decision, "organisation_id", None)
        if not organisation_id:
            raise ValueError("decision names no organisation; an audit row must say whom it concerns")
        decided = {"reason": getattr(decision, "reason", None)}
        decided_for = getattr(decision, "at", None)
        if decided_for is not None:
            decided["decided_for"] = decided_for.isoformat()
        return self.append(
            event,
            organisation_id=organisation_id,
            api_key_id=api_key_id,
            username=username,
            job_id=job_id,
            capability=getattr(decision, "capability", None),
            purpose=getattr(decision, "purpose", None),
            gallery=gallery,
            registry_hash=getattr(decision, "registry_hash", None),
            rule_ids=list(getattr(decision, "rule_ids", None) or []),
            allowed=getattr(decision, "allowed", None),
            detail={**decided, **(detail or {})},
        )

    def _lock_chain(self, conn: Connection) -> None:
        """Make this transaction the only appender until it ends, in every process using the database.

        Reading the last row and inserting its successor must be one atomic step, or two appenders
        would both link to the same predecessor.
        - PostgreSQL: a transaction-scoped advisory lock; released by commit or rollback.
        - SQLite: BEGIN IMMEDIATE takes the database's single write lock before the read (a plain BEGIN
          would read first and fail to upgrade later). Python's sqlite3 module sees the open transaction
          and issues no BEGIN of its own; busy_timeout (set in facegate.db) makes waiters wait.
        - Anything else: no lock; the primary key on seq refuses the loser of a race and append retries.
        """
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_AUDIT_LOCK_KEY})
        elif dialect == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _insert_after_last(self, conn: Connection, fields: dict[str, Any]) -> AuditEntry:
        last = conn.execute(
            select(self._table.c.seq, self._table.c.row_hash).order_by(self._table.c.seq.desc()).limit(1)
        ).first()
        seq, prev_hash = (1, GENESIS_HASH) if last is None else (last.seq + 1, last.row_hash)
        at = self._clock()
        if at.tzinfo is None:
            raise ValueError("the audit clock returned a naive datetime; it must return aware UTC times")
        row = {"seq": seq, "at": at.astimezone(timezone.utc), **fields, "prev_hash": prev_hash}
        row["row_hash"] = row_hash_of(row)
        conn.execute(self._table.insert().values(**row))
        return _entry_from_mapping(row)

    # -- reading -------------------------------------------------------------------------------------

    def rows(
        self,
        *,
        job_id: str | None = None,
        organisation_id: str | None = None,
        event: str | None = None,
        username: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> list[AuditEntry]:
        """Rows matching every filter given, oldest first (by seq); `newest`: the last `limit` of them."""
        return list(self._iter_rows(job_id=job_id, organisation_id=organisation_id, event=event, username=username,
                                    since=since, limit=limit, newest=newest))

    def head(self) -> tuple[int, str] | None:
        """(seq, row_hash) of the newest row, or None when empty: the value to record elsewhere against truncation."""
        with self._engine.connect() as conn:
            last = conn.execute(
                select(self._table.c.seq, self._table.c.row_hash).order_by(self._table.c.seq.desc()).limit(1)
            ).first()
        return None if last is None else (last.seq, last.row_hash)

    def _iter_rows(
        self,
        *,
        job_id: str | None = None,
        organisation_id: str | None = None,
        event: str | None = None,
        username: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
        newest: bool = False,
    ) -> Iterator[AuditEntry]:
        table = self._table
        query = select(table).order_by(table.c.seq.desc() if newest else table.c.seq)
        if job_id is not None:
            query = query.where(table.c.job_id == job_id)
        if organisation_id is not None:
            query = query.where(table.c.organisation_id == organisation_id)
        if event is not None:
            query = query.where(table.c.event == event)
        if username is not None:
            query = query.where(table.c.username == username)
        if since is not None:
            if since.tzinfo is None:
                raise ValueError("since must be an aware datetime (UTC)")
            query = query.where(table.c.at >= since)
        if limit is not None:
            query = query.limit(limit)
        if newest:
            query = select(query.subquery()).order_by(text("seq"))
        with self._engine.connect() as conn:
            # Streamed in batches: verify and export walk the whole table, which may be large.
            result = conn.execution_options(yield_per=1000).execute(query)
            for values in result.mappings():
                yield _entry_from_mapping(values)

    # -- checking and exporting ----------------------------------------------------------------------

    def checkpoint(self, secret: str) -> Checkpoint:
        """The head of the log now, signed: keep it elsewhere, and hand it to `verify` later."""
        head = self.head()
        rows, head_hash = head if head is not None else (0, GENESIS_HASH)
        at = _iso(self._clock())
        return Checkpoint(rows, head_hash, at, _checkpoint_signature(rows, head_hash, at, secret))

    def _verified_entries(self) -> Iterator[tuple[int, AuditEntry | None, str | None]]:
        """(seq, entry, None) per row in seq order, or (seq, None, why) for a row that cannot be read."""
        table = self._table
        with self._engine.connect() as conn:
            seqs = list(conn.execute(select(table.c.seq).order_by(table.c.seq)).scalars())
        for start in range(0, len(seqs), 1000):
            batch = seqs[start : start + 1000]
            try:
                with self._engine.connect() as conn:
                    rows = conn.execute(select(table).where(table.c.seq.between(batch[0], batch[-1]))
                                        .order_by(table.c.seq)).mappings().all()
                    entries = [_entry_from_mapping(values) for values in rows]
            except Exception:  # noqa: BLE001 - one unreadable row: find it, one by one
                entries = None
            if entries is not None:
                for entry in entries:
                    yield entry.seq, entry, None
                continue
            for seq in batch:
                try:
                    with self._engine.connect() as conn:
                        values = conn.execute(select(table).where(table.c.seq == seq)).mappings().one()
                    yield seq, _entry_from_mapping(values), None
                except Exception as exc:  # noqa: BLE001 -- an unreadable row is reported as broken, not raised
                    yield seq, None, f"{type(exc).__name__}: {str(exc)[:200]}"

    def verify(self, checkpoint: Checkpoint | None = None, secret: str | None = None) -> VerifyResult:
        """Recompute every row's hash in seq order; check seq continuity and prev_hash links; name the first break.

        With a checkpoint (and the secret it was signed with), also: its signature, that the log still
        holds its rows (not truncated), and that its last row is the one it recorded (tail not rewritten)."""
        checked = 0
        previous: AuditEntry | None = None

        def broken(seq: int | None, reason: str) -> VerifyResult:
            return VerifyResult(False, checked, seq, reason, previous.seq if previous else 0,
                                previous.row_hash if previous else GENESIS_HASH)

        if checkpoint is not None and secret is not None and not checkpoint_is_genuine(checkpoint, secret):
            return broken(None, "the checkpoint's signature does not match: it was altered or signed under "
                                "another secret")
        for seq, entry, unreadable in self._verified_entries():
            if unreadable is not None:
                return broken(seq, f"row {seq}: cannot be read ({unreadable})")
            assert entry is not None
            expected_seq = 1 if previous is None else previous.seq + 1
            if entry.seq != expected_seq:
                missing = (
                    f"row {expected_seq}" if entry.seq == expected_seq + 1 else f"rows {expected_seq}-{entry.seq - 1}"
                )
                where = "sequence starts at" if previous is None else f"sequence jumps from {previous.seq} to"
                return broken(expected_seq, f"{missing} missing: {where} {entry.seq}")
            try:
                intact = row_hash_of(entry.as_dict()) == entry.row_hash
            except Exception as exc:  # noqa: BLE001 - a value of the wrong type: the row is corrupt
                return broken(entry.seq, f"row {entry.seq}: cannot be read ({type(exc).__name__}: {exc})")
            if not intact:
                return broken(entry.seq,
                              f"row {entry.seq}: stored hash does not match its content (changed after it was written)")
            expected_prev = GENESIS_HASH if previous is None else previous.row_hash
            if entry.prev_hash != expected_prev:
                linked_to = "the genesis value (64 zeros)" if previous is None else f"row {previous.seq}'s hash"
                return broken(entry.seq,
                              f"row {entry.seq}: prev_hash does not match {linked_to} (an earlier row was changed or replaced)")
            if checkpoint is not None and entry.seq == checkpoint.rows and entry.row_hash != checkpoint.head_hash:
                return broken(entry.seq, f"row {entry.seq}: its hash differs from the checkpoint of {checkpoint.at} "
                                         "(the log was rewritten from here on)")
            checked += 1
            previous = entry
        if checkpoint is not None and checked < checkpoint.rows:
            return broken(checked + 1, f"truncated: the log holds {checked} rows, the checkpoint of {checkpoint.at} "
                                       f"recorded {checkpoint.rows}")
        return VerifyResult(True, checked, head_rows=previous.seq if previous else 0,
                            head_hash=previous.row_hash if previous else GENESIS_HASH)

    def export(self, fh: TextIO, *, since: datetime | None = None, organisation_id: str | None = None,
               username: str | None = None) -> int:
        """Write matching rows as JSON lines (all fields, ISO times), oldest first; return how many."""
        count = 0
        for entry in self._iter_rows(since=since, organisation_id=organisation_id, username=username):
            fh.write(_canonical(entry.as_dict()) + "\n")
            count += 1
        return count


__all__ = [
    "Checkpoint",
    "checkpoint_is_genuine",
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "OPTIONAL_HASHED_FIELDS",
    "AuditEntry",
    "AuditLog",
    "AuditRow",
    "VerifyResult",
    "row_hash_of",
]
