"""Administration commands: organisations, API keys, the policy registry, the audit log."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, PASSWORD_ENV, console, fail, out, read_password
from facegate.settings import get_settings
from facegate.vocabulary import AuditEvent

org_app = typer.Typer(no_args_is_help=True, help="Organisations that may hold API keys.")
key_app = typer.Typer(no_args_is_help=True, help="API keys: the only way a submitter is known.")
policy_app = typer.Typer(no_args_is_help=True, help="The moratorium registry and its decisions.")
audit_app = typer.Typer(no_args_is_help=True, help="The append-only, hash-chained audit log.")
user_app = typer.Typer(no_args_is_help=True, help="Named users of an organisation, with roles and their own "
                                                 "passwords (API keys stay for machines).")


def _db_url() -> str:
    return get_settings().resolved_database_url


def _registry():
    from policy import RegistryError
    from scheduler.gate import load_policy

    try:
        return load_policy(get_settings())
    except RegistryError as exc:
        raise fail(str(exc)) from None


def _floors_in_force() -> list[dict]:
    from facegate.audit import AuditLog
    from scheduler.gate import SubmissionGate

    settings = get_settings()
    return SubmissionGate(settings, AuditLog(settings.resolved_database_url)).floors_in_force()


# Organisations ---------------------------------------------------------------------------------------

@org_app.command("add")
def org_add(org_id: str,
            name: Optional[str] = typer.Option(None, "--name", help="Default: the registry's name for it."),
            sector: Optional[str] = typer.Option(None, "--sector", help="Default: the registry's sector for it."),
            jurisdiction: Optional[str] = typer.Option(None)) -> None:
    """Record an organisation here. Who it is, and what it may do, is the registry's to say: a sector or
    name that contradicts the registry is refused."""
    from scheduler.keys import KeyStore, KeyStoreError

    registry = _registry()
    known = registry.organisation(org_id)
    name = name or (known.name if known else None)
    sector = sector or (known.sector if known else None)
    if not name or not sector:
        raise fail(f"{org_id} is not in the policy registry: give --name and --sector")
    try:
        KeyStore(_db_url()).add_organisation(org_id, name, sector, jurisdiction, registry=registry)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    listed = registry.organisation(org_id)
    console.print(f"added organisation {org_id}")
    if listed is None:
        console.print(f"[yellow]note:[/] {org_id} is not in the policy registry ({registry.content_hash[:12]}): "
                      "every job it submits will be denied until the registry lists it")


@org_app.command("list")
def org_list(as_json: bool = typer.Option(False, "--json")) -> None:
    from scheduler.keys import KeyStore

    orgs = KeyStore(_db_url()).list_organisations()
    if as_json:
        out.print_json(json.dumps([{k: str(v) if v is not None else None for k, v in vars(o).items()} for o in orgs]))
        return
    table = Table(title="organisations")
    for col in ("id", "name", "sector", "jurisdiction"):
        table.add_column(col, overflow="fold")
    for o in orgs:
        table.add_row(o.id, o.name, o.sector, o.jurisdiction or "-")
    out.print(table)


@org_app.command("webhook-secret")
def org_webhook_secret(org_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Create (or replace) the secret that signs the organisation's webhooks: shown once. Receivers check
    X-FaceGate-Signature: sha256=<hex HMAC-SHA256 of the body> with it."""
    from scheduler.audit import AuditLog
    from scheduler.keys import KeyStore
    from scheduler.webhooks import create_secret

    if org_id not in {o.id for o in KeyStore(_db_url()).list_organisations()}:
        raise fail(f"no organisation {org_id!r} here: add it first with `facegate org add {org_id}`")
    secret = create_secret(_db_url(), AuditLog(_db_url()), org_id)
    if as_json:
        out.print_json(json.dumps({"organisation_id": org_id, "secret": secret}))
        return
    console.print(f"webhook secret for {org_id} (it replaces any earlier one). Store it now; it is not shown again:")
    out.print(secret)


# Keys ------------------------------------------------------------------------------------------------

@key_app.command("create")
def key_create(org_id: str, label: str = typer.Option("", help="What the key is for."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Create a key for an organisation. The secret is shown once and never stored."""
    from scheduler.audit import AuditLog
    from scheduler.keys import KeyStore, KeyStoreError

    try:
        created = KeyStore(_db_url()).create_key(org_id, label)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    AuditLog(_db_url()).append(AuditEvent.KEY_CREATED, organisation_id=org_id, api_key_id=created.key_id,
                               detail={"label": label})
    if as_json:
        out.print_json(json.dumps({"key_id": created.key_id, "organisation_id": org_id,
                                   "token": created.secret_token}))
        return
    console.print(f"key {created.key_id} for {org_id}. Store it now; it is not shown again:")
    out.print(created.secret_token)


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    from scheduler.audit import AuditLog
    from scheduler.keys import KeyStore, KeyStoreError

    store = KeyStore(_db_url())
    try:
        changed = store.revoke(key_id)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    org = next(k.organisation_id for k in store.list_keys() if k.key_id == key_id)
    if changed:
        AuditLog(_db_url()).append(AuditEvent.KEY_REVOKED, organisation_id=org, api_key_id=key_id)
    console.print(f"key {key_id} " + ("revoked" if changed else "was already revoked"))


@key_app.command("list")
def key_list(org_id: Optional[str] = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    from scheduler.keys import KeyStore

    keys = KeyStore(_db_url()).list_keys(org_id)
    rows = [{"key_id": k.key_id, "organisation_id": k.organisation_id, "label": k.label, "active": k.active,
             "created_at": str(k.created_at), "revoked_at": str(k.revoked_at) if k.revoked_at else None,
             "last_used_at": str(k.last_used_at) if k.last_used_at else None} for k in keys]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="API keys (secrets are never shown again)")
    for col in ("key_id", "organisation_id", "label", "active", "created_at", "revoked_at", "last_used_at"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(str(r[c]) if r[c] is not None else "-" for c in
                        ("key_id", "organisation_id", "label", "active", "created_at", "revoked_at", "last_used_at")))
    out.print(table)


# Users -----------------------------------------------------------------------------------------------

PASSWORD_STDIN_OPTION = typer.Option(False, "--password-stdin", help="Read the password from the first line of "
                                     f"standard input (for scripts; or set {PASSWORD_ENV}).")


def _user_row(u) -> dict:
    return {"username": u.username, "organisation_id": u.organisation_id, "roles": list(u.roles),
            "active": u.active, "user_id": u.id, "created_at": str(u.created_at),
            "disabled_at": str(u.disabled_at) if u.disabled_at else None,
            "last_sign_in_at": str(u.last_sign_in_at) if u.last_sign_in_at else None}


def _audit_user(event: AuditEvent, user, **detail) -> None:
    from scheduler.audit import AuditLog

    AuditLog(_db_url()).append(event, organisation_id=user.organisation_id, api_key_id=user.key_id,
                               detail={"user": user.username, **detail})


@user_app.command("add")
def user_add(org_id: str, username: str,
             role: list[str] = typer.Option(..., "--role", "-r", help="submitter, reviewer, auditor or "
                                                                      "administrator; repeat for more."),
             password_stdin: bool = PASSWORD_STDIN_OPTION) -> None:
    """Add a user to an organisation. The password is asked twice (hidden), or read from --password-stdin
    or FACEGATE_USER_PASSWORD; only its argon2id hash is stored."""
    from scheduler.users import UserError, UserStore, parse_roles

    try:
        parse_roles(role)
        store = UserStore(_db_url())
        user = store.add(org_id, username, read_password(password_stdin), role)
    except UserError as exc:
        raise fail(str(exc)) from None
    _audit_user(AuditEvent.USER_ADDED, user, roles=list(user.roles))
    console.print(f"added user {user.username} to {org_id} with roles {', '.join(user.roles)}")


@user_app.command("list")
def user_list(org_id: Optional[str] = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    from scheduler.users import UserStore

    rows = [_user_row(u) for u in UserStore(_db_url()).list_users(org_id)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="users")
    for col in ("username", "organisation", "roles", "active", "last sign-in"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["username"], r["organisation_id"], ", ".join(r["roles"]), "yes" if r["active"] else "no",
                      (r["last_sign_in_at"] or "-")[:19])
    out.print(table)


@user_app.command("roles")
def user_roles(username: str,
               add: list[str] = typer.Option([], "--add", help="A role to give; repeat for more."),
               remove: list[str] = typer.Option([], "--remove", help="A role to take away; repeat for more.")) -> None:
    """Give or take away roles."""
    from scheduler.users import UserError, UserStore

    store = UserStore(_db_url())
    try:
        before = store.get(username)
        user = store.change_roles(username, add=add, remove=remove)
    except UserError as exc:
        raise fail(str(exc)) from None
    if user.roles != before.roles:
        _audit_user(AuditEvent.USER_ROLES_CHANGED, user, before=list(before.roles), roles=list(user.roles))
    console.print(f"user {username}: roles {', '.join(user.roles)}")


@user_app.command("passwd")
def user_passwd(username: str, password_stdin: bool = PASSWORD_STDIN_OPTION) -> None:
    """Set a user's password (asked twice, hidden; or --password-stdin / FACEGATE_USER_PASSWORD)."""
    from scheduler.users import UserError, UserStore

    store = UserStore(_db_url())
    try:
        store.get(username)
        user = store.set_password(username, read_password(password_stdin, prompt="New password"))
    except UserError as exc:
        raise fail(str(exc)) from None
    _audit_user(AuditEvent.USER_PASSWORD_CHANGED, user)
    console.print(f"password of user {username} changed")


def _set_disabled(username: str, disabled: bool) -> None:
    from scheduler.users import UserError, UserStore

    try:
        user, changed = UserStore(_db_url()).set_disabled(username, disabled)
    except UserError as exc:
        raise fail(str(exc)) from None
    word = "disabled" if disabled else "enabled"
    if changed:
        _audit_user(AuditEvent.USER_DISABLED if disabled else AuditEvent.USER_ENABLED, user)
    console.print(f"user {username} " + (word if changed else f"was already {word}"))


@user_app.command("disable")
def user_disable(username: str) -> None:
    """Stop a user from signing in (its past reviews stay, with its name)."""
    _set_disabled(username, True)


@user_app.command("enable")
def user_enable(username: str) -> None:
    _set_disabled(username, False)


# Policy ----------------------------------------------------------------------------------------------

@policy_app.command("show")
def policy_show(as_json: bool = typer.Option(False, "--json")) -> None:
    """The registry in force: its hash, scope, moratoria with their history, exceptions, purposes, and per
    purpose and model version in use, the floor that applies and where it came from."""
    registry = _registry()
    rows = _floors_in_force()
    if as_json:
        data = json.loads(registry.model_dump_json())
        data["content_hash"] = registry.content_hash
        data["floors_in_force"] = rows
        data["unknown_floor_models"] = list(registry.unknown_floor_models)
        out.print_json(json.dumps(data))
        return
    settings = get_settings()
    out.print(f"[bold]registry[/] {settings.policy_registry or '(shipped default)'}")
    out.print(f"[bold]version[/] sha256 {registry.content_hash}")
    out.print(f"[bold]scope[/] {registry.scope}")
    for m in registry.moratoria:
        out.print(f"\n[bold]moratorium {m.id}[/]: {m.title}")
        out.print(f"  covers sectors {', '.join(sorted(registry.covered_sectors(m)))}; "
                  f"organisations {', '.join(m.covers_organisations) or '-'}; capabilities {', '.join(m.capabilities)}")
        out.print(f"  in force from {m.start} until {m.end or 'further notice'}")
        for rev in m.history:
            out.print(f"  {rev.date}: {rev.change} (start {rev.start}, end {rev.end or 'none'})")
    table = Table(title="exceptions")
    for col in ("id", "moratoria", "organisations", "purposes", "valid"):
        table.add_column(col, overflow="fold")
    for e in registry.exceptions:
        moratoria = e.moratoria if isinstance(e.moratoria, str) else ", ".join(e.moratoria)
        table.add_row(e.id, moratoria, ", ".join(e.organisations or []) or "any", ", ".join(e.purposes or []) or "any",
                      f"{e.valid_from} – {e.valid_until or 'open'}")
    out.print(table)
    purposes = Table(title="purposes")
    for col in ("id", "human review", "floors (model family or version: min similarity)", "default floor",
                "probe quality floor"):
        purposes.add_column(col, overflow="fold")
    for p in registry.purposes:
        floors = ", ".join(f"{f.model_version}: {f.min_similarity}" for f in p.floors) or "-"
        purposes.add_row(p.id, f"required: {p.reviewers_required} reviewer(s)" if p.human_review_required else "no", floors,
                         str(p.default_min_similarity) if p.default_min_similarity is not None else "none (refused)",
                         p.min_quality.describe() if p.min_quality else "none (every face is searched)")
    out.print(purposes)
    from policy.explain import authorisation_kinds_text, purpose_rules

    rules = Table(title="probe quality, legal authorisation and retention, per purpose")
    for col in ("purpose", "probe quality floor", "legal authorisation", "retention"):
        rules.add_column(col, overflow="fold")
    for p in registry.purposes:
        explained = purpose_rules(registry, p)
        rules.add_row(p.id, explained["quality"], explained["authorisation"], explained["retention"])
    out.print(rules)
    out.print("[bold]authorisation kinds[/]")
    for line in authorisation_kinds_text(registry):
        out.print(f"  {line}")
    out.print(f"[bold]retention[/]: legal maximum {registry.retention.legal_max_days} days "
              f"({registry.retention.legal_basis}); run nightly by `facegate beat`, or `facegate retention run`")
    filters = Table(title="enrolment quality filters (facegate index --quality-filter NAME)")
    for col in ("name", "a face is enrolled when"):
        filters.add_column(col, overflow="fold")
    for name, floor in registry.quality_filters.items():
        filters.add_row(name, floor.describe())
    out.print(filters)
    in_force = Table(title="floors in force, per purpose and model version in use here")
    for col in ("purpose", "model version", "in use", "floor", "from"):
        in_force.add_column(col, overflow="fold")
    for row in rows:
        floor = "refused" if row["floor"] is None else f"{row['floor']:g}"
        in_force.add_row(row["purpose"], row["model_version"], "; ".join(row["in_use"]), floor,
                         _floor_origin(row))
    out.print(in_force)
    for version in registry.unknown_floor_models:
        out.print(f"[bold yellow]warning:[/] the registry states a floor for model version {version}, which no "
                  "weights known here produce: it applies only where such weights run")


def _floor_origin(row: dict) -> str:
    origin = {"version": f"registry, stated for version {row['stated_for']}",
              "family": f"registry, stated for family {row['stated_for']}",
              "default": "the purpose's default floor (no floor for this model)",
              "calibration": "the purpose's false-match rate, through this model's calibration",
              "refused": row["description"]}[row["source"]]
    return origin + (f" ({row['evidence']})" if row["evidence"] else "")


@policy_app.command("check")
def policy_check(
    org_id: str,
    capability: str = typer.Option(..., "--capability", "-c", help="index, search or compare"),
    purpose: str = typer.Option(..., "--purpose", "-p"),
    at: Optional[str] = typer.Option(None, "--at", help="A date (YYYY-MM-DD) or ISO time; default: now."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Explain what the registry decides for an organisation, capability and purpose at an instant."""
    from policy import decide

    registry = _registry()
    try:
        instant = datetime.now(timezone.utc) if at is None else _parse_instant(at)
        decision = decide(org_id, capability, purpose, instant, registry)
    except (ValueError, OverflowError) as exc:
        raise fail(f"--at {at!r}: {exc}") from None
    from policy.explain import purpose_rules

    entry = registry.purpose(purpose)
    explained = purpose_rules(registry, entry) if entry is not None else {}
    if as_json:
        out.print_json(json.dumps({**json.loads(decision.model_dump_json()), "purpose_rules": explained}))
    else:
        colour = "green" if decision.allowed else "red"
        out.print(f"[bold {colour}]{'ALLOWED' if decision.allowed else 'DENIED'}[/]: {decision.reason}")
        out.print(f"rules: {', '.join(decision.rule_ids)}")
        out.print(f"registry: sha256 {decision.registry_hash} (scope {registry.scope})")
        if explained:
            out.print(f"[bold]probe quality[/]: {explained['quality']}")
            needs = entry.authorisation is not None and capability in entry.authorisation.capabilities
            out.print(f"[bold]legal authorisation[/]: {explained['authorisation']}"
                      + (f" — this {capability} job needs one" if needs else ""))
            out.print(f"[bold]retention[/]: {explained['retention']}")
    raise typer.Exit(EXIT_OK if decision.allowed else EXIT_REFUSED)


def _parse_instant(text: str) -> datetime:
    if len(text) == 10:
        text += "T12:00:00"
    instant = datetime.fromisoformat(text)
    instant = instant if instant.tzinfo else instant.replace(tzinfo=timezone.utc)
    instant.astimezone(timezone.utc)  # an offset that leaves the calendar (year 1 at +01:00) fails here
    if not 1970 <= instant.year <= 9000:
        raise ValueError(f"the instant must lie between the years 1970 and 9000, got {instant.year}")
    return instant


# Audit -----------------------------------------------------------------------------------------------

@audit_app.command("verify")
def audit_verify(checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="A checkpoint file from `facegate audit checkpoint`: also catches a "
                                         "truncated log and a rewritten tail.")) -> None:
    """Recompute the hash chain; name the first row that was changed, removed or inserted; print the head."""
    from scheduler.audit import AuditLog, Checkpoint

    given = None
    if checkpoint is not None:
        try:
            given = Checkpoint.from_dict(json.loads(checkpoint.read_text()))
        except (OSError, ValueError) as exc:
            raise fail(f"{checkpoint}: {exc}") from None
    result = AuditLog(_db_url()).verify(given, get_settings().resolved_audit_checkpoint_secret())
    head = f"head: {result.head_rows} rows, last hash {result.head_hash}"
    if result.ok:
        against = f"; matches the checkpoint of {given.at}" if given else ""
        out.print(f"[green]audit log intact[/]: {result.rows_checked} rows, chain verified{against}")
        typer.echo(head)
        return
    where = f" at row {result.first_broken_seq}" if result.first_broken_seq else ""
    out.print(f"[bold red]audit log BROKEN{where}[/]: {result.reason}", soft_wrap=True)
    typer.echo(f"verified up to {head}")
    raise typer.Exit(EXIT_FAILED)


@audit_app.command("checkpoint")
def audit_checkpoint(output: Optional[Path] = typer.Option(None, "--out", "-o", help="File (default: stdout)."))\
        -> None:
    """Write a signed checkpoint of the log's head (HMAC with FACEGATE_AUDIT_CHECKPOINT_SECRET): keep it
    somewhere the database's operators cannot write, and give it to `audit verify --checkpoint` later."""
    from scheduler.audit import AuditLog

    log = AuditLog(_db_url())
    result = log.verify()
    if not result.ok:
        raise fail(f"the audit log is already broken at row {result.first_broken_seq}: {result.reason}", 1)
    checkpoint = log.checkpoint(get_settings().resolved_audit_checkpoint_secret())
    text = json.dumps(checkpoint.as_dict(), indent=2)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        console.print(f"checkpoint of {checkpoint.rows} rows written to {output}")


USERNAME_FILTER = typer.Option(None, "--username", help="Only rows of what this named user did.")


@audit_app.command("export")
def audit_export(output: Optional[Path] = typer.Option(None, "--out", "-o", help="File (default: stdout)."),
                 org_id: Optional[str] = typer.Option(None, "--org"),
                 username: Optional[str] = USERNAME_FILTER,
                 since: Optional[str] = typer.Option(None, help="ISO date or time.")) -> None:
    """Write the audit log as JSON lines (every field, the acting user's `username` included)."""
    from scheduler.audit import AuditLog

    log = AuditLog(_db_url())
    since_at = _since(since)
    if output is None:
        count = log.export(sys.stdout, since=since_at, organisation_id=org_id, username=username)
    else:
        with open(output, "w") as fh:
            count = log.export(fh, since=since_at, organisation_id=org_id, username=username)
    console.print(f"exported {count} rows")


def _since(text: Optional[str]) -> Optional[datetime]:
    try:
        return _parse_instant(text) if text else None
    except (ValueError, OverflowError) as exc:
        raise fail(f"--since {text!r}: {exc}") from None


@audit_app.command("list")
def audit_list(org_id: Optional[str] = typer.Option(None, "--org"),
               username: Optional[str] = USERNAME_FILTER,
               event: Optional[str] = typer.Option(None, "--event", help="e.g. user.sign_in_failed"),
               since: Optional[str] = typer.Option(None, help="ISO date or time."),
               limit: int = typer.Option(50, "--limit", min=1, help="The newest this many rows."),
               as_json: bool = typer.Option(False, "--json")) -> None:
    """The newest rows, one a line: when, event, organisation, the acting user (or key), job."""
    from scheduler.audit import AuditLog

    rows = AuditLog(_db_url()).rows(organisation_id=org_id, username=username, event=event, since=_since(since),
                                    limit=limit, newest=True)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    table = Table(title="audit log (oldest first)")
    for col in ("seq", "at (UTC)", "event", "organisation", "user", "job"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r.seq), r.at.strftime("%Y-%m-%d %H:%M:%S"), r.event, r.organisation_id,
                      r.username or (f"key {r.api_key_id}" if r.api_key_id else "-"), (r.job_id or "-")[:8])
    out.print(table)
