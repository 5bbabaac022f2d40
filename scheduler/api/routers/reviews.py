"""/v1/jobs/{id}/results/{probe}/reviews: a signed-in user confirms or rejects a match; appended, audited."""

from __future__ import annotations

from fastapi import APIRouter

from facegate.vocabulary import ReviewDecision
from scheduler.api.deps import JobIdDep, PrincipalDep, ServicesDep
from scheduler.api.schemas import MatchOut, ReviewCreate

router = APIRouter(prefix="/v1/jobs", tags=["review"])


@router.post("/{job_id}/results/{probe_id}/reviews", response_model=MatchOut)
def review_match(job_id: JobIdDep, probe_id: int, body: ReviewCreate, who: PrincipalDep, svc: ServicesDep) -> MatchOut:
    """Confirm or reject one match as the signed-in user (HTTP Basic, reviewer role). The match is
    `confirmed` once the purpose's number of different reviewers confirmed it; a rejection is kept."""
    match = svc.jobs.review_match(job_id, probe_id, body.face_id, confirmed=body.decision is ReviewDecision.CONFIRMED,
                                  reviewer=body.reviewer, principal=who, note=body.note)
    return MatchOut(**match)
