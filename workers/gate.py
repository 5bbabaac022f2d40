"""The worker's second policy check: a valid signed ticket for exactly this message's work, and the
registry as it stands now still allows it. Every refusal is written to the audit log, even for a job
the scheduler never made: a forged task leaves a trace.

A moratorium can begin, or an exception lapse, while a job waits in the queue. Nothing is read from or
written to the store until this check passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from facegate.calibration import calibrated_threshold_lookup
from facegate.audit import AuditLog
from facegate.authorisations import read_authorisation
from facegate.messages import ChunkMessage, work_binding
from facegate.settings import Settings
from facegate.embedding_models import known_model_versions
from facegate.vocabulary import AuditEvent, ChunkKind
from policy import (
    ERASE_CAPABILITY,
    Registry,
    TicketClaims,
    TicketError,
    check_threshold,
    decide,
    load_registry,
    verify_ticket,
)
from policy.authorisation import AuthorisationRecord, check_authorisation

# The capability a ticket must carry for each kind of chunk.
CAPABILITY_OF_KIND = {ChunkKind.INDEX: "index", ChunkKind.SEARCH: "search", ChunkKind.ERASE: ERASE_CAPABILITY,
                      ChunkKind.COMPARE: "compare"}
# Who a refused task is audited under when its ticket names no one that can be trusted.
UNVERIFIED = "unverified"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Permit:
    claims: TicketClaims
    registry: Registry


class ExecutionRefused(Exception):
    """The chunk must not run; the message is the reason recorded on the job."""


class ExecutionGate:
    def __init__(self, settings: Settings, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self._audit = audit

    def _registry(self) -> Registry:
        # Read at every check: the registry in force is the one on disk now, not the one at start-up.
        registry = load_registry(self.settings.policy_registry, known_models=known_model_versions(self.settings))
        return registry.with_scope(self.settings.policy_scope) if self.settings.policy_scope else registry

    def admit(self, message: ChunkMessage, now: datetime | None = None) -> Permit:
        """A permit for this message, or ExecutionRefused (audited) saying why not."""
        claims: TicketClaims | None = None
        now = now or datetime.now(timezone.utc)
        try:
            claims = self._verified(message, now)
            self._check_work(claims, message)
            return self._decided(claims, now)
        except ExecutionRefused as exc:
            self.record_refusal(message, str(exc), claims)
            raise

    def _verified(self, message: ChunkMessage, now: datetime) -> TicketClaims:
        if not message.ticket:
            raise ExecutionRefused("refused at execution: the task carries no ticket from the scheduler")
        try:
            claims = verify_ticket(message.ticket, self.settings.resolved_ticket_secret(), now,
                                   expected_job_id=message.job_id)
        except TicketError as exc:
            raise ExecutionRefused(f"refused at execution: ticket rejected ({exc})") from None
        return claims

    @staticmethod
    def _check_work(claims: TicketClaims, message: ChunkMessage) -> None:
        """A genuine ticket, but is it for this work? Every bound claim against the message."""
        capability = CAPABILITY_OF_KIND[ChunkKind(message.kind)]
        if claims.capability != capability:
            raise ExecutionRefused(f"refused at execution: the ticket is for {claims.capability!r}, "
                                   f"not {capability!r}")
        mismatches = claims.mismatches(work_binding(message))
        if mismatches:
            raise ExecutionRefused("refused at execution: the message does not match its ticket: "
                                   + "; ".join(mismatches))

    def _decided(self, claims: TicketClaims, now: datetime) -> Permit:
        registry = self._registry()
        # Erasure is allowed by `decide` itself (never held back by a moratorium); the signed ticket proves
        # the scheduler checked ownership and audited the request.
        decision = decide(claims.organisation_id, claims.capability, claims.purpose, now, registry)
        if not decision.allowed:
            raise ExecutionRefused(f"refused at execution under registry {registry.content_hash[:12]} "
                                   f"(rules {', '.join(decision.rule_ids)}): {decision.reason}")
        if claims.capability != ERASE_CAPABILITY:  # destroying data never waits for a legal authorisation
            self._check_authorisation(claims, registry, now)
        return Permit(claims, registry)

    def _check_authorisation(self, claims: TicketClaims, registry: Registry, now: datetime) -> None:
        """The legal authorisation the ticket names, as recorded now: withdrawn or lapsed while the job waited
        means refused. A purpose that requires one refuses a ticket that names none."""
        purpose = registry.purpose(claims.purpose)
        fields = read_authorisation(self.settings.resolved_database_url, claims.authorisation) \
            if claims.authorisation else None
        check = check_authorisation(purpose.authorisation if purpose else None,
                                    {k.id: k for k in registry.authorisation_kinds},
                                    AuthorisationRecord(**fields) if fields else None,
                                    organisation_id=claims.organisation_id, purpose=claims.purpose,
                                    capability=claims.capability, at=now, authorisation_id=claims.authorisation or None)
        if not check.allowed:
            raise ExecutionRefused(f"refused at execution (rules {', '.join(check.rule_ids)}): {check.reason}")

    def check_threshold(self, permit: Permit, message: ChunkMessage, threshold: float, model_version: str) -> None:
        lookup = calibrated_threshold_lookup(self.settings.resolved_calibration_dir)
        floor = check_threshold(permit.claims.purpose, threshold, model_version, permit.registry, lookup)
        if not floor.allowed:
            reason = f"refused at execution: {floor.reason}"
            self.record_refusal(message, reason, permit.claims)
            raise ExecutionRefused(reason)

    def record_refusal(self, message: ChunkMessage, reason: str, claims: TicketClaims | None) -> None:
        """An audit row for a refused task, naming the organisation its verified ticket names (or, for a
        ticket that could not be verified, what it claimed, marked unverified)."""
        claimed = _claimed_organisation(message.ticket) if claims is None else None
        try:
            audit = self._audit or AuditLog(self.settings.resolved_database_url)
            audit.append(AuditEvent.TASK_REFUSED_AT_EXECUTION,
                         organisation_id=claims.organisation_id if claims else UNVERIFIED,
                         job_id=message.job_id[:64], capability=CAPABILITY_OF_KIND.get(ChunkKind(message.kind)),
                         purpose=claims.purpose if claims else None,
                         gallery=getattr(message, "gallery", None), allowed=False,
                         rule_ids=["deny.refused-at-execution"],
                         detail={"reason": reason, "chunk_no": message.chunk_no, "kind": message.kind,
                                 "generation": getattr(message, "generation", None),
                                 "ticket_verified": claims is not None, "claimed_organisation": claimed})
        except Exception:
            log.exception("could not audit a refused task of job %s", message.job_id)


def _claimed_organisation(ticket: str | None) -> str | None:
    """What an unverified ticket says about who sent it: recorded as a claim, never trusted."""
    import base64
    import json

    if not ticket:
        return None
    try:
        payload = ticket.split(".")[0]
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        value = body.get("organisation_id")
        return str(value)[:255] if value is not None else None
    except Exception:  # noqa: BLE001 -- an unreadable claim is no claim: recorded as None, never raised
        return None
