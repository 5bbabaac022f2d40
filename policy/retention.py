"""Retention: when must a gallery, an upload or a job's results be erased?

Biometric laws require a published retention schedule and destruction when the purpose is met (Illinois
BIPA 740 ILCS 14/15(a): at the latest three years after the individual's last interaction). As data in
the registry: `retention` at the top (the legal maximum and the defaults) and per purpose (shorter
periods for its galleries, uploads and results). A gallery's owner may set a shorter period of its own;
nothing may be kept longer than the legal maximum.

Pure: the instants are parameters. The scheduler's sweep (scheduler/retention.py) asks here for each
gallery, upload and result, and erases what is due through the ordinary erasure path.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RetentionPeriods", "RetentionPolicy", "Schedule", "Subject", "check_owner_period", "schedule"]

Subject = Literal["gallery", "uploads", "results"]


class RetentionPeriods(BaseModel):
    """Days each kind of data is kept (None: no period of this level; the next level decides)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gallery_days: int | None = Field(default=None, ge=1)
    uploads_days: int | None = Field(default=None, ge=0)
    results_days: int | None = Field(default=None, ge=1)

    def days(self, subject: Subject) -> int | None:
        return {"gallery": self.gallery_days, "uploads": self.uploads_days, "results": self.results_days}[subject]


class RetentionPolicy(RetentionPeriods):
    """The registry's top-level `retention`: the legal maximum (BIPA: three years) and the defaults."""

    legal_max_days: int = Field(default=1095, ge=1)
    legal_basis: str = "Illinois BIPA 740 ILCS 14/15(a): destroyed at the latest 3 years after the last interaction"


class Schedule(BaseModel):
    """When one item is erased, and why that date."""

    model_config = ConfigDict(frozen=True)

    subject: Subject
    days: int
    since: dt.datetime  # the last interaction (galleries) or when the job ended (uploads, results)
    erase_at: dt.datetime
    basis: Literal["owner", "purpose", "default", "legal maximum"]
    reason: str

    def due(self, at: dt.datetime) -> bool:
        return at >= self.erase_at


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"instant {value.isoformat()} has no timezone; pass an aware datetime")
    return value.astimezone(dt.timezone.utc)


def schedule(subject: Subject, since: dt.datetime, *, policy: RetentionPolicy, purpose_id: str | None,
             purpose_periods: RetentionPeriods | None, owner_days: int | None = None) -> Schedule:
    """The erasure date of one gallery (since its last interaction: created or last indexed), upload or job
    result set (since the job ended). The owner's period wins when given, then the purpose's, then the
    registry's default; none may exceed the legal maximum, which applies when nothing shorter is stated."""
    since = _aware(since)
    candidates: list[tuple[Literal["owner", "purpose", "default"], int | None, str]] = [
                  ("owner", owner_days, f"the owner's period of {owner_days} days"),
                  ("purpose", purpose_periods.days(subject) if purpose_periods else None,
                   f"purpose '{purpose_id}' keeps {subject} "),
                  ("default", policy.days(subject), f"the registry's default for {subject} ")]
    for basis, days, text in candidates:
        if days is None:
            continue
        if days > policy.legal_max_days:
            break  # longer than the law allows: the legal maximum decides
        if basis != "owner":
            text += f"{days} days"
        erase_at = since + dt.timedelta(days=days)
        return Schedule(subject=subject, days=days, since=since, erase_at=erase_at, basis=basis,
                        reason=f"erased {erase_at.isoformat()}: {text} from {since.isoformat()} (legal maximum "
                               f"{policy.legal_max_days} days)")
    erase_at = since + dt.timedelta(days=policy.legal_max_days)
    return Schedule(subject=subject, days=policy.legal_max_days, since=since, erase_at=erase_at, basis="legal maximum",
                    reason=f"erased {erase_at.isoformat()}: the legal maximum of {policy.legal_max_days} days from "
                           f"{since.isoformat()} ({policy.legal_basis})")


def check_owner_period(days: int, policy: RetentionPolicy) -> str | None:
    """Why an owner's period is refused (over the legal maximum, or not positive); None when it is acceptable."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        return f"a retention period is a whole number of days, at least 1; got {days!r}"
    if days > policy.legal_max_days:
        return (f"a retention period of {days} days is longer than the legal maximum of {policy.legal_max_days} "
                f"days ({policy.legal_basis})")
    return None
