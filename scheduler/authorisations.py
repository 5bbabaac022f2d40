"""Legal authorisations: record, confirm, withdraw; what each is worth now; erasing the results of the jobs
that stood on one that was withdrawn.

An organisation records its own authorisations (a warrant, a court order, exigent circumstances) and names
one on each job of a purpose that requires it (policy/authorisation.py decides, at submission and again in
the worker). Another organisation's authorisation reads as not found. Every change is audited. Who may make
which change is the access rule's (`AccessRule.authorize_authorisation`): administrators record, confirm and
withdraw, and whoever recorded one may not confirm it; every entry point (API, CLI, JobService's withdrawal)
goes through this service, which asks it.
"""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from facegate.audit import AuditLog
from facegate.authorisations import AuthorisationRow, read_authorisation
from facegate.db import create_schema, session_scope
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent
from policy import Registry
from policy.authorisation import AuthorisationCheck, AuthorisationRecord, check_authorisation, valid_until
from scheduler.access import AccessRule, Action, load_policy
from scheduler.keys import Principal

__all__ = ["AuthorisationError", "AuthorisationNotFound", "AuthorisationService", "AuthorisationView",
           "authorisation_check", "record_of"]


class AuthorisationError(ValueError):
    """A bad request about an authorisation (unknown kind, empty reference, already withdrawn); says which."""


class AuthorisationNotFound(LookupError):
    pass


@dataclass
class AuthorisationView:
    id: str
    organisation_id: str
    kind: str
    reference: str
    issuing_authority: str
    issued_at: datetime
    recorded_at: datetime
    confirmed_at: datetime | None
    withdrawn_at: datetime | None
    withdrawn_reason: str | None
    # Who recorded it: the key, or `user:<id>` for a named user.
    recorded_by: str | None
    # Derived under the registry's rules, at the time of asking.
    status: str  # valid | lapsed | withdrawn | not-yet-issued | unknown-kind
    valid_until: datetime | None
    rule: str


def record_of(fields: dict) -> AuthorisationRecord:
    return AuthorisationRecord(**fields)


def authorisation_check(settings: Settings, registry: Registry, *, organisation_id: str, purpose: str,
                        capability: str, authorisation_id: str | None, at: datetime) -> AuthorisationCheck:
    """The policy's answer for a job naming `authorisation_id` (or none), reading the record from the database."""
    fields = read_authorisation(settings.resolved_database_url, authorisation_id) if authorisation_id else None
    entry = registry.purpose(purpose)
    kinds = {k.id: k for k in registry.authorisation_kinds}
    return check_authorisation(entry.authorisation if entry else None, kinds,
                               record_of(fields) if fields else None, organisation_id=organisation_id,
                               purpose=purpose, capability=capability, at=at, authorisation_id=authorisation_id)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class AuthorisationService:
    def __init__(self, settings: Settings, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.db_url = settings.resolved_database_url
        create_schema(self.db_url)
        self.audit = audit or AuditLog(self.db_url)
        self.access = AccessRule(settings, self.audit)

    # Changes ------------------------------------------------------------------------------------------

    def record(self, principal: Principal, *, kind: str, reference: str, issuing_authority: str,
               issued_at: datetime, now: datetime | None = None) -> AuthorisationView:
        self.access.authorize_authorisation(principal, Action.RECORD_AUTHORISATION)
        registry = load_policy(self.settings)
        known = [k.id for k in registry.authorisation_kinds]
        if registry.authorisation_kind(kind) is None:
            raise AuthorisationError(f"authorisation kind {kind!r} is not in the registry (known: "
                                     f"{', '.join(known) or 'none'})")
        for name, value in (("reference", reference), ("issuing authority", issuing_authority)):
            if not value or not value.strip():
                raise AuthorisationError(f"an authorisation names its {name}: it was empty")
            if len(value) > 256:
                raise AuthorisationError(f"the {name} is longer than 256 characters")
        now = now or datetime.now(timezone.utc)
        issued_at = _aware(issued_at)
        if issued_at > now:
            raise AuthorisationError(f"issued at {issued_at.isoformat()} is in the future")
        row = AuthorisationRow(id=uuid.uuid4().hex, organisation_id=principal.organisation_id, kind=kind,
                               reference=reference.strip(), issuing_authority=issuing_authority.strip(),
                               issued_at=issued_at, recorded_at=now, recorded_by=principal.key_id)
        with session_scope(self.db_url) as s:
            s.add(row)
        view = self.get(principal, row.id, now=now)
        self._audit(AuditEvent.AUTHORISATION_RECORDED, principal, view, registry)
        return view

    def confirm(self, principal: Principal, authorisation_id: str, *, now: datetime | None = None) -> AuthorisationView:
        """Record that the authorisation was confirmed (a court approved the urgent use). A lapsed exigent
        authorisation is not revived: confirmation counts only before its deadline."""
        now = now or datetime.now(timezone.utc)
        self.access.check_role(principal, Action.CONFIRM_AUTHORISATION)
        current = self.get(principal, authorisation_id, now=now)
        self.access.authorize_authorisation(principal, Action.CONFIRM_AUTHORISATION, authorisation_id=authorisation_id,
                                            recorded_by=current.recorded_by)
        if current.withdrawn_at is not None:
            raise AuthorisationError(f"authorisation {authorisation_id} was withdrawn; it cannot be confirmed")
        if current.status == "lapsed":
            lapsed_at = current.valid_until.isoformat() if current.valid_until else "its deadline"
            raise AuthorisationError(f"authorisation {authorisation_id} lapsed at {lapsed_at}; "
                                     "a confirmation after its deadline does not revive it: record a new one")
        with session_scope(self.db_url) as s:
            _row(s, authorisation_id).confirmed_at = now
        view = self.get(principal, authorisation_id, now=now)
        self._audit(AuditEvent.AUTHORISATION_CONFIRMED, principal, view, load_policy(self.settings))
        return view

    def withdraw(self, principal: Principal, authorisation_id: str, *, reason: str,
                 now: datetime | None = None) -> AuthorisationView:
        """Withdraw it (refused, revoked, or no longer needed): every job naming it is refused from now on,
        at submission and in the worker; erasing its jobs' results is the JobService's `erase_results`."""
        self.access.authorize_authorisation(principal, Action.WITHDRAW_AUTHORISATION, authorisation_id=authorisation_id)
        if not reason or not reason.strip():
            raise AuthorisationError("a withdrawal says why: the reason was empty")
        now = now or datetime.now(timezone.utc)
        current = self.get(principal, authorisation_id, now=now)
        if current.withdrawn_at is not None:
            raise AuthorisationError(f"authorisation {authorisation_id} was already withdrawn at "
                                     f"{current.withdrawn_at.isoformat()}")
        with session_scope(self.db_url) as s:
            row = _row(s, authorisation_id)
            row.withdrawn_at, row.withdrawn_reason = now, reason.strip()
        view = self.get(principal, authorisation_id, now=now)
        self._audit(AuditEvent.AUTHORISATION_WITHDRAWN, principal, view, load_policy(self.settings))
        return view

    # Reading ------------------------------------------------------------------------------------------

    def get(self, principal: Principal, authorisation_id: str, *, now: datetime | None = None) -> AuthorisationView:
        with session_scope(self.db_url) as s:
            row = _row(s, authorisation_id)
            if row is None or row.organisation_id != principal.organisation_id:
                raise AuthorisationNotFound(f"no authorisation {authorisation_id} for organisation "
                                            f"{principal.organisation_id!r}")
            return self._view(row, load_policy(self.settings), now or datetime.now(timezone.utc))

    def list(self, principal: Principal, *, now: datetime | None = None) -> builtins.list[AuthorisationView]:
        registry, now = load_policy(self.settings), now or datetime.now(timezone.utc)
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(AuthorisationRow).where(AuthorisationRow.organisation_id == principal.organisation_id)
                             .order_by(AuthorisationRow.recorded_at.desc())).all()
            return [self._view(r, registry, now) for r in rows]

    # builtins.list: in this class, `list` is the method above.
    def lapsed_or_withdrawn(self, now: datetime) -> builtins.list[str]:
        """Ids of every authorisation no longer valid at `now` (for the retention sweep)."""
        registry = load_policy(self.settings)
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(AuthorisationRow)).all()
            return [r.id for r in rows if self._view(r, registry, now).status in ("lapsed", "withdrawn")]

    @staticmethod
    def _view(row: AuthorisationRow, registry: Registry, now: datetime) -> AuthorisationView:
        record = record_of(row.as_dict())
        kind = registry.authorisation_kind(row.kind)
        until = valid_until(record, kind) if kind is not None else None
        if kind is None:
            status, rule = "unknown-kind", f"kind {row.kind!r} is no longer in the registry: refused"
        else:
            rule = ("valid until withdrawn" if kind.valid_hours is None else
                    f"valid {kind.valid_hours:g} hours from its issue" + (" unless confirmed" if kind.unless_confirmed
                                                                          else ""))
            if record.withdrawn_at is not None and record.withdrawn_at <= now:
                status = "withdrawn"
            elif record.issued_at > now:
                status = "not-yet-issued"
            elif until is not None and now >= until:
                status = "lapsed"
            else:
                status = "valid"
        return AuthorisationView(id=row.id, organisation_id=row.organisation_id, kind=row.kind, reference=row.reference,
                                 issuing_authority=row.issuing_authority, issued_at=row.issued_at,
                                 recorded_at=row.recorded_at, confirmed_at=row.confirmed_at,
                                 withdrawn_at=row.withdrawn_at, withdrawn_reason=row.withdrawn_reason,
                                 recorded_by=row.recorded_by, status=status,
                                 valid_until=until, rule=rule)

    def _audit(self, event: str, principal: Principal, view: AuthorisationView, registry: Registry) -> None:
        self.audit.append(event, organisation_id=principal.organisation_id, **principal.actor,
                          registry_hash=registry.content_hash, allowed=True,
                          detail={"authorisation": describe(view)})


def describe(view: AuthorisationView) -> dict:
    """What audit rows say about an authorisation."""
    return {"id": view.id, "kind": view.kind, "reference": view.reference, "issuing_authority": view.issuing_authority,
            "issued_at": view.issued_at.isoformat(), "status": view.status,
            "valid_until": view.valid_until.isoformat() if view.valid_until else None,
            "confirmed_at": view.confirmed_at.isoformat() if view.confirmed_at else None,
            "withdrawn_at": view.withdrawn_at.isoformat() if view.withdrawn_at else None,
            "withdrawn_reason": view.withdrawn_reason}


def _row(s: Session, authorisation_id: str) -> AuthorisationRow:
    """The row `get` has just read; gone only if it was deleted since."""
    row = s.get(AuthorisationRow, authorisation_id)
    if row is None:
        raise AuthorisationError(f"no authorisation {authorisation_id}")
    return row
