"""Moratorium registry and the pure policy decision: who may run which face-search capability, for which purpose, when.

- `policy.registry`: the registry file (organisations, purposes with threshold floors, moratoria with
  their dated history, exceptions, scope), its validation and its content hash.
- `policy.decision`: `decide`, `check_threshold`, `requires_human_review` - pure functions; the instant
  is a parameter, never read from a clock.
- `policy.quality`: probe quality floors and enrolment filters, decided on measured face signals.
- `policy.authorisation`: the legal authorisation (warrant, court order, exigent circumstances) a job
  of some purposes must stand on, and whether it is valid at an instant.
- `policy.retention`: when a gallery, an upload or a job's results must be erased.
- `policy.explain`: the sentences `policy show`, `policy check` and the accountability report use.
- `policy.tickets`: HMAC-signed execution tickets that carry an allowed decision to a worker.

This package imports nothing from FaceGate's other packages, and nothing here touches a database,
the network or the clock.
"""

from .decision import (
    SYSTEM_PURPOSE,
    Decision,
    FloorInForce,
    ThresholdForFmr,
    check_threshold,
    decide,
    effective_floor,
    floor_in_force,
    requires_human_review,
    reviewers_required,
)
from .registry import (
    CAPABILITIES,
    ERASE_CAPABILITY,
    LAW_ENFORCEMENT_SECTORS,
    SECTORS,
    ExceptionRule,
    Moratorium,
    Organisation,
    Purpose,
    Registry,
    RegistryError,
    Revision,
    ThresholdFloor,
    check_floor_models,
    held_back_by_moratoria,
    is_law_enforcement,
    load_registry,
    model_family,
    registry_from_dict,
)
from .quality import FaceQuality, QualityFloor, QualityVerdict, check_quality
from .tickets import WORK_CLAIMS, TicketClaims, TicketError, sign_ticket, verify_ticket

__all__ = [
    "CAPABILITIES",
    "ERASE_CAPABILITY",
    "LAW_ENFORCEMENT_SECTORS",
    "SECTORS",
    "SYSTEM_PURPOSE",
    "Decision",
    "FloorInForce",
    "ExceptionRule",
    "FaceQuality",
    "QualityFloor",
    "QualityVerdict",
    "check_quality",
    "Moratorium",
    "Organisation",
    "Purpose",
    "Registry",
    "RegistryError",
    "Revision",
    "ThresholdFloor",
    "ThresholdForFmr",
    "TicketClaims",
    "WORK_CLAIMS",
    "TicketError",
    "check_floor_models",
    "check_threshold",
    "decide",
    "effective_floor",
    "floor_in_force",
    "held_back_by_moratoria",
    "is_law_enforcement",
    "load_registry",
    "model_family",
    "registry_from_dict",
    "requires_human_review",
    "reviewers_required",
    "sign_ticket",
    "verify_ticket",
]
