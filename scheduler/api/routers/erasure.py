"""/v1/erasures: delete the vectors of one image, of every image under a path, or of a gallery. Audited."""

from __future__ import annotations

from fastapi import APIRouter, status

from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.routers.jobs import job_out
from scheduler.api.schemas import ErasureCreate, JobOut
from scheduler.service import JobRefused

router = APIRouter(prefix="/v1/erasures", tags=["erasure"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def erase(body: ErasureCreate, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Erase vectors of your gallery: name `paths`, a folder `under`, or `whole_gallery`."""
    chosen = sum([body.paths is not None, body.under is not None, body.whole_gallery])
    if chosen != 1:
        raise JobRefused("name exactly one of: paths, under, whole_gallery")
    return job_out(svc.galleries.erase(who, body.gallery, paths=body.paths, under=body.under))
