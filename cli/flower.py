"""`facegate flower`: Flower, the Celery monitor, for FaceGate's queue — authenticated, read-only, redacted.

How it is started
-----------------
In this process, through Celery's own command line: ``make_celery(settings).start(["flower", ...])``. That
is exactly ``celery --broker=... flower ...`` (flower 2.x registers itself as a ``celery`` sub-command), with
three differences that matter here:

* the Celery app is the one `facegate.queue.make_celery` builds from the settings (broker, transport
  options, queue names), not a module path that a separate ``celery -A`` process would have to import;
* the basic-auth credentials never appear on a command line (``ps``, ``/proc/*/cmdline``), as they would
  with a ``celery ... flower --basic-auth=user:pass`` subprocess;
* before Flower starts, FaceGate installs its redaction (below) into Flower's event and inspection paths.

What Flower shows, and what it must not
---------------------------------------
Task names are readable (``facegate.index_chunk``, ``facegate.search_chunk``, ...). A chunk message carries
a signed execution ticket: not a key, but a bearer credential that admits work for its job until it
expires. Flower would show it wherever it shows task arguments. Three layers keep it out:

1. Every message an app of ``facegate.queue.make_celery`` sends (the scheduler's, evaluation's, and the
   re-send of a task that retries itself, where Celery would write ``repr(args)`` again) carries the
   message's display as its ``argsrepr``, made from the arguments themselves (`facegate.redaction`): the
   events, the worker log and ``inspect active`` show ``(job=... chunk=3 gallery=g images=16)``.
2. The worker makes the same display from the message it received (``ChunkRequest`` in
   `workers.tasks`), so a message put on the broker by anyone else is shown alike.
3. This Flower redacts every task event before it reaches Flower's state (so the UI, the API and the
   persistent state file alike), on values, not text: arguments that are not a display are read back
   (``ast.literal_eval``) and shown as the display, ``ticket`` values redacted; what cannot be read back is
   hidden; a chunk *result* (``ChunkResult``: image paths, failure reasons, matched gallery images and
   similarities — never embeddings) is reduced to counts; free text (exceptions, tracebacks) loses every
   ticket-shaped token. Worker inspection (``reserved``/``scheduled`` send the raw arguments, as values) is
   redacted the same way.

Flower is also cut off from the result backend (``/api/task/result/<id>`` answers 503), so it cannot read
a search's full matches from Redis. Keep ``result_extended`` off (Celery's default): with it, the result
backend would store each task's raw arguments, ticket included, next to its result.

Flower runs read-only unless ``--allow-control`` (no revoke, terminate, rate limits, pool changes or
sending tasks from the web page). State survives restarts in ``DATA_DIR/flower/flower.db``.

Authentication, and what it does not cover
------------------------------------------
``FACEGATE_FLOWER_BASIC_AUTH`` ("user:password[,user2:password2]"; no commas in a password) protects the
UI and ``/api/*``. Without it ``facegate flower`` refuses to start unless ``--no-auth`` is given, and
``--no-auth`` only binds a loopback address. **Flower answers ``/metrics`` (Prometheus: worker names, task
names, counts and runtimes) and ``/healthcheck`` without authentication**, and basic auth travels in clear
over plain HTTP: keep Flower on a private network or loopback, behind a TLS proxy if people reach it
from elsewhere. Flower also reads ``FLOWER_*`` environment variables and a ``flowerconfig.py`` in the
working directory; FaceGate's own options are applied after them and win, but keep both out of production
(``FLOWER_UNAUTHENTICATED_API=true`` would open the API of a ``--no-auth`` Flower).
"""

from __future__ import annotations

import ast
import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, List, Optional

import typer
from celery.utils.saferepr import saferepr

from cli.common import console, fail
from facegate.redaction import (
    HIDDEN,
    REDACTED,
    args_display,
    is_chunk,
    is_task_display,
    kwargs_display,
    redacted,
    task_display,
)
from facegate.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DEFAULT_STATE_SAVE_INTERVAL_S = 60
DEFAULT_MAX_TASKS = 20_000
# Workers are named facegate@<host>-<pid>: every restart is a new name. Forget offline ones after a day.
DEFAULT_PURGE_OFFLINE_WORKERS_S = 24 * 3600

# Free text (an exception's message, a traceback) has no structure to walk: a ticket there is found by its
# shape, base64url(JSON claims) "." base64url(HMAC), whose first part always starts with "eyJ" ('{"').
_TICKET_TOKEN = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


class FlowerConfigError(ValueError):
    """Flower must not start as configured; the message says why and how to fix it."""


# Redaction --------------------------------------------------------------------------------------------


def redact_text(text: str) -> str:
    """Free text with every ticket-shaped token replaced."""
    return _TICKET_TOKEN.sub(REDACTED, text)


def _literal(text: Any) -> Any:
    """A repr (as Celery's saferepr writes it, possibly truncated with '...') back to Python, or None."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _count(values: Any) -> str:
    if not isinstance(values, (list, tuple)):
        return "?"
    shown = [v for v in values if v is not Ellipsis]
    return f"{len(shown)}+" if len(shown) < len(values) else str(len(shown))


def display_args(args: Any) -> Any:
    """Task arguments as Flower may show them: the display our senders and workers already put in their
    events, or arguments read back into values and shown the same way (`args_display`); else hidden."""
    if args is None:
        return None
    if isinstance(args, str) and is_task_display(args):
        return redact_text(args)
    value = _literal(args)
    if not isinstance(value, (list, tuple)):
        return HIDDEN
    message = value[0] if value else None
    if is_chunk(message) and isinstance(message.get("paths"), (list, tuple)) and Ellipsis in message["paths"]:
        # Truncated by saferepr: count what is there, and say it is a lower bound.
        paths = [p for p in message["paths"] if p is not Ellipsis]
        return task_display({**message, "paths": paths}).replace(f"images={len(paths)}", f"images={len(paths)}+")
    return args_display(value)


def display_kwargs(kwargs: Any) -> Any:
    """Keyword arguments read back into values, tickets redacted; hidden where they cannot be read back."""
    if kwargs is None:
        return None
    value = _literal(kwargs)
    return kwargs_display(value) if isinstance(value, Mapping) else HIDDEN


def display_result(result: Any) -> Any:
    """A chunk result reduced to counts: no image paths, no matched images, no similarities."""
    if result is None:
        return None
    value = _literal(result)
    if value is None and result != "None":
        return HIDDEN
    if not is_chunk(value):
        return redact_text(saferepr(redacted(value), 1024))
    parts = [f"job={value.get('job_id')}", f"chunk={value.get('chunk_no')}", f"kind={value.get('kind')}"]
    if value.get("refused"):
        parts.append(f"refused={value['refused']!r}")
    elif value.get("error"):
        parts.append(f"error={value['error']!r}")
    else:
        items = [i for i in (value.get("items") or []) if isinstance(i, dict)]
        probes = [p for p in (value.get("probes") or []) if isinstance(p, dict)]
        parts.append(f"items={_count(value.get('items') or [])}")
        parts.append(f"failed={sum(1 for i in items if not i.get('ok'))}")
        parts.append(f"faces={sum(int(i.get('faces') or 0) for i in items)}")
        if probes or value.get("kind") == "search":
            parts.append(f"probe_faces={_count(value.get('probes') or [])}")
            parts.append(f"matches={sum(len(p.get('matches') or []) for p in probes)}")
    if value.get("model_version"):
        parts.append(f"model={value['model_version']}")
    if value.get("untrained"):
        parts.append("UNTRAINED")
    return redact_text("(" + " ".join(str(p) for p in parts) + ")")


_SENSITIVE_FIELDS = ("args", "kwargs", "result", "exception", "traceback")


def scrub_event(event: dict) -> dict:
    """A copy of a Celery event that Flower may keep and show. Never raises: what cannot be redacted is hidden."""
    if not str(event.get("type", "")).startswith("task-"):
        return event
    try:
        return _scrub_task_event(event)
    except Exception:
        logger.exception("could not redact a %s event; hiding its arguments and result", event.get("type"))
        return {k: ("<hidden>" if k in _SENSITIVE_FIELDS and v is not None else v) for k, v in event.items()}


def _scrub_task_event(event: dict) -> dict:
    event = dict(event)
    if "args" in event:
        event["args"] = display_args(event["args"])
    if "kwargs" in event:
        event["kwargs"] = display_kwargs(event["kwargs"])
    if "result" in event:
        event["result"] = display_result(event["result"])
    for field in ("exception", "traceback"):
        if isinstance(event.get(field), str):
            event[field] = redact_text(event[field])
    return event


def _scrub_request_info(info: Any) -> Any:
    if not isinstance(info, dict):
        return info
    info = dict(info)
    if "args" in info:
        info["args"] = display_args(info["args"])
    if "kwargs" in info:
        info["kwargs"] = display_kwargs(info["kwargs"])
    return info


def scrub_inspection(method: str, response: Any) -> Any:
    """Worker inspection answers (`active`, `reserved`, `scheduled`) with task arguments redacted."""
    if method not in ("active", "reserved", "scheduled") or not isinstance(response, list):
        return response
    try:
        return _scrub_inspection(method, response)
    except Exception:
        logger.exception("could not redact the workers' %s tasks; hiding them", method)
        return []


def _scrub_inspection(method: str, response: list) -> list:
    scrubbed = []
    for entry in response:
        if method == "scheduled" and isinstance(entry, dict) and "request" in entry:
            entry = {**entry, "request": _scrub_request_info(entry["request"])}
        else:
            entry = _scrub_request_info(entry)
        scrubbed.append(entry)
    return scrubbed


def install_redaction() -> None:
    """Make Flower build its event collector and worker inspector through the redaction above.

    Flower 2.x creates both in `flower.app.Flower.__init__` from the names `Events` and `Inspector` in
    `flower.app`; the subclasses only filter what goes in. Refuses to run on a Flower where that changed.
    """
    import flower.app
    from flower.events import Events
    from flower.inspector import Inspector

    base_events = getattr(flower.app, "Events", None)
    base_inspector = getattr(flower.app, "Inspector", None)
    if getattr(base_events, "_facegate_redacting", False):
        return
    if not (base_events is Events and base_inspector is Inspector and callable(getattr(Events, "on_event", None))
            and callable(getattr(Inspector, "_on_update", None))):
        raise FlowerConfigError(f"this Flower ({getattr(flower, '__version__', '?')}) is not one FaceGate knows how "
                                "to redact (flower 2.2 is): refusing to show raw task arguments")

    class RedactingEvents(Events):
        _facegate_redacting = True

        def on_event(self, event):
            return super().on_event(scrub_event(event))

    class RedactingInspector(Inspector):
        def _on_update(self, workername, method, response):
            return super()._on_update(workername, method, scrub_inspection(method, response))

    flower.app.Events = RedactingEvents
    flower.app.Inspector = RedactingInspector


# Configuration --------------------------------------------------------------------------------------------


def parse_basic_auth(value: str | None) -> list[str]:
    """"user:password[,user2:password2]" as Flower's list of "user:password" entries."""
    if not value or not value.strip():
        return []
    entries = [part.strip() for part in value.split(",")]
    for number, entry in enumerate(entries, start=1):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise FlowerConfigError(f"FACEGATE_FLOWER_BASIC_AUTH entry {number} is not user:password "
                                    "(entries are separated by commas; a password cannot contain one)")
    return entries


def configured_basic_auth(settings: Settings) -> list[str]:
    if settings.flower_basic_auth is None:
        return []
    return parse_basic_auth(settings.flower_basic_auth.get_secret_value())


def persistent_db_path(settings: Settings) -> Path:
    return settings.data_dir / "flower" / "flower.db"


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(*, port: int, address: str, basic_auth: list[str], persistent_db: Path, read_only: bool = True,
                state_save_interval_s: int = DEFAULT_STATE_SAVE_INTERVAL_S, max_tasks: int = DEFAULT_MAX_TASKS,
                extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `celery flower` command line (after `celery`), credentials included: never log it."""
    argv = ["flower", f"--port={port}", f"--address={address}", "--persistent=True", f"--db={persistent_db}",
            f"--state_save_interval={state_save_interval_s * 1000}", f"--max_tasks={max_tasks}",
            f"--purge_offline_workers={DEFAULT_PURGE_OFFLINE_WORKERS_S}", f"--read_only={read_only}"]
    if basic_auth:
        argv.append("--basic_auth=" + ",".join(basic_auth))
    return argv + list(extra_args)


def run_flower(settings: Settings, *, port: int, address: str, basic_auth: list[str], persistent_db: Path,
               extra_args: list[str] | tuple[str, ...] = (), read_only: bool = True, allow_no_auth: bool = False,
               state_save_interval_s: int = DEFAULT_STATE_SAVE_INTERVAL_S,
               max_tasks: int = DEFAULT_MAX_TASKS) -> int:
    """Run Flower for FaceGate's Celery app in this process until it is stopped (SIGTERM or Ctrl-C).

    Flower's state is saved to `persistent_db` every `state_save_interval_s` and on a clean stop.
    """
    from facegate.queue import make_celery

    if not basic_auth and not allow_no_auth:
        raise FlowerConfigError("Flower needs basic auth: set FACEGATE_FLOWER_BASIC_AUTH=user:password")
    if not basic_auth and not _is_loopback(address):
        raise FlowerConfigError(f"refusing to serve Flower without authentication on {address}: "
                                "--no-auth is for a loopback address only")
    for entry in basic_auth:  # the same check as for the settings, for callers that pass a list
        parse_basic_auth(entry)
    install_redaction()
    persistent_db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    app = make_celery(settings)
    # Flower reads task state from events only; without a result backend it cannot hand out full results
    # (a search's matched images and similarities) through /api/task/result.
    app.conf.result_backend = "disabled"
    argv = flower_argv(port=port, address=address, basic_auth=basic_auth, persistent_db=persistent_db,
                       read_only=read_only, state_save_interval_s=state_save_interval_s, max_tasks=max_tasks,
                       extra_args=extra_args)
    try:
        code = app.start(argv)
    finally:
        app.close()
    return int(code or 0)


def flower_command(
    port: Optional[int] = typer.Option(None, "--port", help="Port (default FACEGATE_FLOWER_PORT, 5555)."),
    address: Optional[str] = typer.Option(None, "--address", help="Address to bind (default FACEGATE_FLOWER_ADDRESS, "
                                                                   "127.0.0.1). Keep it private: see below."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Run without basic auth (loopback address only)."),
    allow_control: bool = typer.Option(False, "--allow-control",
                                       help="Allow Flower's control actions (revoke, terminate, shut down workers, "
                                            "send tasks). Default: read-only."),
    state_save_interval: int = typer.Option(DEFAULT_STATE_SAVE_INTERVAL_S, "--state-save-interval", min=1,
                                            help="Seconds between saves of Flower's state."),
    max_tasks: int = typer.Option(DEFAULT_MAX_TASKS, "--max-tasks", min=100, help="Tasks Flower keeps in memory."),
    extra_args: Optional[List[str]] = typer.Argument(None, help="More Flower options, after `--` "
                                                                 "(e.g. -- --url_prefix=flower)."),
) -> None:
    """Run Flower, the Celery monitor, on the configured broker: basic auth required, read-only, redacted.

    Flower's /metrics and /healthcheck answer without authentication: keep it on a private network.
    """
    settings = get_settings()
    if settings.embedded_broker:
        raise fail("set FACEGATE_BROKER_URL (e.g. redis://127.0.0.1:6379/0): Flower watches a broker that "
                   "outlives one command")
    try:
        basic_auth = configured_basic_auth(settings)
    except FlowerConfigError as exc:
        raise fail(str(exc)) from None
    port = port or settings.flower_port
    address = address or settings.flower_address
    if not basic_auth and not no_auth:
        raise fail("refusing to start Flower without authentication: it shows every worker and task of the "
                   "queue and, with --allow-control, can stop them. Set FACEGATE_FLOWER_BASIC_AUTH=user:password "
                   "(several: user:pw,user2:pw2), or pass --no-auth to serve it on a loopback address only.")
    if basic_auth and no_auth:
        console.print("[yellow]--no-auth ignored: FACEGATE_FLOWER_BASIC_AUTH is set[/]")
    if not basic_auth:
        console.print("[bold yellow]warning:[/] Flower without authentication (--no-auth); its API still answers "
                      "401 unless FLOWER_UNAUTHENTICATED_API=true is set")
    console.print(f"[dim]Flower on http://{address}:{port} — /metrics and /healthcheck answer without "
                  "authentication: keep this port on a private network[/]")
    try:
        code = run_flower(settings, port=port, address=address, basic_auth=basic_auth,
                          persistent_db=persistent_db_path(settings), extra_args=extra_args or [],
                          read_only=not allow_control, allow_no_auth=no_auth,
                          state_save_interval_s=state_save_interval, max_tasks=max_tasks)
    except FlowerConfigError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def main() -> None:
    """`python -m cli.flower`: the same command, before (or without) the `facegate` entry point."""
    typer.run(flower_command)


if __name__ == "__main__":
    main()
