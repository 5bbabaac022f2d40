"""/v1/jobs/{id}/results/{probe}/reviews: a person confirms or rejects a match; recorded with the reviewer."""

from __future__ import annotations

from fastapi import APIRouter

from facegate.vocabulary import ReviewDecision
from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.schemas import MatchOut, ReviewCreate

router = APIRouter(prefix="/v1/jobs", tags=["review"])


@router.post("/{job_id}/results/{probe_id}/reviews", response_model=MatchOut)
def review_match(job_id: str, probe_id: int, body: ReviewCreate, who: PrincipalDep, svc: ServicesDep) -> MatchOut:
    match = svc.jobs.review_match(job_id, probe_id, body.face_id, confirmed=body.decision is ReviewDecision.CONFIRMED,
                                  reviewer=body.reviewer, principal=who, note=body.note)
    return MatchOut(**match)
