"""What the CLI's commands share: the consoles, the key and purpose options, exit codes, failing with a
message, authenticating a key, the job service, and printing a job (with the one untrained warning).

Every command module imports this; nothing here imports a command module, so the CLI has no cycle.
"""

from __future__ import annotations

import json
import sys
from pathlib import PurePath
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import typer
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from facegate.settings import Settings
from facegate.vocabulary import UNTRAINED_WARNING, JobState

if TYPE_CHECKING:
    from scheduler.keys import Principal
    from scheduler.service import JobService

console = Console(stderr=True)
out = Console()

# The environment variables are read by authenticate(), not by the options, so that it knows what was typed:
# see its precedence.
KEY_OPTION = typer.Option(None, "--key", help="API key (fg_...): who is asking (default: FACEGATE_API_KEY). "
                                              "Create one with `facegate key create ORG`.")
PURPOSE_OPTION = typer.Option(..., "--purpose", "-p", help="Why: a purpose from the policy registry "
                                                           "(`facegate policy show`).")
# Exit codes every command uses: 0 done, 1 the work failed, 2 bad input or usage, 3 refused (policy,
# access or key); `search` also 4: no face was found in any probe (nothing was searched: not "no match").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_NO_FACE = 4


# Every command that acts for an organisation takes both, as `key` and `user` (authenticate() decides).
USER_OPTION = typer.Option(None, "--user", help="Act as this named user, within its roles, instead of an API key "
                                                "(default: FACEGATE_USER; the password from FACEGATE_USER_PASSWORD "
                                                "or a hidden prompt).")
PASSWORD_ENV = "FACEGATE_USER_PASSWORD"


def read_password(from_stdin: bool = False, *, confirm: bool = True, prompt: str = "Password") -> str:
    """The password from stdin, the environment, or a hidden prompt (with confirmation); never echoed."""
    import os

    import click

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    try:
        return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    except (click.exceptions.Abort, EOFError):
        raise fail(f"no password given: type it at the prompt, or use --password-stdin or {PASSWORD_ENV}") from None


def authenticate(settings: Settings, key: str | None, user: str | None = None) -> Principal:
    """Who is asking: a named user (with its password) or an API key. What was typed wins over the environment,
    and at each level a person over a key: --user, else --key, else FACEGATE_USER, else FACEGATE_API_KEY. A
    person means to act as themself, and a key left in the environment must not take their act over; a key
    typed for one command is not overridden by a user set for the whole shell."""
    import os

    from scheduler.keys import AuthenticationError, KeyStore

    if not user and not key:
        user = os.environ.get("FACEGATE_USER") or None
        key = None if user else os.environ.get("FACEGATE_API_KEY") or None
    if user:
        from facegate.audit import AuditLog
        from scheduler.users import UserStore

        url = settings.resolved_database_url
        try:
            return UserStore(url, AuditLog(url)).authenticate(user, read_password(confirm=False), via="cli")
        except AuthenticationError as exc:
            raise fail(f"sign-in refused: {exc}", EXIT_REFUSED) from None
    if not key:
        raise fail("an API key is required (--key or FACEGATE_API_KEY), or a user (--user or FACEGATE_USER): jobs "
                   "are submitted by an organisation, never anonymously. An administrator creates one with "
                   "`facegate key create ORG` or `facegate user add ORG NAME`.")
    try:
        return KeyStore(settings.resolved_database_url).authenticate(key)
    except AuthenticationError as exc:
        raise fail(f"API key refused: {exc}", EXIT_REFUSED) from None


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


@contextmanager
def job_service(settings: Settings) -> Iterator[JobService]:
    """A JobService on the configured broker, or on an embedded Redis and worker started for this command."""
    from cli.embedded import EmbeddedStack, EmbeddedStartError
    from facegate.queue import make_celery
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.service import JobService
    from workers.weights import WeightsError, resolve_model

    stack = None
    if settings.embedded_broker:
        try:
            # Fail here, with the fix in the message, rather than in a worker's log.
            resolve_model(settings)
        except WeightsError as exc:
            raise fail(str(exc)) from None
        console.print(f"[dim]no FACEGATE_BROKER_URL: starting an embedded Redis and worker "
                      f"(data in {settings.data_dir})…[/]")
        stack = EmbeddedStack(settings, notice=lambda line: console.print(f"[yellow]{line}[/]"))
        try:
            settings = stack.start()
        except EmbeddedStartError as exc:
            stack.stop()
            raise fail(str(exc)) from None
    celery_app = make_celery(settings)
    try:
        yield JobService(settings, CeleryTaskQueue(celery_app))
    finally:
        celery_app.close()
        if stack is not None:
            stack.stop()


def untrained_banner(model_version: str | None) -> None:
    console.print(Panel.fit(
        f"[bold]{UNTRAINED_WARNING}[/] (model version {model_version}).\n"
        "These embeddings come from a random network: only the same image (or a light edit of it) is\n"
        "reliably closest. Never act on these matches.",
        border_style="bold red", title="warning"))


def run_to_end(service, job, *, wait: bool, as_json: bool):
    from scheduler.service import JobView

    if not wait:
        return job
    embedded = service.settings.broker_url and service.settings.broker_url.startswith("redis+socket://")
    try:
        if as_json or not sys.stderr.isatty():
            return service.wait(job.id)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("images"), TimeElapsedColumn(), console=console, transient=False) as bar:
            task = bar.add_task(f"{job.kind} {job.id[:8]}", total=job.total_items)

            def update(view: JobView) -> None:
                bar.update(task, completed=view.done_items, description=f"{view.kind} {view.id[:8]} {view.state}")

            return service.wait(job.id, on_update=update)
    except KeyboardInterrupt:
        if embedded:
            service.mark_interrupted(job.id, "interrupted: the embedded worker stopped before the job finished")
        raise


def job_dict(view) -> dict:
    data = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(view).items()}
    if view.untrained:
        data["warning"] = UNTRAINED_WARNING
    return data


def print_job(view, *, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(job_dict(view)))
        return
    if view.untrained:
        untrained_banner(view.model_version)
    colour = {JobState.DONE: "green", JobState.PARTLY_FAILED: "yellow"}.get(view.state, "red" if view.finished else "cyan")
    table = Table(show_header=False, box=None)
    for key, value in [("job", view.id), ("kind", view.kind), ("gallery", view.gallery),
                       ("state", f"[{colour}]{view.state}[/]"),
                       ("progress", f"{view.done_items}/{view.total_items} images, {view.failed_items} failed"),
                       ("faces", view.faces), ("model", view.model_version or "-"),
                       ("submitter", f"{view.submitter} (key {view.api_key_id})"), ("purpose", view.purpose or "-"),
                       ("policy", f"{view.decision_reason} [{', '.join(view.decision_rule_ids)}]"),
                       ("created", view.created_at), ("finished", view.finished_at or "-")]:
        table.add_row(f"[bold]{key}[/]", str(value))
    if view.error:
        table.add_row("[bold]error[/]", f"[red]{view.error}[/]")
    for note in view.notes:
        table.add_row("[bold]recovered[/]", f"[yellow]{note}[/]")
    out.print(table)
    if view.errors:
        errors = Table(title="failed items", show_lines=False)
        errors.add_column("image", overflow="fold")
        errors.add_column("reason", style="red", overflow="fold")
        for item in view.errors[:50]:
            errors.add_row(short_name(item["path"]), item["reason"] or "")
        out.print(errors)
        if len(view.errors) > 50:
            out.print(f"… and {len(view.errors) - 50} more (use --json for all)")
    not_indexed = getattr(view, "not_indexed", None) or []
    if not_indexed:
        left_out = Table(title="not indexed (erased; not failures)", show_lines=False)
        left_out.add_column("path", overflow="fold")
        left_out.add_column("reason", overflow="fold")
        for item in not_indexed[:50]:
            left_out.add_row(item["path"], item["reason"] or "")
        out.print(left_out)
        if len(not_indexed) > 50:
            out.print(f"… and {len(not_indexed) - 50} more (use --json for all)")


def print_chunks(chunks: list[dict]) -> None:
    """Where each chunk of an open job is: queued, running on which worker since when, or lost."""
    table = Table(title="chunks")
    for col in ("chunk", "state", "images", "worker", "since", "sends"):
        table.add_column(col, overflow="fold")
    for c in chunks:
        since = c["running_since"] if c["state"] == "running" else c["unplaced_since"] or c["sent_at"]
        table.add_row(str(c["chunk"]), c["state"], str(c["images"]), c["worker"] or "-",
                      since.strftime("%H:%M:%S") if since else "-", str(c["sends"]))
    out.print(table)


def short_name(path: str) -> str:
    """A file's name without its folders: what a table at 80 columns shows (--json has the whole path)."""
    return PurePath(path).name or path


SHORT_ID = 8  # job and face ids in tables: the first characters, which commands accept as a unique prefix


def review_text(match: dict, *, short: bool = False) -> str:
    """A match's review state in a few words: `unconfirmed (1/2)`, `confirmed (2/2)`, `rejected`; `short`
    (the table's 12 columns): `unconf. 1/2`, `confirmed`."""
    state = match.get("review", "-")
    needed = match.get("reviewers_required") or 0
    if short:
        return f"unconf. {match.get('confirmations', 0)}/{needed}" if state == "unconfirmed" and needed else state
    if state in ("confirmed", "unconfirmed") and needed:
        return f"{state} ({match.get('confirmations', 0)}/{needed})"
    return state


def print_matches(view, results: list[dict], *, as_json: bool) -> None:
    """One match per line, readable at 80 columns: file names (whole paths in --json), the probe face's
    #id and the match's short face id, the two things `facegate review` takes."""
    if as_json:
        out.print_json(json.dumps({"job": job_dict(view), "results": results}))
        return
    print_job(view, as_json=False)
    table = Table(title=f"matches in gallery {view.gallery!r}" + (" (UNTRAINED)" if view.untrained else ""),
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0))
    # Fixed columns keep their width; the two file names share what is left, cut with an ellipsis.
    fixed = {"#": 3, "rank": 4, "sim": 5, "FMR": 6, "face id": SHORT_ID, "review": 12}
    flex = max(8, (out.width - sum(fixed.values()) - (len(fixed) + 1) - 1) // 2)  # one space between columns
    for col in ("probe", "#", "rank", "sim", "FMR", "gallery image", "face id", "review"):
        width = fixed.get(col, flex)
        table.add_column(col, no_wrap=True, overflow="ellipsis", min_width=width if col in fixed else None,
                         max_width=width, justify="right" if col in ("#", "rank", "sim", "FMR") else "left")
    for probe in results:
        name, number = short_name(probe["path"]), f"{probe['id']}"
        if probe.get("not_searched"):
            table.add_row(name, number, "-", "-", "-", f"[yellow]not searched: {probe['not_searched']}[/]", "", "")
            continue
        if not probe["matches"]:
            table.add_row(name, number, "-", "-", "-", "[dim]no match above threshold[/]", "", "")
        for rank, m in enumerate(probe["matches"], start=1):
            table.add_row(name if rank == 1 else "", number if rank == 1 else "", str(rank), f"{m['similarity']:.3f}",
                          _fmr_text(m), short_name(m["image_path"]), m["face_id"][:SHORT_ID], review_text(m, short=True))
    for item in getattr(view, "no_face", None) or []:
        table.add_row(short_name(item["path"]), "-", "-", "-", "-", f"[yellow]{item['reason']}[/]", "", "")
    out.print(table)


def _fmr_text(match: dict) -> str:
    fmr = match.get("false_match_rate")
    if fmr is None:
        return "-"
    return ("<" if match.get("false_match_rate_below_limit") else "") + f"{fmr:.0e}"


def submit(service, fn, *args, as_json: bool = False, **kwargs):
    from scheduler.access import AccessRefused, GalleryHidden
    from scheduler.service import JobDenied, JobRefused

    try:
        return fn(*args, **kwargs)
    except (JobRefused, GalleryHidden) as exc:
        raise fail(f"refused, nothing was queued: {str(exc).strip(chr(39))}") from None
    except AccessRefused as exc:
        raise fail(f"refused, nothing was queued: {exc}", EXIT_REFUSED) from None
    except JobDenied as exc:
        if as_json:
            out.print_json(json.dumps(job_dict(exc.view)))
        else:
            console.print(f"[bold red]DENIED by policy[/], nothing was queued (job {exc.view.id} records it): "
                          f"{exc.view.decision_reason}")
            console.print(f"rules: {', '.join(exc.view.decision_rule_ids)}; registry sha256 "
                          f"{(exc.view.registry_hash or '')[:12]}")
        raise typer.Exit(EXIT_REFUSED) from None


def exit_code(view) -> int:
    state = JobState(view.state)
    if state.refused:
        return EXIT_REFUSED
    if (view.kind == "search" and state in (JobState.DONE, JobState.PARTLY_FAILED) and view.faces == 0
            and getattr(view, "no_face", None)):
        return EXIT_NO_FACE  # every probe that could be read had no face in it: nothing was searched
    return EXIT_OK if state in (JobState.DONE, JobState.QUEUED, JobState.RUNNING) else EXIT_FAILED


