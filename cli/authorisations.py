"""`facegate authorisation`: record, list, show, confirm and withdraw legal authorisations (warrants, court
orders, exigent circumstances) that jobs of some purposes must name."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional

import typer
from rich.table import Table

from cli.common import EXIT_REFUSED, KEY_OPTION, USER_OPTION, authenticate, fail, out
from facegate.settings import get_settings

authorisation_app = typer.Typer(no_args_is_help=True, help=__doc__)


def _context(key: Optional[str], user: Optional[str]):
    from scheduler.authorisations import AuthorisationService

    settings = get_settings()
    return settings, authenticate(settings, key, user), AuthorisationService(settings)


def _print(view, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(asdict(view), default=str))
        return
    colour = "green" if view.status == "valid" else "red"
    out.print(f"authorisation [bold]{view.id}[/]: {view.kind} '{view.reference}' issued by {view.issuing_authority} "
              f"at {view.issued_at.isoformat()}")
    out.print(f"  status [bold {colour}]{view.status}[/]; {view.rule}"
              + (f"; valid until {view.valid_until.isoformat()}" if view.valid_until else ""))
    if view.confirmed_at:
        out.print(f"  confirmed at {view.confirmed_at.isoformat()}")
    if view.withdrawn_at:
        out.print(f"  withdrawn at {view.withdrawn_at.isoformat()}: {view.withdrawn_reason}")


def _guard(fn):
    from scheduler.access import AccessRefused
    from scheduler.authorisations import AuthorisationError, AuthorisationNotFound

    try:
        return fn()
    except (AuthorisationError, AuthorisationNotFound) as exc:
        raise fail(str(exc).strip("'\"")) from None
    except AccessRefused as exc:
        raise fail(f"refused: {exc}", EXIT_REFUSED) from None


def _instant(text: str) -> datetime:

    try:
        value = datetime.fromisoformat(text if len(text) > 10 else text + "T00:00:00")
    except ValueError:
        raise fail(f"--issued {text!r} is not an ISO date or time (e.g. 2026-12-02T09:30)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@authorisation_app.command("record")
def record(kind: str = typer.Option(..., "--kind", help="warrant, court-order or exigent (see `policy show`)."),
           reference: str = typer.Option(..., "--reference", help="The authority's identifier (warrant number)."),
           authority: str = typer.Option(..., "--authority", help="Who issued it (court, judge)."),
           issued: Optional[str] = typer.Option(None, "--issued", help="When it was issued (ISO; default: now)."),
           key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Record an authorisation; name its id on the jobs that stand on it (`facegate search -a ID`)."""
    _, principal, service = _context(key, user)
    issued_at = _instant(issued) if issued else datetime.now(timezone.utc)
    _print(_guard(lambda: service.record(principal, kind=kind, reference=reference, issuing_authority=authority,
                                         issued_at=issued_at)), as_json)


@authorisation_app.command("list")
def list_(key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
           as_json: bool = typer.Option(False, "--json")) -> None:
    _, principal, service = _context(key, user)
    views = service.list(principal)
    if as_json:
        out.print_json(json.dumps([asdict(v) for v in views], default=str))
        return
    table = Table(title="authorisations")
    for col in ("id", "kind", "reference", "authority", "issued", "status", "valid until"):
        table.add_column(col, overflow="fold")
    for v in views:
        table.add_row(v.id, v.kind, v.reference, v.issuing_authority, v.issued_at.isoformat(), v.status,
                      v.valid_until.isoformat() if v.valid_until else "until withdrawn")
    out.print(table)


@authorisation_app.command("show")
def show(authorisation_id: str, key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
         as_json: bool = typer.Option(False, "--json")) -> None:
    _, principal, service = _context(key, user)
    _print(_guard(lambda: service.get(principal, authorisation_id)), as_json)


@authorisation_app.command("confirm")
def confirm(authorisation_id: str, key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Record that it was confirmed (a court approved the urgent use), before its deadline."""
    _, principal, service = _context(key, user)
    _print(_guard(lambda: service.confirm(principal, authorisation_id)), as_json)


@authorisation_app.command("withdraw")
def withdraw(authorisation_id: str, reason: str = typer.Option(..., "--reason", help="Why it is withdrawn."),
             key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
           as_json: bool = typer.Option(False, "--json")) -> None:
    """Withdraw it: jobs still waiting on it are refused, and the results of its jobs are erased."""
    from scheduler.service import JobService

    settings, principal, _ = _context(key, user)
    _print(_guard(lambda: JobService(settings).withdraw_authorisation(principal, authorisation_id, reason=reason)),
           as_json)
