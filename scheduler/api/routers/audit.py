"""/v1/audit: the log's head, signed checkpoints of it, and verification against one (compliance)."""

from __future__ import annotations

from fastapi import APIRouter, status

from facegate.audit import Checkpoint, VerifyResult
from facegate.vocabulary import AuditEvent
from scheduler.access import Action
from scheduler.api.deps import PrincipalDep, ServicesDep, Services
from scheduler.keys import Principal
from scheduler.api.schemas import AuditCheckpoint, AuditHeadOut, AuditVerifyRequest

router = APIRouter(prefix="/v1/audit", tags=["audit"])


def _head(result: VerifyResult) -> AuditHeadOut:
    return AuditHeadOut(rows=result.head_rows, head_hash=result.head_hash, ok=result.ok,
                        first_broken_seq=result.first_broken_seq, reason=result.reason)


def _may_read_audit(who: Principal, svc: Services) -> None:
    # A user needs the auditor (or administrator) role; a machine key keeps its organisation's standing.
    svc.jobs.gate.access.authorize(who, Action.AUDIT, None)


@router.get("/head", response_model=AuditHeadOut)
def audit_head(who: PrincipalDep, svc: ServicesDep) -> AuditHeadOut:
    """Verify the hash chain and return its head (row count, last hash): the values to record elsewhere."""
    _may_read_audit(who, svc)
    return _head(svc.jobs.audit.verify())


@router.post("/checkpoints", status_code=status.HTTP_201_CREATED, response_model=AuditCheckpoint)
def audit_checkpoint(who: PrincipalDep, svc: ServicesDep) -> AuditCheckpoint:
    """A checkpoint of the head, signed with the audit checkpoint secret: keep it outside this system."""
    _may_read_audit(who, svc)
    checkpoint = svc.jobs.audit.checkpoint(svc.settings.resolved_audit_checkpoint_secret())
    svc.jobs.audit.append(AuditEvent.AUDIT_CHECKPOINT, organisation_id=who.organisation_id, api_key_id=who.key_id,
                          detail={**({"user": who.user} if who.is_user else {}), "rows": checkpoint.rows, "head_hash": checkpoint.head_hash, "at": checkpoint.at})
    return AuditCheckpoint(**checkpoint.as_dict())


@router.post("/verify", response_model=AuditHeadOut)
def audit_verify(body: AuditVerifyRequest, who: PrincipalDep, svc: ServicesDep) -> AuditHeadOut:
    """Verify the chain, and against a checkpoint: its signature, truncation, a rewritten tail."""
    _may_read_audit(who, svc)
    checkpoint = Checkpoint(**body.checkpoint.model_dump()) if body.checkpoint else None
    return _head(svc.jobs.audit.verify(checkpoint, svc.settings.resolved_audit_checkpoint_secret()))
