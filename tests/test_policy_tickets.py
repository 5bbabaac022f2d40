"""Signed execution tickets: a worker honours only an untampered, unexpired ticket for its own job."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from policy import WORK_CLAIMS, TicketClaims, TicketError, sign_ticket, verify_ticket
from policy.tickets import TICKET_VERSION

SECRET = "test-secret-not-for-production"
NOW = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def _claims(**overrides) -> TicketClaims:
    values = dict(
        job_id="job-42",
        organisation_id="photo-archive-example",
        capability="search",
        purpose="photo-library",
        registry_hash="ab" * 32,
        expires_at=NOW + dt.timedelta(minutes=5),
    )
    values.update(overrides)
    return TicketClaims(**values)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_round_trip():
    claims = _claims()
    token = sign_ticket(claims, SECRET)
    assert token.count(".") == 1 and "=" not in token
    assert verify_ticket(token, SECRET, NOW, expected_job_id="job-42") == claims
    assert verify_ticket(token, SECRET, NOW) == claims  # job check is optional


def test_expires_at_accepts_epoch_seconds_and_aware_datetimes():
    expiry = NOW + dt.timedelta(minutes=5)
    assert _claims(expires_at=expiry).expires_at == int(expiry.timestamp())
    assert _claims(expires_at=int(expiry.timestamp())) == _claims(expires_at=expiry)
    assert _claims().expires_at_datetime == expiry
    with pytest.raises(TicketError, match="timezone"):
        _claims(expires_at=dt.datetime(2024, 3, 1, 12, 5))


def test_forged_signature():
    token = sign_ticket(_claims(), "someone-elses-secret")
    with pytest.raises(TicketError, match="bad ticket signature"):
        verify_ticket(token, SECRET, NOW)


def test_tampered_payload():
    token = sign_ticket(_claims(), SECRET)
    payload, signature = token.split(".")
    body = json.loads(_unb64(payload))
    body["purpose"] = "criminal-investigation"  # escalate the purpose, keep the old signature
    tampered = _b64(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()) + "." + signature
    with pytest.raises(TicketError, match="bad ticket signature"):
        verify_ticket(tampered, SECRET, NOW)


def test_expired():
    token = sign_ticket(_claims(expires_at=NOW), SECRET)
    with pytest.raises(TicketError, match="expired"):
        verify_ticket(token, SECRET, NOW)  # expiry is exclusive
    assert verify_ticket(token, SECRET, NOW - dt.timedelta(seconds=1)).job_id == "job-42"


def test_wrong_job_id():
    token = sign_ticket(_claims(), SECRET)
    with pytest.raises(TicketError, match="ticket is for job 'job-42', not for job 'job-43'"):
        verify_ticket(token, SECRET, NOW, expected_job_id="job-43")


def test_empty_secret():
    with pytest.raises(TicketError, match="secret is empty"):
        sign_ticket(_claims(), "")
    token = sign_ticket(_claims(), SECRET)
    with pytest.raises(TicketError, match="secret is empty"):
        verify_ticket(token, "", NOW)


@pytest.mark.parametrize(
    "token",
    ["", "no-dot-at-all", "a.b.c", "!!!.???", "ab.cd", "é.x"],
    ids=["empty", "no-dot", "three-parts", "not-base64", "garbage", "non-ascii"],
)
def test_malformed(token):
    with pytest.raises(TicketError):
        verify_ticket(token, SECRET, NOW)


def test_validly_signed_payload_with_wrong_claims_is_malformed():
    """Even a correctly signed token must carry exactly the expected claims."""
    import hashlib
    import hmac

    payload = _b64(json.dumps({"v": TICKET_VERSION, "job_id": "job-42"}).encode())
    signature = _b64(hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).digest())
    with pytest.raises(TicketError, match="malformed ticket: claims"):
        verify_ticket(f"{payload}.{signature}", SECRET, NOW)


def test_naive_now_is_refused():
    token = sign_ticket(_claims(), SECRET)
    with pytest.raises(TicketError, match="timezone"):
        verify_ticket(token, SECRET, dt.datetime(2024, 3, 1, 12, 0))


def test_empty_claim_is_refused():
    with pytest.raises(TicketError, match="job_id"):
        _claims(job_id="")


def test_a_ticket_names_the_work_it_permits_and_says_what_differs():
    claims = _claims(chunk_no=3, task="index", gallery="lab", generation=1, target_digest="d" * 64)
    back = verify_ticket(sign_ticket(claims, SECRET), SECRET, NOW)
    work = {"job_id": back.job_id, "chunk_no": 3, "task": "index", "gallery": "lab", "generation": 1,
            "target_digest": "d" * 64}
    assert back.mismatches(work) == []
    assert set(work) == set(WORK_CLAIMS)
    replayed = {**work, "gallery": "other", "chunk_no": 4}
    assert [m.split(" ")[0] for m in back.mismatches(replayed)] == ["chunk_no", "gallery"]


def test_an_old_version_ticket_is_refused():
    import hashlib
    import hmac

    body = {"v": 1, "job_id": "j", "organisation_id": "o", "capability": "index", "purpose": "p",
            "registry_hash": "r", "expires_at": int(NOW.timestamp()) + 60}
    payload = _b64(json.dumps(body).encode())
    signature = _b64(hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).digest())
    with pytest.raises(TicketError, match="version"):
        verify_ticket(f"{payload}.{signature}", SECRET, NOW)
