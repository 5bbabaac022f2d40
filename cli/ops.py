"""Operations commands: the HTTP API server, the nightly beat, reindexing and gallery registration."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (
    EXIT_REFUSED,
    KEY_OPTION,
    USER_OPTION,
    authenticate,
    console,
    exit_code,
    fail,
    job_service,
    out,
    print_job,
    run_to_end,
    submit,
)
from facegate.settings import get_settings
gallery_app = typer.Typer(no_args_is_help=True, help="Galleries: register a folder, list, show.")


def api(host: Optional[str] = typer.Option(None, help="Default: FACEGATE_API_HOST (127.0.0.1)."),
        port: Optional[int] = typer.Option(None, help="Default: FACEGATE_API_PORT (8000).")) -> None:
    """Serve the HTTP API (OpenAPI at /docs and /openapi.json). Starts the embedded broker if none is set."""
    import uvicorn
    from scheduler.api import create_app

    settings = get_settings()
    with job_service(settings) as service:
        app = create_app(service.settings, service.queue)
        uvicorn.run(app, host=host or settings.api_host, port=port or settings.api_port, log_level="info")


def beat(loglevel: str = typer.Option("INFO")) -> None:
    """Run the nightly reindexing schedule and the job reconciler (Celery beat), and the worker that executes them."""
    from scheduler.tasks import SCHEDULER_QUEUE, make_scheduler_app

    settings = get_settings()
    if settings.embedded_broker:
        raise fail("set FACEGATE_BROKER_URL: the nightly schedule needs a broker that outlives one command")
    schedule = settings.data_dir / "beat" / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app = make_scheduler_app(settings)
    console.print(f"nightly reindexing at {settings.nightly_reindex_time} {settings.nightly_reindex_timezone}; "
                  f"open jobs reconciled every {settings.reconcile_interval_s} s")
    app.worker_main(["worker", "-B", f"--schedule={schedule}", "-Q", SCHEDULER_QUEUE, "--pool=solo",
                     f"--loglevel={loglevel}", "-n", "facegate-beat@%h"])


def reindex(gallery: str, key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
            purpose: Optional[str] = typer.Option(None, "--purpose", "-p",
                                                  help="Default: the purpose the gallery is indexed for."),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Reindex a registered gallery now: new and changed files indexed, deleted ones erased, model changes rebuilt."""
    from scheduler.access import AccessRefused
    from scheduler.galleries import GalleryNotFound, GalleryService
    from scheduler.service import JobRefused
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.tasks import worker_model_version

    settings = get_settings()
    principal = authenticate(settings, key, user)
    with job_service(settings) as service:
        galleries = GalleryService(service)
        try:
            galleries.show(principal, gallery)
            # job_service always sends through Celery; no queue, like no worker answering, means no rebuild now.
            version = worker_model_version(service.queue.app) if isinstance(service.queue, CeleryTaskQueue) else None
            # Decided for the organisation of this key (never as the system submitter).
            job = submit(service, galleries.reindex, gallery, principal=principal, purpose=purpose,
                          worker_model_version=version, as_json=as_json)
        except (GalleryNotFound, JobRefused) as exc:
            raise fail(str(exc)) from None
        except AccessRefused as exc:
            raise fail(str(exc), EXIT_REFUSED) from None
        view = run_to_end(service, job, wait=True, as_json=as_json)
    print_job(view, as_json=as_json)
    raise typer.Exit(exit_code(view))


@gallery_app.command("register")
def gallery_register(name: str, folder: Path,
                     purpose: str = typer.Option(..., "--purpose", "-p", help="The purpose it is indexed for."),
                     nightly: bool = typer.Option(False, help="Reindex every night."),
                     key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION) -> None:
    from scheduler.access import AccessRefused
    from scheduler.galleries import GalleryExists, GalleryService
    from scheduler.service import JobRefused, JobService

    settings = get_settings()
    principal = authenticate(settings, key, user)
    try:
        info = GalleryService(JobService(settings)).register(principal, name, folder, purpose=purpose,
                                                             nightly=nightly)
    except (GalleryExists, JobRefused) as exc:
        raise fail(str(exc)) from None
    except AccessRefused as exc:
        raise fail(f"DENIED: {exc}", EXIT_REFUSED) from None
    out.print(f"registered gallery {info.name} -> {info.folder}" + (" (nightly)" if info.nightly else ""))


@gallery_app.command("erase")
def gallery_erase(name: str,
                  paths: Optional[list[str]] = typer.Argument(None, help="Images to erase."),
                  under: Optional[str] = typer.Option(None, "--under", help="Erase every image under this folder."),
                  whole: bool = typer.Option(False, "--all", help="Erase every vector of the gallery."),
                  key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Erase images of your gallery (never held back by a moratorium; audited). Erased images stay out of every
    index and reindex job until you re-enrol them (`facegate gallery enrol`)."""
    from scheduler.galleries import GalleryService

    if sum([bool(paths), under is not None, whole]) != 1:
        raise fail("name what to erase: image paths, --under FOLDER, or --all")
    settings = get_settings()
    principal = authenticate(settings, key, user)
    with job_service(settings) as service:
        job = submit(service, GalleryService(service).erase, principal, name, paths=paths or None, under=under,
                     as_json=as_json)
        view = run_to_end(service, job, wait=True, as_json=as_json)
    print_job(view, as_json=as_json)
    raise typer.Exit(exit_code(view))


@gallery_app.command("enrol")
def gallery_enrol(name: str,
                  paths: list[str] = typer.Argument(..., help="Erased images: the paths they were erased at, a "
                                                   "folder holding them, or files of the same content."),
                  key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Re-enrol erased images of your gallery (the owner's decision, audited): the next index or reindex
    indexes them again."""
    removed = _grant_call(key, user, lambda g, who: g.enrol(who, name, paths))
    if as_json:
        out.print_json(json.dumps(removed, default=str))
        return
    out.print(f"re-enrolled {len(removed)} erased image(s) of gallery {name}: the next index or reindex "
              f"(`facegate reindex {name}`) indexes them again")
    for mark in removed:
        out.print(f"  {mark['path']} (erased {mark['erased_at']:%Y-%m-%d} by {mark['erased_by']})")


@gallery_app.command("list")
def gallery_list(key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
                 as_json: bool = typer.Option(False, "--json")) -> None:
    from scheduler.galleries import GalleryService
    from scheduler.service import JobService

    settings = get_settings()
    infos = GalleryService(JobService(settings)).list(authenticate(settings, key, user))
    if as_json:
        out.print_json(json.dumps([asdict(i) for i in infos], default=str))
        return
    table = Table(title="galleries")
    for col in ("name", "owner", "images", "faces", "model", "nightly", "last reindex"):
        table.add_column(col, overflow="fold")
    for i in infos:
        table.add_row(i.name, i.owner, str(i.images), str(i.faces), i.model_version or "-", str(i.nightly),
                      str(i.last_reindex_at or "-"))
    out.print(table)


def _grant_call(key: Optional[str], user: Optional[str], call):
    from scheduler.access import AccessRefused, GalleryHidden
    from scheduler.galleries import GalleryService
    from scheduler.service import JobRefused, JobService

    settings = get_settings()
    principal = authenticate(settings, key, user)
    try:
        return call(GalleryService(JobService(settings)), principal)
    except (GalleryHidden, JobRefused) as exc:
        raise fail(str(exc).strip("'\"")) from None
    except AccessRefused as exc:
        raise fail(str(exc), EXIT_REFUSED) from None


@gallery_app.command("grant")
def gallery_grant(name: str, organisation: str,
                  key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION) -> None:
    """Let another organisation search your gallery (never reindex, erase or grant it onward). Audited."""
    _grant_call(key, user, lambda g, who: g.grant(who, name, organisation))
    out.print(f"granted gallery {name} to {organisation} (search only; the policy still decides each search)")


@gallery_app.command("revoke")
def gallery_revoke(name: str, organisation: str,
                   key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION) -> None:
    """Withdraw a grant. Audited."""
    had = _grant_call(key, user, lambda g, who: g.revoke(who, name, organisation))
    out.print(f"revoked the grant of {name} to {organisation}" if had else f"{name} was not granted to {organisation}")


@gallery_app.command("grants")
def gallery_grants(name: str, key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """The organisations your gallery is granted to."""
    rows = _grant_call(key, user, lambda g, who: g.grants(who, name))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"grants of {name}")
    for col in ("organisation", "granted by", "at"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["organisation_id"], r["granted_by"], str(r["at"]))
    out.print(table)


@gallery_app.command("show")
def gallery_show(name: str, key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """One gallery: owner, counts, model, quality filter, grants, and its retention schedule."""
    info = _grant_call(key, user, lambda g, who: g.show(who, name))
    if as_json:
        out.print_json(json.dumps(asdict(info), default=str))
        return
    out.print(f"[bold]gallery {info.name}[/] (owner {info.owner}): {info.images} images, {info.faces} faces, "
              f"{info.failed_images} failed; model {info.model_version or '-'}, generation {info.generation}"
              + (" (rebuilding)" if info.rebuilding else ""))
    out.print(f"  folder {info.folder or '-'}; nightly {info.nightly}; quality filter {info.quality_filter or 'none'}; "
              f"granted to {', '.join(info.granted_to) or 'nobody'}; {info.erased_images} erased image(s) kept out")
    out.print(f"  [bold]index[/]: {_index_line(info.index)}")
    retention = info.retention or {}
    out.print(f"  [bold]retention[/]: erased at {retention.get('erase_at')} ({retention.get('days')} days, "
              f"{retention.get('basis')}); {retention.get('reason')}")


def _index_line(index: dict | None) -> str:
    if index is None:
        return "none yet (nothing indexed)"
    if "error" in index:
        return f"unknown: {index['error']}"
    params = ", ".join(f"{k} {v}" for k, v in {**index.get("build_params", {}), **index.get("search_params", {})}.items())
    return f"{index['type']}{f' ({params})' if params else ' (exact)'}, metric {index.get('metric') or '-'}, {index['engine']}"


@gallery_app.command("retention")
def gallery_retention(name: str,
                      days: Optional[int] = typer.Option(None, "--days", help="Keep it this many days after its "
                                                         "last indexing (never past the legal maximum)."),
                      clear: bool = typer.Option(False, "--clear", help="Back to the registry's schedule."),
                      key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION) -> None:
    """Set your gallery's retention period (the owner's); the nightly sweep erases it when it is due."""
    from scheduler.retention import RetentionService

    if (days is None) == (not clear):
        raise fail("give --days N or --clear")
    due = _grant_call(key, user, lambda g, who: RetentionService(g).set_gallery_period(who, name, None if clear else days))
    out.print(f"gallery {name}: {due.reason}")


retention_app = typer.Typer(no_args_is_help=True, help="The retention schedule: erase what has expired.")


@retention_app.command("run")
def retention_run(dry_run: bool = typer.Option(False, "--dry-run", help="Only say what is due; erase nothing."),
                  at: Optional[str] = typer.Option(None, "--at", help="With --dry-run: what would be due at this "
                                                   "ISO date or time (a real run always uses now)."),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Erase every gallery, kept upload and job result whose retention has expired (audited), as the nightly
    task does. Galleries are erased through erasure jobs: a worker must be running for their vectors."""
    from datetime import datetime, timezone

    from scheduler.galleries import GalleryService
    from scheduler.retention import RetentionService

    if at is not None and not dry_run:
        raise fail("--at only goes with --dry-run: nothing is erased before its date")
    instant = None
    if at is not None:
        try:
            instant = datetime.fromisoformat(at if len(at) > 10 else at + "T00:00:00")
        except ValueError:
            raise fail(f"--at {at!r} is not an ISO date or time") from None
        instant = instant if instant.tzinfo else instant.replace(tzinfo=timezone.utc)
    from scheduler.service import JobService

    settings = get_settings()
    if dry_run:  # reads only: no broker, no worker
        report = RetentionService(GalleryService(JobService(settings))).run(instant, dry_run=True)
    else:
        with job_service(settings) as service:
            report = RetentionService(GalleryService(service)).run(instant, dry_run=False)
            for entry in report.galleries:
                service.wait(entry["erase_job"], timeout_s=600)
    if as_json:
        out.print_json(json.dumps(report.as_dict(), default=str))
        return
    verb = "due" if dry_run else "erased"
    out.print(f"retention at {report.at.isoformat()}: {len(report.galleries)} galleries, {len(report.uploads)} "
              f"upload folders, {len(report.results)} job results {verb}")
    for entry in report.galleries:
        out.print(f"  gallery {entry['gallery']} (owner {entry['owner']}): {entry['reason']}")
    for entry in report.uploads:
        out.print(f"  uploads of job {entry['job']}: {entry['reason']}")
    for entry in report.results:
        out.print(f"  results of job {entry['job']}: {entry['reason']}")
