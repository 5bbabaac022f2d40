"""Reading the audit log for an organisation's auditors: which rows they may read, the filters, a row's form.

One rule for the console's audit page and export and the API's /v1/audit/events and /v1/audit/export: an
organisation reads its own rows and the rows about its galleries (who used them), narrowed by organisation,
purpose, event, acting user and date. Whether the asker may read the log at all is the access rule's
(Action.AUDIT).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Iterator, Mapping

from sqlalchemy import Select, or_, select

from facegate.audit import AuditRow
from facegate.db import session_scope
from scheduler.models import Gallery

AUDIT_FILTERS = ("organisation", "purpose", "event", "user", "from", "to")


class AuditFilterError(ValueError):
    """A filter that cannot be used; the message names it."""


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise AuditFilterError(f"{name}: {value!r} is not a date (YYYY-MM-DD)") from None


def audit_query(db_url: str, organisation_id: str, filters: Mapping[str, str | None]) -> Select:
    """The rows `organisation_id`'s auditors may read, narrowed by `filters` (keys of AUDIT_FILTERS; empty or
    missing ones ignored); newest first. AuditFilterError for a date that is not one."""
    given = {k: (v or "").strip() for k, v in filters.items()}
    unknown = sorted(k for k, v in given.items() if v and k not in AUDIT_FILTERS)
    if unknown:
        raise AuditFilterError(f"unknown filter {unknown[0]!r}; filters are: {', '.join(AUDIT_FILTERS)}")
    start, end = _day(given.get("from"), "from"), _day(given.get("to"), "to")
    with session_scope(db_url) as s:
        own_galleries = list(s.scalars(select(Gallery.name).where(Gallery.owner == organisation_id)))
    query = select(AuditRow).where(or_(AuditRow.organisation_id == organisation_id,
                                       AuditRow.gallery.in_(own_galleries)))
    for name, column in (("organisation", AuditRow.organisation_id), ("purpose", AuditRow.purpose),
                         ("event", AuditRow.event), ("user", AuditRow.username)):
        if given.get(name):
            query = query.where(column == given[name])
    if start is not None:
        query = query.where(AuditRow.at >= datetime.combine(start, time.min, timezone.utc))
    if end is not None:
        query = query.where(AuditRow.at < datetime.combine(end + timedelta(days=1), time.min, timezone.utc))
    return query.order_by(AuditRow.seq.desc())


def audit_row(r: AuditRow) -> dict[str, Any]:
    """A row as the console and the API show and export it: every field, the time as the hash chain writes it,
    so `facegate.audit.row_hash_of` recomputes an exported row's hash."""
    return {"seq": r.seq, "at": r.at.astimezone(timezone.utc).isoformat(timespec="microseconds"), "event": r.event,
            "organisation_id": r.organisation_id, "username": r.username, "api_key_id": r.api_key_id, "job_id": r.job_id, "capability": r.capability,
            "purpose": r.purpose, "gallery": r.gallery, "registry_hash": r.registry_hash, "rule_ids": r.rule_ids,
            "allowed": r.allowed, "detail": r.detail, "prev_hash": r.prev_hash, "row_hash": r.row_hash}


def audit_rows(db_url: str, query: Select, offset: int, limit: int) -> list[dict[str, Any]]:
    with session_scope(db_url) as s:
        return [audit_row(r) for r in s.scalars(query.offset(offset).limit(limit))]


def audit_lines(db_url: str, query: Select) -> Iterator[dict[str, Any]]:
    """Every row of the query, oldest first, streamed (an export may be the whole log)."""
    with session_scope(db_url) as s:
        for r in s.scalars(query.order_by(None).order_by(AuditRow.seq).execution_options(yield_per=1000)):
            yield audit_row(r)


__all__ = ["AUDIT_FILTERS", "AuditFilterError", "audit_lines", "audit_query", "audit_rows", "audit_row"]
