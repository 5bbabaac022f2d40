"""Legal authorisation per job: does this job stand on an authorisation the purpose accepts, valid now?

Laws that allow some police face search tie each search to a legal authorisation: Washington RCW
43.386.080 names a warrant, a court order, or exigent circumstances; the EU AI Act (Art 5(1)(h), 5(3),
26(10)) asks for prior judicial or independent approval, or in urgency approval requested promptly,
and when it is refused, the use stops and its results are deleted.

As data in the registry:
- `authorisation_kinds`: each kind (warrant, court-order, exigent, ...) with how long it is valid from its
  issue (`valid_hours`, None: until withdrawn) and whether a confirmation lifts that limit
  (`unless_confirmed`: exigent circumstances are valid 48 hours unless a court confirms them).
- a purpose's `authorisation`: the kinds it accepts; a job for that purpose without one is refused.

Pure: the record is a value and the instant a parameter; the scheduler and the worker read the record
from the database and ask here, at submission and again at execution.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALLOW_AUTHORISATION",
    "ALLOW_NOT_REQUIRED",
    "DENY_AUTHORISATION_KIND",
    "DENY_AUTHORISATION_LAPSED",
    "DENY_AUTHORISATION_NOT_YET",
    "DENY_AUTHORISATION_OTHER",
    "DENY_AUTHORISATION_REQUIRED",
    "DENY_AUTHORISATION_UNKNOWN",
    "DENY_AUTHORISATION_WITHDRAWN",
    "AuthorisationCheck",
    "AuthorisationKind",
    "AuthorisationRecord",
    "AuthorisationRequirement",
    "check_authorisation",
    "valid_until",
]

ALLOW_NOT_REQUIRED = "allow.authorisation-not-required"
ALLOW_AUTHORISATION = "allow.authorisation-valid"
DENY_AUTHORISATION_REQUIRED = "deny.authorisation-required"
DENY_AUTHORISATION_UNKNOWN = "deny.authorisation-unknown"
DENY_AUTHORISATION_OTHER = "deny.authorisation-of-another"
DENY_AUTHORISATION_KIND = "deny.authorisation-kind-not-accepted"
DENY_AUTHORISATION_WITHDRAWN = "deny.authorisation-withdrawn"
DENY_AUTHORISATION_LAPSED = "deny.authorisation-lapsed"
DENY_AUTHORISATION_NOT_YET = "deny.authorisation-not-yet-issued"


class AuthorisationKind(BaseModel):
    """A kind of legal authorisation and its rules. `valid_hours` counts from the issue; None: valid until
    withdrawn. `unless_confirmed`: once confirmed (a court approves the urgent use), the hours no longer
    apply."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")
    description: str
    valid_hours: float | None = Field(default=None, gt=0)
    unless_confirmed: bool = False


class AuthorisationRequirement(BaseModel):
    """What a purpose asks of each job: an authorisation of one of these kinds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kinds: list[str] = Field(min_length=1)
    # Which capabilities need it (erasure never does: deleting is always allowed).
    capabilities: list[str] = Field(default_factory=lambda: ["search"])


class AuthorisationRecord(BaseModel):
    """One recorded authorisation, as the database holds it."""

    model_config = ConfigDict(frozen=True)

    id: str
    organisation_id: str
    kind: str
    reference: str  # the authority's own identifier (warrant number, case number)
    issuing_authority: str
    issued_at: dt.datetime
    confirmed_at: dt.datetime | None = None
    withdrawn_at: dt.datetime | None = None
    withdrawn_reason: str | None = None


class AuthorisationCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    allowed: bool
    rule_ids: list[str]
    reason: str
    # When the authorisation stops being valid (None: until withdrawn, or none involved).
    valid_until: dt.datetime | None = None


def valid_until(record: AuthorisationRecord, kind: AuthorisationKind) -> dt.datetime | None:
    """The instant `record` lapses under `kind`'s rule, ignoring withdrawal; None: it does not lapse."""
    if kind.valid_hours is None:
        return None
    deadline = record.issued_at + dt.timedelta(hours=kind.valid_hours)
    if kind.unless_confirmed and record.confirmed_at is not None and record.confirmed_at <= deadline:
        return None
    return deadline


def _aware(at: dt.datetime) -> dt.datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"instant {at.isoformat()} has no timezone; pass an aware datetime")
    return at.astimezone(dt.timezone.utc)


def _describe(record: AuthorisationRecord) -> str:
    return f"{record.kind} '{record.reference}' issued by {record.issuing_authority} ({record.id})"


def check_authorisation(requirement: AuthorisationRequirement | None, kinds: dict[str, AuthorisationKind],
                        record: AuthorisationRecord | None, *, organisation_id: str, purpose: str,
                        capability: str, at: dt.datetime, authorisation_id: str | None = None) -> AuthorisationCheck:
    """Decide whether a job of `organisation_id` for `purpose` may use `capability` at `at` on `record`
    (None: no authorisation given, or `authorisation_id` names none that is recorded)."""
    at = _aware(at)
    needed = requirement is not None and capability in requirement.capabilities
    if record is None:
        if authorisation_id:
            return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_UNKNOWN],
                                      reason=f"Denied: no authorisation {authorisation_id!r} is recorded for "
                                             f"organisation '{organisation_id}'.")
        if needed and requirement is not None:
            return AuthorisationCheck(
                allowed=False, rule_ids=[DENY_AUTHORISATION_REQUIRED],
                reason=f"Denied: purpose '{purpose}' requires a legal authorisation for each {capability} job "
                       f"({' or '.join(requirement.kinds)}); record one with `facegate authorisation record` and "
                       f"name it on the job.")
        return AuthorisationCheck(allowed=True, rule_ids=[ALLOW_NOT_REQUIRED],
                                  reason=f"Allowed: purpose '{purpose}' requires no authorisation for {capability}.")
    what = _describe(record)
    if record.organisation_id != organisation_id:
        # Said as for an unknown one: another organisation's authorisation is not this one's to know of.
        return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_UNKNOWN],
                                  reason=f"Denied: no authorisation {record.id!r} is recorded for organisation "
                                         f"'{organisation_id}'.")
    kind = kinds.get(record.kind)
    if requirement is not None and record.kind not in requirement.kinds or kind is None:
        accepted = " or ".join(requirement.kinds) if requirement else "none"
        return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_KIND],
                                  reason=f"Denied: {what} is of a kind purpose '{purpose}' does not accept "
                                         f"(accepted: {accepted}).")
    if record.withdrawn_at is not None and record.withdrawn_at <= at:
        why = f" ({record.withdrawn_reason})" if record.withdrawn_reason else ""
        return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_WITHDRAWN],
                                  reason=f"Denied: {what} was withdrawn at {record.withdrawn_at.isoformat()}{why}.")
    if record.issued_at > at:
        return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_NOT_YET],
                                  reason=f"Denied: {what} is issued only from {record.issued_at.isoformat()}.")
    until = valid_until(record, kind)
    if until is not None and at >= until:
        rule = (f"{kind.id} is valid {kind.valid_hours:g} hours from its issue"
                + (" unless confirmed, and it was not confirmed in time" if kind.unless_confirmed else ""))
        return AuthorisationCheck(allowed=False, rule_ids=[DENY_AUTHORISATION_LAPSED], valid_until=until,
                                  reason=f"Denied: {what} lapsed at {until.isoformat()}: {rule}.")
    validity = "until withdrawn" if until is None else f"until {until.isoformat()}" + (
        " unless confirmed before then" if kind.unless_confirmed else "")
    return AuthorisationCheck(allowed=True, rule_ids=[ALLOW_AUTHORISATION], valid_until=until,
                              reason=f"Allowed: {what} is valid {validity} for purpose '{purpose}'.")
