"""/v1/authorisations: record, read, confirm and withdraw the legal authorisations your jobs stand on.

Withdrawing one refuses every job still waiting on it (the worker checks at execution) and erases the
results of every job that stood on it. Another organisation's authorisation reads as not found."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, status

from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.schemas import AuthorisationCreate, AuthorisationOut, AuthorisationWithdraw
from scheduler.authorisations import AuthorisationService

router = APIRouter(prefix="/v1/authorisations", tags=["authorisations"])


def _service(svc) -> AuthorisationService:
    return AuthorisationService(svc.settings, svc.jobs.audit)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AuthorisationOut)
def record_authorisation(body: AuthorisationCreate, who: PrincipalDep, svc: ServicesDep) -> AuthorisationOut:
    """Record a warrant, court order or exigent circumstances; name its id on the jobs that stand on it."""
    view = _service(svc).record(who, kind=body.kind, reference=body.reference,
                                issuing_authority=body.issuing_authority, issued_at=body.issued_at)
    return AuthorisationOut(**asdict(view))


@router.get("", response_model=list[AuthorisationOut])
def list_authorisations(who: PrincipalDep, svc: ServicesDep) -> list[AuthorisationOut]:
    return [AuthorisationOut(**asdict(v)) for v in _service(svc).list(who)]


@router.get("/{authorisation_id}", response_model=AuthorisationOut)
def show_authorisation(authorisation_id: str, who: PrincipalDep, svc: ServicesDep) -> AuthorisationOut:
    return AuthorisationOut(**asdict(_service(svc).get(who, authorisation_id)))


@router.post("/{authorisation_id}/confirm", response_model=AuthorisationOut)
def confirm_authorisation(authorisation_id: str, who: PrincipalDep, svc: ServicesDep) -> AuthorisationOut:
    """Record its confirmation (a court approved the urgent use) before its deadline."""
    return AuthorisationOut(**asdict(_service(svc).confirm(who, authorisation_id)))


@router.post("/{authorisation_id}/withdraw", response_model=AuthorisationOut)
def withdraw_authorisation(authorisation_id: str, body: AuthorisationWithdraw, who: PrincipalDep,
                           svc: ServicesDep) -> AuthorisationOut:
    """Withdraw it: waiting jobs are refused at execution, and the results of its jobs are erased."""
    return AuthorisationOut(**asdict(svc.jobs.withdraw_authorisation(who, authorisation_id, reason=body.reason)))
