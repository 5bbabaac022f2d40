"""Face crops: the probe face of a result and the gallery face of a match, as JPEG; each view audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from scheduler.api.deps import JobIdDep, PrincipalDep, ServicesDep
from scheduler.crops import Crop, FaceCrops

router = APIRouter(prefix="/v1/jobs", tags=["faces"])

JPEG_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}, "description": "The face, cut at its box with a margin (JPEG)"},
         404: {"description": "No such job, probe face, match, gallery or face for your organisation"},
         410: {"description": "The image has gone (deleted, moved, or changed since it was indexed)"}}


def jpeg_response(crop: Crop) -> Response:
    # A biometric record: never kept in a shared or a browser cache (each view is a use, and audited).
    return Response(crop.jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store, private"})


@router.get("/{job_id}/results/{probe_id}/crop", response_class=Response, responses=JPEG_RESPONSES)
def probe_crop(job_id: JobIdDep, probe_id: int, who: PrincipalDep, svc: ServicesDep) -> Response:
    """The probe face, cut from the probe image at its box. Audited as `face.viewed`."""
    return jpeg_response(FaceCrops(svc.jobs).probe_crop(who, job_id, probe_id))


@router.get("/{job_id}/results/{probe_id}/matches/{face_id}/crop", response_class=Response, responses=JPEG_RESPONSES)
def match_crop(job_id: JobIdDep, probe_id: int, face_id: str, who: PrincipalDep, svc: ServicesDep) -> Response:
    """The gallery face of one match, cut from the gallery image at its stored box. Audited as `face.viewed`."""
    return jpeg_response(FaceCrops(svc.jobs).match_crop(who, job_id, probe_id, face_id))
