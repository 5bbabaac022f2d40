"""The policy gate before queuing: the access rule's decision, the threshold floor, and the signed
tickets (one per chunk, bound to that chunk's work) that let a worker run it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select

from facegate.calibration import calibrated_threshold_lookup
from facegate.db import session_scope
from facegate.embedding_models import MODELS, UNTRAINED, configured_family, family_of, known_model_versions
from facegate.messages import ChunkMessage, work_binding
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent
from policy import (
    ERASE_CAPABILITY,
    Decision,
    TicketClaims,
    check_threshold,
    effective_floor,
    floor_in_force,
    model_family,
    requires_human_review,
    reviewers_required,
    sign_ticket,
)
from policy.quality import floor_to_claim
from scheduler.access import Access, AccessRule, Action, load_policy
from scheduler.audit import AuditLog
from scheduler.authorisations import authorisation_check
from scheduler.keys import Principal
from scheduler.models import Gallery

__all__ = ["ERASURE_PURPOSE", "Admission", "SubmissionGate", "load_policy"]

# What an erasure is recorded (and its tickets signed) as being for.
ERASURE_PURPOSE = "erasure"


@dataclass(frozen=True)
class Admission:
    decision: Decision
    review_required: bool
    reviewers_required: int = 0
    # What every ticket of this admission asserts besides its chunk's work (None when refused).
    _claims: dict | None = field(default=None, repr=False)
    _secret: str | None = field(default=None, repr=False)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def ticket_for(self, message: ChunkMessage) -> str:
        """A ticket for exactly this message's work: its job, chunk, kind, gallery, generation and content."""
        if self._claims is None or self._secret is None:
            raise PermissionError("a refused admission signs no ticket")
        return sign_ticket(TicketClaims(**self._claims, **work_binding(message)), self._secret)


class SubmissionGate:
    def __init__(self, settings: Settings, audit: AuditLog) -> None:
        self.settings = settings
        self.audit = audit
        self.access = AccessRule(settings, audit)

    def floor_for(self, purpose: str, model_version: str | None) -> float | None:
        """The lowest threshold the purpose allows for this model version (None: unknown purpose or version)."""
        if model_version is None:
            return None
        return effective_floor(purpose, model_version, load_policy(self.settings), self._threshold_for_fmr())

    def quality_filters(self) -> dict:
        """The registry's named enrolment filters (Rekognition's QualityFilter)."""
        return dict(load_policy(self.settings).quality_filters)

    def floors_in_force(self) -> list[dict]:
        """Per purpose and per model version in use here, the floor this gate enforces and its source.

        Versions in use: every exact version whose weights are known on this machine (the installed dlib
        file's, the untrained network's, VGGFace2's where its file is here), and every gallery's (and
        rebuild's) in the job database. A family with no version here is shown as `<family>:*`: any of
        its versions not listed exactly. `facegate policy show` prints these rows.
        """
        registry = load_policy(self.settings)
        uses: dict[str, list[str]] = {}
        configured = configured_family(self.settings)
        for version in sorted(known_model_versions(self.settings)):
            if ":" in version or version.startswith("untrained-seed"):
                uses.setdefault(version, []).append("weights here" + (" (FACEGATE_MODEL)" if (
                    family_of(version) == configured) else ""))
        with session_scope(self.settings.resolved_database_url) as s:
            for row in s.scalars(select(Gallery)):
                for in_use in (row.model_version, row.building_model_version):
                    if in_use:
                        uses.setdefault(in_use, []).append(f"gallery {row.label or row.name}")
        for family in MODELS:
            if family != UNTRAINED and not any(model_family(v) == family for v in uses):
                uses[f"{family}:*"] = ["no weights of this family here"]
        lookup = self._threshold_for_fmr()
        rows = []
        for purpose in registry.purposes:
            for version, why in uses.items():
                floor = floor_in_force(purpose.id, version, registry, lookup)
                entry = purpose.floor_entry(version)
                rows.append({"purpose": purpose.id, "model_version": version, "in_use": why, "floor": floor.value,
                             "source": floor.source, "stated_for": entry.model_version if entry else None,
                             "evidence": entry.evidence if entry else "", "description": floor.description})
        return rows

    def _threshold_for_fmr(self):
        # A purpose may state its floor as a false-match rate: translated through the model's calibration.
        return calibrated_threshold_lookup(self.settings.resolved_calibration_dir)

    def _admission(self, principal: Principal, decision: Decision, capability: str, purpose: str,
                   review_required: bool, min_quality: str = "", authorisation: str = "",
                   reviewers: int = 0) -> Admission:
        claims = dict(organisation_id=principal.organisation_id, capability=capability, purpose=purpose,
                      registry_hash=decision.registry_hash, expires_at=int(time.time()) + self.settings.ticket_ttl_s,
                      min_quality=min_quality, authorisation=authorisation)
        return Admission(decision, review_required, reviewers, claims, self.settings.resolved_ticket_secret())

    def admit_erasure(self, principal: Principal, *, job_id: str, gallery: str, access: Access | None = None) -> Admission:
        """Erasure is never held back by a moratorium; only the owner (or an administrator) gets this far."""
        access = access or self.access.authorize(principal, Action.ERASE, gallery, purpose=ERASURE_PURPOSE, job_id=job_id)
        return self._admission(principal, access.as_decision(), ERASE_CAPABILITY, ERASURE_PURPOSE, False)

    def admit(self, principal: Principal, capability: str, purpose: str, *, job_id: str, gallery: str,
              threshold: float | None = None, model_version: str | None = None, access: Access | None = None,
              now: datetime | None = None, authorisation: str | None = None) -> Admission:
        """The decision for this request (the access rule's, audited there), then the floor; with the
        means to sign each chunk's ticket when it is allowed."""
        now = now or datetime.now(timezone.utc)
        if access is None:
            action = Action.COMPARE if capability == "compare" else Action(capability)
            access = self.access.authorize(principal, action, None if action is Action.COMPARE else gallery,
                                           purpose=purpose, job_id=job_id, now=now, audit_gallery=gallery,
                                           raise_on_denial=False)
        decision = access.decisions[-1] if access.decisions else access.as_decision()
        if not access.allowed:
            decision = access.as_decision() if not access.decisions else next(
                d for d in access.decisions if not d.allowed)
            if decision.organisation_id != principal.organisation_id:  # the owner's refusal, for a system job
                decision = decision.model_copy(update={"reason": access.reason})
            return Admission(decision, False)
        registry = load_policy(self.settings)
        policy_purpose = purpose
        # The legal authorisation the purpose asks of each job (or the one named), valid now.
        legal = authorisation_check(self.settings, registry, organisation_id=principal.organisation_id, purpose=purpose,
                                    capability=capability, authorisation_id=authorisation, at=now)
        if authorisation or not legal.rule_ids[0].startswith("allow.authorisation-not-required"):
            self.audit.append_decision(
                decision.model_copy(update={"allowed": legal.allowed, "rule_ids": legal.rule_ids,
                                            "reason": legal.reason}),
                event=AuditEvent.AUTHORISATION_DECISION, **principal.actor, job_id=job_id, gallery=gallery,
                detail={"authorisation_id": authorisation,
                        "valid_until": legal.valid_until.isoformat() if legal.valid_until else None})
        if not legal.allowed:
            return Admission(decision.model_copy(update={"allowed": False, "rule_ids": legal.rule_ids,
                                                         "reason": legal.reason}), False)
        if threshold is not None and model_version is not None:
            # The floor is stated per model version: checkable here only once the gallery's version is known.
            floor = check_threshold(policy_purpose, threshold, model_version, registry, self._threshold_for_fmr())
            if not floor.allowed:
                decision = floor.model_copy(update={"organisation_id": principal.organisation_id,
                                                    "capability": capability, "purpose": purpose})
                self.audit.append_decision(decision, **principal.actor, job_id=job_id, gallery=gallery,
                                           detail={"threshold": threshold, "model_version": model_version})
                return Admission(decision, False)
        # A search carries the purpose's probe quality floor in its tickets: the worker, which sees the
        # faces, enforces it (and the registry's floor at execution, if that is stricter).
        entry = registry.purpose(purpose)
        min_quality = floor_to_claim(entry.min_quality) if capability == "search" and entry is not None else ""
        return self._admission(principal, decision, capability, purpose, requires_human_review(purpose, registry),
                               min_quality, authorisation or "", reviewers_required(purpose, registry))
