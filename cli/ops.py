"""Operations commands: the HTTP API server, the nightly beat, reindexing and gallery registration."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from facegate.settings import get_settings

console = Console(stderr=True)
out = Console()
gallery_app = typer.Typer(no_args_is_help=True, help="Galleries: register a folder, list, show.")


def _key_option():  # noqa: ANN202
    from cli.app import KEY_OPTION

    return KEY_OPTION


def api(host: Optional[str] = typer.Option(None, help="Default: FACEGATE_API_HOST (127.0.0.1)."),
        port: Optional[int] = typer.Option(None, help="Default: FACEGATE_API_PORT (8000).")) -> None:
    """Serve the HTTP API (OpenAPI at /docs and /openapi.json). Starts the embedded broker if none is set."""
    import uvicorn

    from cli.app import job_service
    from scheduler.api import create_app

    settings = get_settings()
    with job_service(settings) as service:
        app = create_app(service.settings, service.queue)
        uvicorn.run(app, host=host or settings.api_host, port=port or settings.api_port, log_level="info")


def beat(loglevel: str = typer.Option("INFO")) -> None:
    """Run the nightly reindexing schedule (Celery beat) and the worker that executes it."""
    from cli.app import _fail
    from scheduler.tasks import SCHEDULER_QUEUE, make_scheduler_app

    settings = get_settings()
    if settings.embedded_broker:
        raise _fail("set FACEGATE_BROKER_URL: the nightly schedule needs a broker that outlives one command")
    schedule = settings.data_dir / "beat" / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    app = make_scheduler_app(settings)
    console.print(f"nightly reindexing at {settings.nightly_reindex_time} {settings.nightly_reindex_timezone}")
    app.worker_main(["worker", "-B", f"--schedule={schedule}", "-Q", SCHEDULER_QUEUE, "--pool=solo",
                     f"--loglevel={loglevel}", "-n", "facegate-beat@%h"])


def reindex(gallery: str, key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY"),
            purpose: Optional[str] = typer.Option(None, "--purpose", "-p",
                                                  help="Default: the purpose the gallery is indexed for."),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Reindex a registered gallery now: new and changed files indexed, deleted ones erased, model changes rebuilt."""
    from cli.app import EXIT_REFUSED, _exit_code, _fail, _print_job, _run_to_end, _submit, authenticate, job_service
    from scheduler.access import AccessRefused
    from scheduler.galleries import GalleryNotFound, GalleryService
    from scheduler.service import JobRefused
    from scheduler.tasks import worker_model_version

    settings = get_settings()
    principal = authenticate(settings, key)
    with job_service(settings) as service:
        galleries = GalleryService(service)
        try:
            galleries.show(principal, gallery)
            version = worker_model_version(service.queue.app)
            # Decided for the organisation of this key (never as the system submitter).
            job = _submit(service, galleries.reindex, gallery, principal=principal, purpose=purpose,
                          worker_model_version=version, as_json=as_json)
        except (GalleryNotFound, JobRefused) as exc:
            raise _fail(str(exc)) from None
        except AccessRefused as exc:
            raise _fail(str(exc), EXIT_REFUSED) from None
        view = _run_to_end(service, job, wait=True, as_json=as_json)
    _print_job(view, as_json=as_json)
    raise typer.Exit(_exit_code(view))


@gallery_app.command("register")
def gallery_register(name: str, folder: Path,
                     purpose: str = typer.Option(..., "--purpose", "-p", help="The purpose it is indexed for."),
                     nightly: bool = typer.Option(False, help="Reindex every night."),
                     key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY")) -> None:
    from cli.app import EXIT_REFUSED, _fail, authenticate
    from scheduler.access import AccessRefused
    from scheduler.galleries import GalleryExists, GalleryService
    from scheduler.service import JobRefused, JobService

    settings = get_settings()
    principal = authenticate(settings, key)
    try:
        info = GalleryService(JobService(settings)).register(principal, name, folder, purpose=purpose,
                                                             nightly=nightly)
    except (GalleryExists, JobRefused) as exc:
        raise _fail(str(exc)) from None
    except AccessRefused as exc:
        raise _fail(f"DENIED: {exc}", EXIT_REFUSED) from None
    out.print(f"registered gallery {info.name} -> {info.folder}" + (" (nightly)" if info.nightly else ""))


@gallery_app.command("list")
def gallery_list(key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    from cli.app import authenticate
    from scheduler.galleries import GalleryService
    from scheduler.service import JobService

    settings = get_settings()
    infos = GalleryService(JobService(settings)).list(authenticate(settings, key))
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


def _grant_call(key: Optional[str], call):  # noqa: ANN001, ANN202
    from cli.app import EXIT_REFUSED, _fail, authenticate
    from scheduler.access import AccessRefused, GalleryHidden
    from scheduler.galleries import GalleryService
    from scheduler.service import JobRefused, JobService

    settings = get_settings()
    principal = authenticate(settings, key)
    try:
        return call(GalleryService(JobService(settings)), principal)
    except (GalleryHidden, JobRefused) as exc:
        raise _fail(str(exc).strip("'\"")) from None
    except AccessRefused as exc:
        raise _fail(str(exc), EXIT_REFUSED) from None


@gallery_app.command("grant")
def gallery_grant(name: str, organisation: str,
                  key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY")) -> None:
    """Let another organisation search your gallery (never reindex, erase or grant it onward). Audited."""
    _grant_call(key, lambda g, who: g.grant(who, name, organisation))
    out.print(f"granted gallery {name} to {organisation} (search only; the policy still decides each search)")


@gallery_app.command("revoke")
def gallery_revoke(name: str, organisation: str,
                   key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY")) -> None:
    """Withdraw a grant. Audited."""
    had = _grant_call(key, lambda g, who: g.revoke(who, name, organisation))
    out.print(f"revoked the grant of {name} to {organisation}" if had else f"{name} was not granted to {organisation}")


@gallery_app.command("grants")
def gallery_grants(name: str, key: Optional[str] = typer.Option(None, "--key", envvar="FACEGATE_API_KEY"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """The organisations your gallery is granted to."""
    rows = _grant_call(key, lambda g, who: g.grants(who, name))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table(title=f"grants of {name}")
    for col in ("organisation", "granted by", "at"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["organisation_id"], r["granted_by"], str(r["at"]))
    out.print(table)
