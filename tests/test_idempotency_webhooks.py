"""Idempotency keys and signed webhooks, without a worker: the database, a real local HTTP receiver."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from datetime import timedelta

import pytest

from facegate.db import create_schema, session_scope
from facegate.vocabulary import AuditEvent, JobKind, JobState
from scheduler.audit import AuditLog
from scheduler.idempotency import IdempotencyError, IdempotencyKeys, fingerprint
from scheduler.models import Job, WebhookDelivery, utcnow
from scheduler.webhooks import (
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    WebhookDeliverer,
    WebhookRefused,
    check_callback_url,
    create_secret,
    register_callback,
    sign,
    verify,
)
from tests.conftest import make_settings


@pytest.fixture
def db_url(settings):
    create_schema(settings.resolved_database_url)
    return settings.resolved_database_url


def test_the_same_key_and_request_give_the_same_job_a_different_request_is_refused(db_url):
    keys = IdempotencyKeys(db_url)
    request = fingerprint({"kind": "search", "probes": ["a.jpg"]})
    assert keys.claim("org-a", "key-1", request) is None
    # While the first request is being handled, a second with the same key waits its turn.
    with pytest.raises(IdempotencyError) as busy:
        keys.claim("org-a", "key-1", request)
    assert busy.value.status == 409
    keys.record("org-a", "key-1", "job-1")
    assert keys.claim("org-a", "key-1", request) == "job-1"
    with pytest.raises(IdempotencyError) as other:
        keys.claim("org-a", "key-1", fingerprint({"kind": "search", "probes": ["b.jpg"]}))
    assert other.value.status == 422 and "different request" in str(other.value)
    # Keys are per organisation: another's same key is its own.
    assert keys.claim("org-b", "key-1", request) is None
    # After 24 hours the key is free again.
    assert keys.claim("org-a", "key-1", request, now=utcnow() + timedelta(hours=24, seconds=1)) is None


def test_a_refused_request_frees_its_key_and_bad_keys_are_refused(db_url):
    keys = IdempotencyKeys(db_url)
    assert keys.claim("org-a", "k", "x") is None
    keys.release("org-a", "k")
    assert keys.claim("org-a", "k", "y") is None  # nothing was made: a new request may use it
    for bad in ("", "has space", "x" * 256):
        with pytest.raises(IdempotencyError):
            keys.claim("org-a", bad, "x")


def test_callback_urls_are_confined(settings):
    for bad in ("ftp://example.com/x", "file:///etc/passwd", "https://user:pw@example.com/", "example.com/x",
                "http:///nohost", "https://example.com/" + "a" * 2100):
        with pytest.raises(WebhookRefused):
            check_callback_url(bad, settings)
    with pytest.raises(WebhookRefused, match="loopback, private or reserved"):
        check_callback_url("http://127.0.0.1:9/hook", settings)
    with pytest.raises(WebhookRefused, match="loopback, private or reserved"):
        check_callback_url("http://10.1.2.3/hook", settings)
    allowed = make_settings(settings.data_dir.parent, webhook_allow_private=True)
    assert check_callback_url("http://127.0.0.1:9/hook", allowed) == "http://127.0.0.1:9/hook"


def test_signature_is_hmac_sha256_of_the_body():
    body = b'{"id":"x"}'
    signature = sign("whsec_test", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify("whsec_test", body, signature)
    assert not verify("whsec_other", body, signature) and not verify("whsec_test", body + b" ", signature)


class _Receiver:
    """A real HTTP server on a free loopback port; answers each POST with the next status in `statuses`."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[bytes, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((body, dict(self.headers)))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _finished_job(db_url: str, org: str, state: JobState = JobState.DONE) -> str:
    job_id = uuid.uuid4().hex
    with session_scope(db_url) as s:
        s.add(Job(id=job_id, kind=JobKind.SEARCH, submitter=org, purpose="research", gallery="g", state=state,
                  finished_at=utcnow()))
    return job_id


def test_a_finished_job_is_delivered_signed_retried_and_every_attempt_audited(tmp_path):
    settings = make_settings(tmp_path, webhook_allow_private=True)
    db_url = settings.resolved_database_url
    create_schema(db_url)
    audit = AuditLog(db_url)
    secret = create_secret(db_url, audit, "org-a")
    receiver = _Receiver([500, 503])
    try:
        job_id = _finished_job(db_url, "org-a")
        open_job = uuid.uuid4().hex
        with session_scope(db_url) as s:
            s.add(Job(id=open_job, kind=JobKind.SEARCH, submitter="org-a", gallery="g", state=JobState.RUNNING))
        register_callback(db_url, job_id, receiver.url)
        register_callback(db_url, open_job, receiver.url)
        deliverer = WebhookDeliverer(settings, audit, lambda jid: {"id": jid, "state": "done"})

        first = deliverer.deliver_due()
        assert [(a.job_id, a.status, a.delivered) for a in first] == [(job_id, 500, False)]  # the open job waits
        assert deliverer.deliver_due() == []  # not due again before its backoff
        later = utcnow() + timedelta(minutes=5)
        assert [a.status for a in deliverer.deliver_due(now=later)] == [503]
        assert [a.status for a in deliverer.deliver_due(now=later + timedelta(minutes=5))] == [200]
        assert deliverer.deliver_due(now=later + timedelta(hours=1)) == []  # delivered: never again

        assert len(receiver.received) == 3
        for n, (body, headers) in enumerate(receiver.received, start=1):
            assert json.loads(body) == {"id": job_id, "state": "done"}
            assert verify(secret, body, headers[SIGNATURE_HEADER]) and headers["X-FaceGate-Attempt"] == str(n)
        rows = audit.rows(job_id=job_id, event=AuditEvent.WEBHOOK_ATTEMPT)
        assert [(r.detail["attempt"], r.detail["status"], r.detail["delivered"]) for r in rows] == \
            [(1, 500, False), (2, 503, False), (3, 200, True)]
    finally:
        receiver.stop()


def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_last_attempt(tmp_path):
    settings = make_settings(tmp_path, webhook_allow_private=True)
    db_url = settings.resolved_database_url
    create_schema(db_url)
    audit = AuditLog(db_url)
    create_secret(db_url, audit, "org-a")
    receiver = _Receiver([500] * 10)
    try:
        job_id = _finished_job(db_url, "org-a")
        register_callback(db_url, job_id, receiver.url)
        deliverer = WebhookDeliverer(settings, audit, lambda jid: {"id": jid})
        at = utcnow()
        for _ in range(MAX_ATTEMPTS + 2):
            at += timedelta(hours=1)
            deliverer.deliver_due(now=at)
        assert len(receiver.received) == MAX_ATTEMPTS
        with session_scope(db_url) as s:
            row = s.get(WebhookDelivery, job_id)
            assert row.given_up and row.delivered_at is None and row.attempts == MAX_ATTEMPTS
        assert audit.rows(job_id=job_id, event=AuditEvent.WEBHOOK_ATTEMPT)[-1].detail["given_up"] is True
    finally:
        receiver.stop()
