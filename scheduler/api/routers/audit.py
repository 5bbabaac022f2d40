"""/v1/audit: the log's rows (filtered, paged, exported), its head, signed checkpoints of it, and verification
against one (compliance)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from facegate.audit import Checkpoint, VerifyResult
from facegate.vocabulary import AuditEvent
from scheduler.access import Action
from scheduler.api.deps import PrincipalDep, ServicesDep, Services
from scheduler.keys import Principal
from scheduler.api.problems import Problem
from scheduler.api.schemas import AuditCheckpoint, AuditHeadOut, AuditPage, AuditRowOut, AuditVerifyRequest
from scheduler.audit_listing import AuditFilterError, audit_lines, audit_query, audit_rows

router = APIRouter(prefix="/v1/audit", tags=["audit"])


def _head(result: VerifyResult) -> AuditHeadOut:
    return AuditHeadOut(rows=result.head_rows, head_hash=result.head_hash, ok=result.ok,
                        first_broken_seq=result.first_broken_seq, reason=result.reason)


def _may_read_audit(who: Principal, svc: Services) -> None:
    # A user needs the auditor (or administrator) role; a machine key keeps its organisation's standing.
    svc.jobs.gate.access.authorize(who, Action.AUDIT, None)


def _query(who: Principal, svc: Services, filters: dict[str, str | None]):
    _may_read_audit(who, svc)
    try:
        return audit_query(svc.jobs.db_url, who.organisation_id, filters)
    except AuditFilterError as exc:
        raise Problem(422, "Invalid filter", str(exc), kind="invalid-filter") from None


# The same filters as the console's audit page (scheduler/audit_listing.py); `from` is a keyword in Python.
Organisation = Annotated[str | None, Query(description="Rows of this organisation only.")]
Purpose = Annotated[str | None, Query()]
Event = Annotated[str | None, Query(description="An event name, e.g. review.confirmed or user.signed_in.")]
User = Annotated[str | None, Query(description="Rows of what this named user did.")]
From = Annotated[str | None, Query(alias="from", description="From this day (YYYY-MM-DD, UTC).")]
To = Annotated[str | None, Query(description="Up to and including this day (YYYY-MM-DD, UTC).")]


@router.get("/events", response_model=AuditPage)
def audit_events(who: PrincipalDep, svc: ServicesDep, organisation: Organisation = None, purpose: Purpose = None,
                 event: Event = None, user: User = None, since: From = None, to: To = None,
                 offset: Annotated[int, Query(ge=0)] = 0,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AuditPage:
    """The rows your organisation's auditors may read (its own, and those about its galleries), newest first.
    A user needs the auditor or administrator role."""
    query = _query(who, svc, {"organisation": organisation, "purpose": purpose, "event": event, "user": user,
                              "from": since, "to": to})
    rows = audit_rows(svc.jobs.db_url, query, offset, limit + 1)
    return AuditPage(offset=offset, limit=limit, next_offset=offset + limit if len(rows) > limit else None,
                     items=[AuditRowOut(**r) for r in rows[:limit]])


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}}, "description": "JSON lines, oldest first"}})
def audit_export(who: PrincipalDep, svc: ServicesDep, organisation: Organisation = None, purpose: Purpose = None,
                 event: Event = None, user: User = None, since: From = None, to: To = None) -> StreamingResponse:
    """The same rows as JSON lines, oldest first, every field: `facegate.audit.row_hash_of` recomputes each
    row's hash from its line."""
    query = _query(who, svc, {"organisation": organisation, "purpose": purpose, "event": event, "user": user,
                              "from": since, "to": to})
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse((json.dumps(row, default=str) + "\n" for row in audit_lines(svc.jobs.db_url, query)),
                             media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="facegate-audit-{stamp}.jsonl"'})


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
    svc.jobs.audit.append(AuditEvent.AUDIT_CHECKPOINT, organisation_id=who.organisation_id, **who.actor,
                          detail={"rows": checkpoint.rows, "head_hash": checkpoint.head_hash, "at": checkpoint.at})
    return AuditCheckpoint(**checkpoint.as_dict())


@router.post("/verify", response_model=AuditHeadOut)
def audit_verify(body: AuditVerifyRequest, who: PrincipalDep, svc: ServicesDep) -> AuditHeadOut:
    """Verify the chain, and against a checkpoint: its signature, truncation, a rewritten tail."""
    _may_read_audit(who, svc)
    checkpoint = Checkpoint(**body.checkpoint.model_dump()) if body.checkpoint else None
    return _head(svc.jobs.audit.verify(checkpoint, svc.settings.resolved_audit_checkpoint_secret()))
