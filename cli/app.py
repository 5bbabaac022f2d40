"""`facegate`: index galleries, search probes, follow jobs, run workers, try it all with `demo`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from cli import ops
from cli.admin import audit_app, key_app, org_app, policy_app, user_app
from cli.authorisations import authorisation_app
from cli.common import (
    EXIT_FAILED,
    EXIT_REFUSED,
    KEY_OPTION,
    SHORT_ID,
    PURPOSE_OPTION,
    USER_OPTION,
    authenticate,
    console,
    exit_code,
    fail,
    job_dict,
    print_chunks,
    job_service,
    out,
    print_job,
    print_matches,
    review_text,
    run_to_end,
    submit,
)
from cli.evaluate import evaluate_command, report_app
from cli.flower import flower_command
from facegate.settings import Settings, get_settings
from facegate.vocabulary import UNTRAINED_WARNING, JobKind, JobState

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(org_app, name="org")
app.add_typer(key_app, name="key")
app.add_typer(user_app, name="user")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
@app.command()
def index(
    directory: Path = typer.Argument(..., help="Gallery folder (inside the gallery roots)."),
    gallery: str = typer.Option(..., "--gallery", "-g", help="Gallery name."),
    purpose: str = PURPOSE_OPTION,
    key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
    quality_filter: Optional[str] = typer.Option(
        None, "--quality-filter", help="Enrol only faces at or above this filter of the registry's "
                                       "`quality_filters` (see `facegate policy show`), e.g. medium."),
    wait: bool = typer.Option(True, help="Wait for the job and show progress."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Index every face in a folder of photos into a gallery. A file `external_ids.csv` in the folder
    (header `path,external_id`, paths relative to the folder) gives its images your own ids, kept with them
    for every reindex and returned with every match."""
    settings = get_settings()
    principal = authenticate(settings, key, user)
    with job_service(settings) as service:
        job = submit(service, service.submit_index, directory, gallery, principal, purpose, as_json=as_json,
                     quality_filter=quality_filter)
        view = run_to_end(service, job, wait=wait or settings.embedded_broker, as_json=as_json)
    print_job(view, as_json=as_json)
    raise typer.Exit(exit_code(view))


@app.command()
def search(
    paths: list[Path] = typer.Argument(..., help="Probe image files or folders (inside the gallery roots)."),
    gallery: str = typer.Option(..., "--gallery", "-g"),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Matches per probe face."),
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t", help="Minimum cosine similarity."),
    aligned: bool = typer.Option(False, help="Probes are already aligned 160x160 face crops: skip detection."),
    purpose: str = PURPOSE_OPTION,
    authorisation: Optional[str] = typer.Option(
        None, "--authorisation", "-a", help="The id of the recorded legal authorisation this search stands on "
                                            "(`facegate authorisation record`); some purposes require one."),
    key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
    wait: bool = typer.Option(True),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Search a gallery with every face found in the probe images."""
    settings = get_settings()
    principal = authenticate(settings, key, user)
    with job_service(settings) as service:
        job = submit(service, service.submit_search, [str(p) for p in paths], gallery, principal, purpose,
                     top_k=top_k, threshold=threshold, aligned=aligned, as_json=as_json,
                     authorisation=authorisation)
        view = run_to_end(service, job, wait=wait or settings.embedded_broker, as_json=as_json)
        results = service.probe_results(view.id)
    if view.finished and view.kind == JobKind.SEARCH and not JobState(view.state).refused:
        print_matches(view, results, as_json=as_json)
    else:
        print_job(view, as_json=as_json)
    raise typer.Exit(exit_code(view))


@app.command()
def jobs(
    job_id: Optional[str] = typer.Argument(None, help="Show one job (with results for a search): its id or a "
                                                      "unique prefix of it; `resume ID` re-sends its lost chunks now."),
    resume_id: Optional[str] = typer.Argument(None, metavar="[ID]", help="With `resume`: the job to resume."),
    limit: int = typer.Option(20, help="How many recent jobs to list."),
    key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List your organisation's recent jobs, or show one: `facegate jobs ID`. Showing an open job also looks
    for chunks that nothing runs any more (a worker killed, a broker restarted) and re-sends them after a grace
    period; `facegate jobs resume ID` does so at once."""
    from scheduler.service import JobNotFound, JobRefused, JobService

    settings = get_settings()
    principal = authenticate(settings, key, user)
    resume = job_id == "resume"
    if resume:
        if not resume_id:
            raise fail("which job? facegate jobs resume ID")
        if settings.embedded_broker:
            raise fail("nothing to resume without FACEGATE_BROKER_URL: a job of the embedded mode lives and ends "
                       "with the command that started it; submit it again")
        job_id = resume_id
    elif resume_id:
        raise fail(f"unexpected argument {resume_id!r}: facegate jobs [ID] or facegate jobs resume ID")
    queue = None
    if not settings.embedded_broker:
        from facegate.queue import make_celery
        from scheduler.dispatch import CeleryTaskQueue

        queue = CeleryTaskQueue(make_celery(settings))
    service = JobService(settings, queue)
    if job_id:
        try:
            job_id = service.resolve_job_id(job_id, principal.organisation_id)
            if queue is not None and not service.get(job_id).finished:
                report = service.reconcile([job_id], resume=resume)
                if resume and not as_json:
                    console.print(f"[dim]{len(report.resent)} lost chunks re-sent, {len(report.failed)} failed; "
                                  f"{report.chunks} open chunks, live workers: {', '.join(report.workers) or 'none'}[/]")
            view = service.refresh(job_id)
        except (JobNotFound, JobRefused) as exc:
            raise fail(str(exc)) from None
        if view.kind == JobKind.SEARCH and view.finished:
            print_matches(view, service.probe_results(view.id), as_json=as_json)
        else:
            print_job(view, as_json=as_json)
            if not view.finished and not as_json:
                print_chunks(service.chunks(job_id))
        return
    views = service.list_jobs(limit, organisation_id=principal.organisation_id)
    if as_json:
        out.print_json(json.dumps([job_dict(v) for v in views]))
        return
    # At 80 columns: short ids (any unique prefix is taken wherever a job id is), no wrapping.
    table = Table(title=f"jobs of {principal.organisation_id}", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("id", "kind", "purpose", "gallery", "state", "items", "faces", "created"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for v in views:
        faces = str(v.faces) + (" [red]U[/]" if v.untrained else "")
        table.add_row(v.id[:SHORT_ID], v.kind, v.purpose or "-", v.gallery, v.state, f"{v.done_items}/{v.total_items}",
                      faces, v.created_at.strftime("%m-%d %H:%M"))
    out.print(table)
    if any(v.untrained for v in views):
        out.print("[red]U[/]: UNTRAINED model: never act on its matches")


@app.command()
def worker(
    pool: Optional[str] = typer.Option(None, help="threads (default), solo or prefork. Use threads or solo on GPUs."),
    concurrency: Optional[int] = typer.Option(None),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run a worker for the configured broker (one per GPU)."""
    settings = get_settings()
    if settings.embedded_broker:
        raise fail("set FACEGATE_BROKER_URL (e.g. redis://127.0.0.1:6379/0) to run a standalone worker")
    from workers.weights import WeightsError, resolve_model

    try:
        weights = resolve_model(settings)
    except WeightsError as exc:
        raise fail(str(exc)) from None
    from facegate.messages import model_queue

    # Every worker takes general work, and the searches of galleries embedded by its own model version.
    queues = f"facegate,{model_queue(weights.model_version)}"
    if pool:
        os.environ["FACEGATE_WORKER_POOL"] = pool
    if concurrency:
        os.environ["FACEGATE_WORKER_CONCURRENCY"] = str(concurrency)
    from facegate.settings import reset_settings_cache

    reset_settings_cache()
    from cli.embedded import stop_with_parent
    from workers.app import app as celery_app

    stop_with_parent()

    celery_app.worker_main(["worker", f"--loglevel={loglevel}", f"--pool={celery_app.conf.worker_pool}",
                            f"--concurrency={celery_app.conf.worker_concurrency}", "--without-gossip",
                            "--without-mingle", "-Q", queues, "-n", f"facegate@%h-{os.getpid()}"])


@app.command()
def review(
    job_id: str = typer.Argument(..., help="The job id, or a unique prefix of it (the id `jobs` shows)."),
    probe_id: int = typer.Argument(..., help="The probe face's id (the # column of the matches)."),
    face_id: str = typer.Argument(..., help="The matched gallery face id, or a unique prefix of it (the "
                                            "matches' face id column)."),
    confirm: bool = typer.Option(..., "--confirm/--reject", help="Confirm or reject the match."),
    user: Optional[str] = USER_OPTION,
    note: Optional[str] = typer.Option(None),
    key: Optional[str] = KEY_OPTION,
) -> None:
    """Confirm or reject a match, as a named user with the reviewer role (--user or FACEGATE_USER; the
    password from FACEGATE_USER_PASSWORD or a hidden prompt): the review is recorded with that user."""
    from facegate.settings import get_settings as settings_now
    from scheduler.access import AccessRefused, GalleryHidden
    from scheduler.service import JobNotFound, JobRefused, JobService

    settings = settings_now()
    principal = authenticate(settings, key, user)
    service = JobService(settings)
    try:
        job_id = service.resolve_job_id(job_id, principal.organisation_id)
        face_id = _resolve_face_id(service, job_id, probe_id, face_id)
        match = service.review_match(job_id, probe_id, face_id, confirmed=confirm, principal=principal, note=note)
    except (JobNotFound, JobRefused, GalleryHidden) as exc:
        raise fail(str(exc)) from None
    except AccessRefused as exc:
        raise fail(str(exc), EXIT_REFUSED) from None
    word = "confirmed" if confirm else "rejected"
    out.print(f"match {face_id} ({match['image_path']}, similarity {match['similarity']:.4f}) {word} by "
              f"{principal.user or principal.key_id}; the match is now {review_text(match)}", soft_wrap=True)


def _resolve_face_id(service, job_id: str, probe_id: int, ref: str) -> str:
    """A matched face id from a unique prefix of it among the probe face's matches (the table shows 8)."""
    from scheduler.service import JobNotFound, JobRefused

    probe = next((p for p in service.probe_results(job_id, 0, 1_000_000) if p["id"] == probe_id), None)
    if probe is None:
        raise JobNotFound(f"no probe face {probe_id} in job {job_id}")
    found = [m["face_id"] for m in probe["matches"] if m["face_id"].startswith(ref.strip().lower())]
    if len(set(found)) > 1:
        raise JobRefused(f"face id {ref} is ambiguous among the matches of probe face {probe_id}: give more of it")
    return found[0] if found else ref


DEMO_ORGANISATION = "photo-archive-example"
DEMO_POLICE = "city-police-example"


def _demo_key(settings: Settings, org_id: str) -> str:
    """A key for one of the registry's example organisations, created once and kept in the demo folder."""
    from scheduler.gate import load_policy
    from scheduler.keys import AuthenticationError, KeyStore

    store = KeyStore(settings.resolved_database_url)
    token_file = settings.data_dir / "demo" / f"{org_id}.key"
    if token_file.exists():
        try:
            store.authenticate(token_file.read_text().strip())
            return token_file.read_text().strip()
        except AuthenticationError:
            pass
    if org_id not in {o.id for o in store.list_organisations()}:
        listed = load_policy(settings).organisation(org_id)
        store.add_organisation(org_id, listed.name if listed else org_id, listed.sector if listed else "commercial")
    token = store.create_key(org_id, "facegate demo").secret_token
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token)
    token_file.chmod(0o600)
    return token


def choose_demo_model(settings: Settings, untrained: bool) -> tuple[Settings, str]:
    """The demo's model, and the sentence saying which and why. Only the demo falls back: every other
    command uses the model the settings name, or fails saying how to get its weights."""
    import socket

    from facegate.embedding_models import DLIB_RESNET_V1, FACENET_VGGFACE2, UNTRAINED, configured_family
    from workers.weights import WeightsError, resolve_model

    if untrained:
        return (settings.model_copy(update={"model": UNTRAINED}),
                "model: untrained (asked for with --untrained), a seeded random network: its matches mean "
                "nothing about identity")
    family = configured_family(settings)
    if "model" in settings.model_fields_set or family != FACENET_VGGFACE2:
        return settings, f"model: {family} (the setting FACEGATE_MODEL, or FACEGATE_WEIGHTS, says so)"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable download host must not hang the demo
    try:
        weights = resolve_model(settings)
        return settings, f"model: {FACENET_VGGFACE2} (VGGFace2 weights {weights.path}, version {weights.model_version})"
    except WeightsError as exc:
        reason = str(exc).split(". ")[0]
    finally:
        socket.setdefaulttimeout(previous)
    return (settings.model_copy(update={"model": DLIB_RESNET_V1}),
            f"model: {DLIB_RESNET_V1} (dlib's public-domain ResNet, installed with FaceGate), because the VGGFace2 "
            f"weights cannot be had here: {reason}")


@app.command()
def demo(
    directory: Optional[Path] = typer.Argument(None, help="A folder of photos; default: photos of several people "
                                                          "(../shared/fixtures beside a checkout), else matplotlib's sample photo."),
    untrained: bool = typer.Option(False, "--untrained", help="Use a random network (no weights needed, offline)."),
) -> None:
    """Index photos, search them with probes, print the matches, then show a police search refused.

    The model: VGGFace2 where its weights are present or downloadable, else dlib's ResNet (installed with
    FaceGate); FACEGATE_MODEL chooses one explicitly. With a real model and two photos of one person, the
    demo shows that person found in a *different* photo while other people stay below the floor. It runs
    as the registry's example photo archive (purpose: photo-library).
    """
    from cli.demo import fixture_identities, prepare_demo, prepare_people_demo
    from scheduler.keys import KeyStore

    settings, which = choose_demo_model(get_settings(), untrained)
    out.print(which, soft_wrap=True)
    people = fixture_identities() if directory is None and not untrained else None
    if people is not None:
        gallery_dir, probe_dir = prepare_people_demo(settings.data_dir / "demo", people)
    else:
        gallery_dir, probe_dir = prepare_demo(settings.data_dir / "demo", directory)
    # The demo's own folders (and the one the user named) are its gallery roots for this run.
    roots = [gallery_dir.parent, probe_dir.parent] + ([directory.resolve()] if directory else [])
    settings = settings.model_copy(update={"gallery_roots": roots})
    keys = KeyStore(settings.resolved_database_url)
    archive = keys.authenticate(_demo_key(settings, DEMO_ORGANISATION))
    police = keys.authenticate(_demo_key(settings, DEMO_POLICE))
    console.print(f"[bold]demo[/]: gallery {gallery_dir}, probes {probe_dir}; submitting as {archive.organisation_id}")
    gallery = f"demo_{gallery_dir.name}"
    with job_service(settings) as service:
        job = submit(service, service.submit_index, gallery_dir, gallery, archive, "photo-library")
        indexed = run_to_end(service, job, wait=True, as_json=False)
        print_job(indexed, as_json=False)
        job = submit(service, service.submit_search, [str(probe_dir)], gallery, archive, "photo-library", top_k=3)
        view = run_to_end(service, job, wait=True, as_json=False)
        results = service.probe_results(view.id)
        print_matches(view, results, as_json=False)
        floor = service.gate.floor_for("photo-library", indexed.model_version)
        threshold = view.params.get("threshold")
        if threshold is not None and floor is not None:
            out.print(f"\nsearch threshold {threshold:g} (the floor of purpose photo-library for model "
                      f"{indexed.model_version} is {floor:g}); gallery: {indexed.faces} faces")
        for probe in results:
            best = probe["matches"][0] if probe["matches"] else None
            out.print(f"probe {Path(probe['path']).name}: " + (f"best match {Path(best['image_path']).name} "
                      f"(similarity {best['similarity']:.4f}); " + (
                          f"{len(probe['matches']) - 1} more above the threshold" if len(probe["matches"]) > 1
                          else "everyone else in the gallery is below the threshold")
                      if best else "nobody in the gallery reaches the threshold"))

        console.print(f"\n[bold]And the moratorium:[/] {police.organisation_id} asks to index a gallery for a criminal investigation")
        from scheduler.service import JobDenied

        try:
            service.submit_index(gallery_dir, "demo_police", police, "criminal-investigation")
        except JobDenied as denied:
            out.print(f"[bold red]DENIED[/], nothing queued: {denied.view.decision_reason}")
    if view.untrained:
        console.print(f"[bold red]{UNTRAINED_WARNING}: the matches above only show the plumbing works.[/]")


app.command("api")(ops.api)
app.command("beat")(ops.beat)
app.command("reindex")(ops.reindex)
app.command("flower")(flower_command)
app.command("evaluate")(evaluate_command)
app.add_typer(report_app, name="report")
app.add_typer(ops.gallery_app, name="gallery")
app.add_typer(authorisation_app, name="authorisation")
app.add_typer(ops.retention_app, name="retention")


def main() -> None:
    from facegate.db import DatabaseUnavailable

    try:
        app()
    except DatabaseUnavailable as exc:
        # A sentence, not a traceback: what is wrong with which database (locked, disk full, out of reach).
        fail(f"{exc}; try again once it is fixed")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
