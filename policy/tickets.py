"""Signed execution tickets: proof, carried with a job, that the policy allowed it.

The scheduler decides once and signs a ticket; a worker verifies the ticket before it touches a face,
so a job that reached the queue some other way, was altered, or waited past its expiry is refused.

Token: base64url(JSON claims) "." base64url(HMAC-SHA256 over the first part), no padding. Stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, fields

__all__ = ["TICKET_VERSION", "WORK_CLAIMS", "TicketClaims", "TicketError", "sign_ticket", "verify_ticket"]

# Bumped if the claims change shape, so an old worker refuses a ticket it cannot fully check.
TICKET_VERSION = 2


class TicketError(ValueError):
    """A ticket that must not be honoured (malformed, forged, tampered, expired, for another job), or
    an attempt to sign with no secret."""


def _epoch_seconds(value: int | dt.datetime) -> int:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise TicketError("expires_at has no timezone; pass an aware datetime or epoch seconds")
        return int(value.timestamp())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TicketError(f"expires_at must be epoch seconds (int) or an aware datetime, got {value!r}")
    return value


@dataclass(frozen=True)
class TicketClaims:
    """What a ticket asserts: the decision (who, which capability, for what purpose, under which registry,
    until when) and the one piece of work it permits (job, chunk, task kind, gallery and generation, and a
    digest of what the chunk acts on: its paths and parameters, or the erasure's target).

    `expires_at` accepts an aware datetime and is kept as epoch seconds (UTC). A new claim is one more
    field here (with a default, so callers that do not set it still build claims); signing and
    verification follow the fields.
    """

    job_id: str
    organisation_id: str
    capability: str
    purpose: str
    registry_hash: str
    expires_at: int
    chunk_no: int = 0
    task: str = ""
    gallery: str = ""
    generation: int = 0
    target_digest: str = ""
    # The purpose's probe quality floor at admission (policy.quality.floor_to_claim; "" for none): the
    # worker enforces it, and the registry's floor as it stands at execution, whichever is stricter.
    min_quality: str = ""
    # The legal authorisation the job stands on (its id in the authorisations table; "" for none): the
    # worker checks it again at execution, so a withdrawn or lapsed one stops the job.
    authorisation: str = ""

    def __post_init__(self) -> None:
        for field in ("job_id", "organisation_id", "capability", "purpose", "registry_hash"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise TicketError(f"ticket claim {field} must be a non-empty string, got {value!r}")
        for field in ("task", "gallery", "target_digest", "min_quality", "authorisation"):
            if not isinstance(getattr(self, field), str):
                raise TicketError(f"ticket claim {field} must be a string, got {getattr(self, field)!r}")
        for field in ("chunk_no", "generation"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TicketError(f"ticket claim {field} must be a non-negative integer, got {value!r}")
        object.__setattr__(self, "expires_at", _epoch_seconds(self.expires_at))

    @property
    def expires_at_datetime(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.expires_at, tz=dt.timezone.utc)

    def mismatches(self, work: dict[str, object]) -> list[str]:
        """The bound claims that differ from the work a message asks for (`work` maps claim names to values)."""
        return [f"{name} (ticket {getattr(self, name)!r}, message {value!r})"
                for name, value in work.items() if getattr(self, name) != value]


# The claims that bind a ticket to one piece of work; a worker compares each with its message.
WORK_CLAIMS = ("job_id", "chunk_no", "task", "gallery", "generation", "target_digest")
_CLAIM_NAMES = frozenset(f.name for f in fields(TicketClaims))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # validate=True: refuse characters outside the base64url alphabet instead of skipping them.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _key(secret: str | bytes) -> bytes:
    if not secret:
        raise TicketError("the ticket secret is empty; configure a signing secret")
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def _signature(payload: str, secret: str | bytes) -> bytes:
    return hmac.new(_key(secret), payload.encode("ascii"), hashlib.sha256).digest()


def sign_ticket(claims: TicketClaims, secret: str | bytes) -> str:
    """A compact token for `claims`, signed with HMAC-SHA256 under `secret` (must not be empty)."""
    body = {"v": TICKET_VERSION, **asdict(claims)}
    payload = _b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return f"{payload}.{_b64encode(_signature(payload, secret))}"


def verify_ticket(
    token: str,
    secret: str | bytes,
    now: dt.datetime,
    expected_job_id: str | None = None,
) -> TicketClaims:
    """The claims of `token` if it is well formed, signed under `secret`, unexpired at `now` (an aware
    datetime), and, when `expected_job_id` is given, for that job. Raises TicketError otherwise."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise TicketError("now has no timezone; pass an aware datetime")
    if not isinstance(token, str) or token.count(".") != 1:
        raise TicketError("malformed ticket: expected two base64url parts separated by one '.'")
    payload, signature_text = token.split(".")
    try:
        signature = _b64decode(signature_text)
    except (binascii.Error, ValueError):
        raise TicketError("malformed ticket: the signature is not base64url") from None
    # Check the signature before reading the payload: nothing unauthenticated is parsed.
    try:
        expected = _signature(payload, secret)
    except UnicodeEncodeError:
        raise TicketError("malformed ticket: the payload is not base64url") from None
    if not hmac.compare_digest(signature, expected):
        raise TicketError("bad ticket signature: forged, tampered with, or signed under another secret")

    try:
        body = json.loads(_b64decode(payload))
    except (binascii.Error, ValueError):
        raise TicketError("malformed ticket: the payload is not base64url JSON") from None
    if not isinstance(body, dict):
        raise TicketError("malformed ticket: the payload is not a JSON object")
    version = body.pop("v", None)
    if version != TICKET_VERSION:
        raise TicketError(f"malformed ticket: unsupported ticket version {version!r} (expected {TICKET_VERSION})")
    if set(body) != _CLAIM_NAMES:
        raise TicketError(f"malformed ticket: claims {sorted(body)} differ from {sorted(_CLAIM_NAMES)}")
    try:
        claims = TicketClaims(**body)
    except TicketError as error:
        raise TicketError(f"malformed ticket: {error}") from None

    if now.timestamp() >= claims.expires_at:
        raise TicketError(
            f"ticket for job '{claims.job_id}' expired at {claims.expires_at_datetime.isoformat()} "
            f"(now {now.astimezone(dt.timezone.utc).isoformat()})"
        )
    if expected_job_id is not None and claims.job_id != expected_job_id:
        raise TicketError(f"ticket is for job '{claims.job_id}', not for job '{expected_job_id}'")
    return claims
