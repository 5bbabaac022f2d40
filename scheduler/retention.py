"""The retention sweep: erase every gallery, kept upload and job result whose schedule has come, through the
ordinary erasure path (erasure jobs for vectors, `erase_results` for results) and the audit log.

Run nightly by Celery beat (`facegate beat`) and on demand (`facegate retention run`). The schedule is
policy/retention.py's; this module only reads what exists, asks when each is due, and erases what is.
Nothing is erased before its date: `run(now)` takes the instant it erases for, and a dry run says what a
later instant would erase without touching anything.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from facegate.db import session_scope
from facegate.vocabulary import AuditEvent
from policy import Registry
from policy.retention import Schedule, check_owner_period, schedule
from scheduler.access import SYSTEM_ORGANISATION, Action, GalleryHidden, load_policy
from scheduler.authorisations import AuthorisationService
from scheduler.keys import Principal
from scheduler.models import Gallery, Job, JobState, ProbeResult

__all__ = ["RetentionReport", "RetentionService", "gallery_schedule"]

SYSTEM_PRINCIPAL = Principal(SYSTEM_ORGANISATION, None)


def gallery_schedule(row: Gallery, registry: Registry) -> Schedule:
    """When this gallery is erased: from its last interaction (last indexed, else created)."""
    since = max(t for t in (row.created_at, row.last_indexed_at) if t is not None)
    purpose = registry.purpose(row.purpose) if row.purpose else None
    return schedule("gallery", since, policy=registry.retention, purpose_id=row.purpose,
                    purpose_periods=purpose.retention if purpose else None, owner_days=row.retention_days)


@dataclass
class RetentionReport:
    at: datetime
    dry_run: bool
    galleries: list[dict] = field(default_factory=list)
    uploads: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"at": self.at.isoformat(), "dry_run": self.dry_run, "galleries": self.galleries,
                "uploads": self.uploads, "results": self.results}


class RetentionService:
    def __init__(self, galleries) -> None:
        self.galleries = galleries
        self.jobs = galleries.jobs
        self.settings = self.jobs.settings
        self.db_url = self.jobs.db_url
        self.audit = self.jobs.audit

    # The owner's period ---------------------------------------------------------------------------------

    def set_gallery_period(self, principal: Principal, name: str, days: int | None) -> Schedule:
        """The owner sets (or, with None, clears) its gallery's retention period; never past the legal maximum."""
        from scheduler.service import JobRefused

        access = self.galleries.access.authorize(principal, Action.ERASE, name, purpose="retention")
        registry = load_policy(self.settings)
        if days is not None:
            problem = check_owner_period(days, registry.retention)
            if problem:
                raise JobRefused(problem)
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, access.gallery)
            if row is None:  # erased since it was authorised
                raise GalleryHidden(f"no gallery {name!r}")
            row.retention_days = days
            due = gallery_schedule(row, registry)
        self.audit.append(AuditEvent.RETENTION_PERIOD_SET, organisation_id=principal.organisation_id,
                          **principal.actor, gallery=access.gallery, registry_hash=registry.content_hash,
                          allowed=True, detail={"days": days, "erase_at": due.erase_at.isoformat(), "basis": due.basis,
                                                "reason": due.reason})
        return due

    def gallery_schedule(self, key: str) -> Schedule | None:
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, key)
            return gallery_schedule(row, load_policy(self.settings)) if row is not None else None

    # The sweep ------------------------------------------------------------------------------------------

    def run(self, now: datetime | None = None, *, dry_run: bool = False) -> RetentionReport:
        """Erase what is due at `now` (default: the clock). A dry run only reports."""
        now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
        registry = load_policy(self.settings)
        report = RetentionReport(at=now, dry_run=dry_run)
        facts = dict(organisation_id=SYSTEM_ORGANISATION, registry_hash=registry.content_hash, allowed=True)

        with session_scope(self.db_url) as s:
            galleries = [(g.name, g.owner, gallery_schedule(g, registry)) for g in s.scalars(select(Gallery)).all()]
        for key, owner, due in galleries:
            if not due.due(now):
                continue
            entry: dict[str, Any] = {"gallery": key, "owner": owner, "erase_at": due.erase_at.isoformat(), "basis": due.basis,
                     "reason": due.reason}
            if not dry_run:
                info = self.galleries._info(key)
                job = self.galleries.delete(SYSTEM_PRINCIPAL, key)
                entry.update(erase_job=job.id, images=info.images, faces=info.faces)
                self.audit.append(AuditEvent.RETENTION_GALLERY_ERASED, gallery=key, job_id=job.id, **facts,
                                  detail={**entry, "on_behalf_of": owner})
            report.galleries.append(entry)

        for job, folder, due in self._kept_uploads(registry):
            if not due.due(now):
                continue
            entry = {"job": job.id, "folder": folder, "erase_at": due.erase_at.isoformat(), "reason": due.reason}
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
                entry["removed"] = not Path(folder).exists()
                self.audit.append(AuditEvent.UPLOADS_REMOVED, job_id=job.id, gallery=job.gallery, purpose=job.purpose,
                                  **{**facts, "organisation_id": job.submitter},
                                  detail={"folder": folder, "why": "retention", "removed": entry["removed"],
                                          "erase_at": entry["erase_at"], "reason": due.reason})
            report.uploads.append(entry)

        invalid = set(AuthorisationService(self.settings, self.audit).lapsed_or_withdrawn(now))
        for job_id, due, authorisation in self._results(registry):
            if authorisation in invalid:
                # A lapsed (never confirmed) or withdrawn authorisation: its results go, whatever their date.
                entry = {"job": job_id, "authorisation": authorisation,
                         "reason": f"authorisation {authorisation} lapsed or was withdrawn"}
                if not dry_run:
                    entry["probe_faces"] = self.jobs.erase_results(job_id, entry["reason"])
                report.results.append(entry)
                continue
            if not due.due(now):
                continue
            entry = {"job": job_id, "erase_at": due.erase_at.isoformat(), "reason": due.reason}
            if not dry_run:
                entry["probe_faces"] = self.jobs.erase_results(job_id, f"retention: {due.reason}")
            report.results.append(entry)
        if not dry_run:
            self.audit.append(AuditEvent.RETENTION_RUN, **facts, detail={"at": now.isoformat(), "galleries": len(report.galleries),
                                                                "uploads": len(report.uploads),
                                                                "results": len(report.results)})
        return report

    def _kept_uploads(self, registry: Registry) -> list[tuple[Job, str, Schedule]]:
        """Finished jobs whose uploaded probes were kept (FACEGATE_UPLOAD_RETENTION_DAYS) and are still there."""
        kept = []
        with session_scope(self.db_url) as s:
            jobs = s.scalars(select(Job).where(Job.finished_at.is_not(None))).all()
            for job in jobs:
                folder = (job.params or {}).get("upload_folder")
                if not folder or not Path(folder).exists() or not JobState(job.state).finished or job.finished_at is None:
                    continue
                purpose = registry.purpose(job.purpose) if job.purpose else None
                due = schedule("uploads", job.finished_at, policy=registry.retention, purpose_id=job.purpose,
                               purpose_periods=purpose.retention if purpose else None,
                               owner_days=self.settings.upload_retention_days or None)
                kept.append((job, folder, due))
        return kept

    def _results(self, registry: Registry) -> list[tuple[str, Schedule, str | None]]:
        """Finished search jobs that still hold results, with their schedules."""
        with session_scope(self.db_url) as s:
            holding = set(s.scalars(select(ProbeResult.job_id).distinct()).all())
            jobs = s.scalars(select(Job).where(Job.id.in_(holding), Job.finished_at.is_not(None))).all()
            out = []
            for job in jobs:
                if job.finished_at is None:  # the query asks for finished jobs only
                    continue
                purpose = registry.purpose(job.purpose) if job.purpose else None
                out.append((job.id, schedule("results", job.finished_at, policy=registry.retention,
                                             purpose_id=job.purpose,
                                             purpose_periods=purpose.retention if purpose else None),
                            job.authorisation_id))
            return out
