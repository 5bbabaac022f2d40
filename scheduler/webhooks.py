"""Signed webhooks: when a job with a `callback_url` ends, its job view is POSTed there as JSON with
`X-FaceGate-Signature: sha256=<hex HMAC-SHA256 of the exact body>`, keyed by the organisation's webhook
secret. The API's collector delivers them (`WebhookDeliverer.deliver_due`), retrying with backoff; every
attempt is audited.

Callback URLs are confined: http or https, a host, no user name or password in them, and (unless
FACEGATE_WEBHOOK_ALLOW_PRIVATE is set) no loopback, private, link-local or reserved address, checked
when the job is submitted and again, on the resolved address, before every attempt. Redirects are not
followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, cast
from urllib.parse import urlsplit

import httpx
from sqlalchemy import CursorResult, select, update

from facegate.audit import AuditLog
from facegate.db import session_scope
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent, JobState
from scheduler.models import Job, WebhookDelivery, WebhookSecret, utcnow

SIGNATURE_HEADER = "X-FaceGate-Signature"
MAX_URL_LENGTH = 2048
MAX_ATTEMPTS = 5
# Seconds before attempt n+1 (after n failed): 2, 4, 8, 16.
BACKOFF_S = 2.0
TIMEOUT_S = 5.0


class WebhookRefused(ValueError):
    """A callback URL FaceGate will not call, or an organisation with no webhook secret; says why."""


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver does: recompute the signature over the body as received, compare in constant time."""
    return hmac.compare_digest(sign(secret, body), signature or "")


def _refused_address(host: str, allow_private: bool) -> str | None:
    """Why no call goes to `host` (None: it may be called): every address it resolves to is checked."""
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"its host {host!r} does not resolve ({exc.strerror or exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if (address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
                or address.is_multicast or address.is_unspecified):
            return (f"its host {host!r} is at {address}, a loopback, private or reserved address "
                    "(set FACEGATE_WEBHOOK_ALLOW_PRIVATE=true to allow those)")
    return None


def check_callback_url(url: str, settings: Settings) -> str:
    """The URL, if FaceGate may POST to it; WebhookRefused saying why not."""
    url = (url or "").strip()
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"callback_url {url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise WebhookRefused("callback_url may not carry a user name or password: the signature authenticates "
                             "FaceGate to you")
    why = _refused_address(parts.hostname, settings.webhook_allow_private)
    if why:
        raise WebhookRefused(f"callback_url {url!r} refused: {why}")
    return url


def create_secret(db_url: str, audit: AuditLog, organisation_id: str, *, by: str | None = None,
                  by_user: str | None = None) -> str:
    """A new webhook secret for the organisation (replacing its old one): shown once, kept for signing."""
    secret = "whsec_" + secrets.token_urlsafe(32)
    with session_scope(db_url) as s:
        row = s.get(WebhookSecret, organisation_id)
        if row is None:
            s.add(WebhookSecret(organisation_id=organisation_id, secret=secret))
        else:
            row.secret, row.created_at = secret, utcnow()
    audit.append(AuditEvent.WEBHOOK_SECRET_CREATED, organisation_id=organisation_id, api_key_id=by,
                 username=by_user, detail={"fingerprint": hashlib.sha256(secret.encode()).hexdigest()[:12]})
    return secret


def secret_of(db_url: str, organisation_id: str) -> str | None:
    with session_scope(db_url) as s:
        row = s.get(WebhookSecret, organisation_id)
        return row.secret if row is not None else None


def register_callback(db_url: str, job_id: str, url: str) -> None:
    """Deliver the job's view to `url` once it ends (recorded with the job, before it can end)."""
    with session_scope(db_url) as s:
        if s.get(WebhookDelivery, job_id) is None:
            s.add(WebhookDelivery(job_id=job_id, url=url))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass
class Attempt:
    job_id: str
    url: str
    attempt: int
    status: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookDeliverer:
    """Posts each finished job's view to its callback URL; `render` turns a job id into the JSON body."""

    def __init__(self, settings: Settings, audit: AuditLog, render: Callable[[str], dict],
                 transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self.db_url = settings.resolved_database_url
        self.audit = audit
        self.render = render
        self.transport = transport

    def deliver_due(self, now: datetime | None = None, limit: int = 50) -> list[Attempt]:
        """One attempt for every delivery that is due: its job has ended, it is not delivered, not given up."""
        now = now or utcnow()
        finished = [state.value for state in JobState if state.finished]
        with session_scope(self.db_url) as s:
            rows = s.execute(select(WebhookDelivery, Job.submitter, Job.api_key_id)
                             .join(Job, Job.id == WebhookDelivery.job_id)
                             .where(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.given_up.is_(False),
                                    Job.state.in_(finished))
                             .order_by(WebhookDelivery.created_at).limit(limit)).all()
            due = [(d.job_id, d.url, d.attempts, org, key) for d, org, key in rows
                   if d.next_attempt_at is None or _aware(d.next_attempt_at) <= now]
        made = [self._attempt(job_id, url, attempts + 1, org, key) for job_id, url, attempts, org, key in due]
        return [a for a in made if a is not None]

    def _claimed(self, job_id: str, attempt: int) -> bool:
        """Only one process makes attempt n of a delivery, however many collectors run."""
        with session_scope(self.db_url) as s:
            result = s.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job_id,
                                                             WebhookDelivery.attempts == attempt - 1)
                               .values(attempts=attempt))
            return cast(CursorResult, result).rowcount == 1

    def _attempt(self, job_id: str, url: str, attempt: int, organisation_id: str,
                 api_key_id: str | None) -> Attempt | None:
        if not self._claimed(job_id, attempt):
            return None
        body = json.dumps(self.render(job_id), separators=(",", ":"), default=str).encode()
        secret = secret_of(self.db_url, organisation_id)
        status: int | None = None
        error: str | None = None
        if secret is None:
            error = "the organisation has no webhook secret any more: nothing was sent"
        else:
            try:
                check_callback_url(url, self.settings)  # again: what the host resolves to may have changed
                with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, transport=self.transport) as client:
                    response = client.post(url, content=body, headers={
                        "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body),
                        "X-FaceGate-Job": job_id, "X-FaceGate-Attempt": str(attempt),
                        "User-Agent": "FaceGate-Webhook/1"})
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"answered {status}"
            except WebhookRefused as exc:
                error = str(exc)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
        result = Attempt(job_id, url, attempt, status, error)
        give_up = not result.delivered and attempt >= MAX_ATTEMPTS
        with session_scope(self.db_url) as s:
            row = s.get(WebhookDelivery, job_id)
            if row is not None:
                row.last_status, row.last_error = status, error
                if result.delivered:
                    row.delivered_at = utcnow()
                elif give_up:
                    row.given_up = True
                else:
                    row.next_attempt_at = utcnow() + timedelta(seconds=BACKOFF_S * 2 ** (attempt - 1))
        self.audit.append(AuditEvent.WEBHOOK_ATTEMPT, organisation_id=organisation_id, api_key_id=api_key_id,
                          job_id=job_id, allowed=result.delivered,
                          detail={"url": url, "attempt": attempt, "status": status, "error": error,
                                  "delivered": result.delivered, "given_up": give_up,
                                  "body_sha256": hashlib.sha256(body).hexdigest()})
        return result
