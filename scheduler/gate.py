"""The policy gate before queuing: decide, audit, and sign the ticket that lets a worker run the job."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from facegate.settings import Settings
from evaluation.calibration import calibrated_threshold_lookup
from policy import (
    Decision,
    Registry,
    TicketClaims,
    check_threshold,
    decide,
    effective_floor,
    load_registry,
    requires_human_review,
    sign_ticket,
)
from scheduler.audit import AuditLog
from scheduler.keys import Principal


def load_policy(settings: Settings) -> Registry:
    """Read fresh on every decision, so a revision takes effect for the very next request."""
    registry = load_registry(settings.policy_registry)
    return registry.with_scope(settings.policy_scope) if settings.policy_scope else registry


@dataclass(frozen=True)
class Admission:
    decision: Decision
    ticket: str | None
    review_required: bool

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


class SubmissionGate:
    def __init__(self, settings: Settings, audit: AuditLog) -> None:
        self.settings = settings
        self.audit = audit

    def floor_for(self, purpose: str, model_version: str | None) -> float | None:
        """The lowest threshold the purpose allows for this model version (None: unknown purpose or version)."""
        if model_version is None:
            return None
        return effective_floor(purpose, model_version, load_policy(self.settings), self._threshold_for_fmr())

    def _threshold_for_fmr(self):  # noqa: ANN202
        # A purpose may state its floor as a false-match rate: translated through the model's calibration.
        return calibrated_threshold_lookup(self.settings.resolved_calibration_dir)

    def admit_erasure(self, principal: Principal, *, job_id: str, gallery: str) -> Admission:
        """Erasure is never held back by a moratorium; it is audited and carries its own signed ticket."""
        registry = load_policy(self.settings)
        decision = Decision(allowed=True, rule_ids=["allow.erasure"], registry_hash=registry.content_hash,
                            reason=f"Allowed: {principal.organisation_id} erases vectors of its gallery {gallery!r}; "
                                   "erasure is never held back by a moratorium.",
                            organisation_id=principal.organisation_id, capability="erase", purpose="erasure",
                            at=datetime.now(timezone.utc))
        self.audit.append_decision(decision, api_key_id=principal.key_id, job_id=job_id, gallery=gallery)
        claims = TicketClaims(job_id=job_id, organisation_id=principal.organisation_id, capability="erase",
                              purpose="erasure", registry_hash=registry.content_hash,
                              expires_at=int(time.time()) + self.settings.ticket_ttl_s)
        return Admission(decision, sign_ticket(claims, self.settings.resolved_ticket_secret()), False)

    def admit(self, principal: Principal, capability: str, purpose: str, *, job_id: str, gallery: str,
              threshold: float | None = None, model_version: str | None = None,
              now: datetime | None = None) -> Admission:
        """The decision for this request, audited; with a signed ticket when it is allowed."""
        now = now or datetime.now(timezone.utc)
        registry = load_policy(self.settings)
        decision = decide(principal.organisation_id, capability, purpose, now, registry)
        detail = {"threshold": threshold, "model_version": model_version}
        self.audit.append_decision(decision, api_key_id=principal.key_id, job_id=job_id, gallery=gallery,
                                   detail=detail)
        if decision.allowed and threshold is not None and model_version is not None:
            # The floor is stated per model version: checkable here only once the gallery's version is known.
            floor = check_threshold(purpose, threshold, model_version, registry, self._threshold_for_fmr())
            if not floor.allowed:
                decision = floor.model_copy(update={"organisation_id": principal.organisation_id,
                                                    "capability": capability, "purpose": purpose})
                self.audit.append_decision(decision, api_key_id=principal.key_id, job_id=job_id, gallery=gallery,
                                           detail=detail)
        if not decision.allowed:
            return Admission(decision, None, False)
        claims = TicketClaims(job_id=job_id, organisation_id=principal.organisation_id, capability=capability,
                              purpose=purpose, registry_hash=registry.content_hash,
                              expires_at=int(time.time()) + self.settings.ticket_ttl_s)
        ticket = sign_ticket(claims, self.settings.resolved_ticket_secret())
        return Admission(decision, ticket, requires_human_review(purpose, registry))
