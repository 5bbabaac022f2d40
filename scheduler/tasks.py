"""The scheduler's own Celery side: the nightly reindexing that Celery beat triggers."""

from __future__ import annotations

import logging

from celery import Celery
from celery.schedules import crontab

from facegate.messages import MODEL_INFO_TASK, NIGHTLY_REINDEX_TASK, RECONCILE_TASK, RETENTION_TASK
from facegate.queue import make_celery
from facegate.settings import Settings, get_settings
from scheduler.dispatch import CeleryTaskQueue

SCHEDULER_QUEUE = "facegate.scheduler"
log = logging.getLogger(__name__)


def worker_model_version(app: Celery, timeout_s: float = 120) -> str | None:
    """Ask a worker which model it embeds with (the scheduler holds no weights)."""
    try:
        return app.send_task(MODEL_INFO_TASK, queue="facegate").get(timeout=timeout_s)["model_version"]
    except Exception as exc:  # noqa: BLE001 -- no worker answered (timeout, broker, worker error): reindex
        # incrementally and decide on a rebuild next time
        log.warning("no worker reported its model version (%s); no rebuild this time", exc)
        return None


def run_nightly_reindex(settings: Settings, app: Celery) -> dict:
    """Reindex every registered nightly gallery as the system submitter, through the gate and the audit log."""
    from scheduler.access import AccessRefused, GalleryHidden
    from scheduler.galleries import SYSTEM_PRINCIPAL, GalleryService
    from scheduler.service import JobDenied, JobRefused, JobService

    service = GalleryService(JobService(settings, CeleryTaskQueue(app)))
    version = worker_model_version(app)
    summary: dict[str, dict] = {}
    for name in service.nightly_galleries():
        try:
            # As the system submitter, on behalf of the owner: refused (and audited) while the owner may not index.
            job = service.reindex(name, principal=SYSTEM_PRINCIPAL, worker_model_version=version)
            summary[name] = {"job": job.id, "state": job.state, **{k: job.params.get(k) for k in
                                                                  ("new", "changed", "deleted", "erased", "rebuild_generation")}}
        except JobDenied as exc:
            summary[name] = {"error": str(exc), "job": exc.view.id, "state": exc.view.state}
        except (JobRefused, AccessRefused, GalleryHidden) as exc:
            summary[name] = {"error": str(exc)}
    return summary


def run_retention(settings: Settings, app: Celery) -> dict:
    """The nightly retention sweep: erase what has expired (policy/retention.py), audited."""
    from scheduler.galleries import GalleryService
    from scheduler.retention import RetentionService
    from scheduler.service import JobService

    report = RetentionService(GalleryService(JobService(settings, CeleryTaskQueue(app)))).run()
    return {"galleries": len(report.galleries), "uploads": len(report.uploads), "results": len(report.results)}


def run_reconcile(settings: Settings, app: Celery) -> dict:
    """Every open job's chunks placed; the lost ones re-sent or failed (scheduler/reconcile.py)."""
    from scheduler.service import JobService

    report = JobService(settings, CeleryTaskQueue(app)).reconcile()
    if report.resent or report.failed:
        log.warning("reconciled %d open jobs: re-sent %s, failed %s", report.jobs, report.resent, report.failed)
    return {"jobs": report.jobs, "chunks": report.chunks, "resent": len(report.resent), "failed": len(report.failed),
            "workers": report.workers}


def make_scheduler_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    hour, minute = (int(part) for part in settings.nightly_reindex_time.split(":"))
    app.conf.timezone = settings.nightly_reindex_timezone
    app.conf.beat_schedule = {
        "nightly-reindex": {"task": NIGHTLY_REINDEX_TASK, "schedule": crontab(hour=hour, minute=minute),
                            "options": {"queue": SCHEDULER_QUEUE}},
        # Retention runs every night too, just before the reindexing: nothing is kept past its schedule.
        "nightly-retention": {"task": RETENTION_TASK,
                              "schedule": crontab(hour=(hour - 1) % 24 if minute < 30 else hour,
                                                  minute=(minute + 30) % 60),
                              "options": {"queue": SCHEDULER_QUEUE}},
        # No job stays open with nothing running it: lost chunks are found and re-sent within a minute or two.
        "reconcile-jobs": {"task": RECONCILE_TASK, "schedule": float(settings.reconcile_interval_s),
                           "options": {"queue": SCHEDULER_QUEUE, "expires": float(settings.reconcile_interval_s)}},
    }

    @app.task(name=RETENTION_TASK)
    def retention_sweep() -> dict:
        return run_retention(settings, app)

    @app.task(name=RECONCILE_TASK, ignore_result=True)
    def reconcile_jobs() -> dict:
        return run_reconcile(settings, app)

    @app.task(name=NIGHTLY_REINDEX_TASK)
    def nightly_reindex() -> dict:
        return run_nightly_reindex(settings, app)

    return app


def beat_app() -> Celery:
    """For `celery -A scheduler.tasks:beat_app beat|worker` and `facegate beat`."""
    return make_scheduler_app(get_settings())
