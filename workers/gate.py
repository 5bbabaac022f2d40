"""The worker's second policy check: a valid signed ticket, and the registry as it stands now still allows it.

A moratorium can begin, or an exception lapse, while a job waits in the queue. Nothing is read from or
written to the store until this check passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from evaluation.calibration import calibrated_threshold_lookup
from facegate.settings import Settings
from policy import Registry, TicketClaims, TicketError, check_threshold, decide, load_registry, verify_ticket


ERASE_CAPABILITY = "erase"


@dataclass(frozen=True)
class Permit:
    claims: TicketClaims
    registry: Registry


class ExecutionRefused(Exception):
    """The chunk must not run; the message is the reason recorded on the job."""


class ExecutionGate:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _registry(self) -> Registry:
        # Read at every check: the registry in force is the one on disk now, not the one at start-up.
        registry = load_registry(self.settings.policy_registry)
        return registry.with_scope(self.settings.policy_scope) if self.settings.policy_scope else registry

    def admit(self, *, job_id: str, ticket: str | None, capability: str, now: datetime | None = None) -> Permit:
        now = now or datetime.now(timezone.utc)
        if not ticket:
            raise ExecutionRefused("refused at execution: the task carries no ticket from the scheduler")
        try:
            claims = verify_ticket(ticket, self.settings.resolved_ticket_secret(), now, expected_job_id=job_id)
        except TicketError as exc:
            raise ExecutionRefused(f"refused at execution: ticket rejected ({exc})") from None
        if claims.capability != capability:
            raise ExecutionRefused(f"refused at execution: the ticket is for {claims.capability!r}, "
                                   f"not {capability!r}")
        registry = self._registry()
        if capability == ERASE_CAPABILITY:
            # Destroying biometric data is never held back by a moratorium (BIPA: destroy when the purpose
            # is met); the signed ticket proves the scheduler checked ownership and audited the request.
            return Permit(claims, registry)
        decision = decide(claims.organisation_id, capability, claims.purpose, now, registry)
        if not decision.allowed:
            raise ExecutionRefused(f"refused at execution under registry {registry.content_hash[:12]} "
                                   f"(rules {', '.join(decision.rule_ids)}): {decision.reason}")
        return Permit(claims, registry)

    def check_threshold(self, permit: Permit, threshold: float, model_version: str) -> None:
        lookup = calibrated_threshold_lookup(self.settings.resolved_calibration_dir)
        floor = check_threshold(permit.claims.purpose, threshold, model_version, permit.registry, lookup)
        if not floor.allowed:
            raise ExecutionRefused(f"refused at execution: {floor.reason}")
