"""/v1/galleries: register, list, show, delete, grant, re-enrol erased images."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.schemas import (
    EnrolCreate,
    EnrolOut,
    ErasedOut,
    FaceOut,
    FacesPage,
    GalleryCreate,
    GalleryOut,
    GrantCreate,
    GrantOut,
    JobOut,
    RetentionSet,
)
from scheduler.api.routers.crops import JPEG_RESPONSES, jpeg_response
from scheduler.api.routers.jobs import job_out
from scheduler.crops import FaceCrops

router = APIRouter(prefix="/v1/galleries", tags=["galleries"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=GalleryOut)
def register_gallery(body: GalleryCreate, who: PrincipalDep, svc: ServicesDep) -> GalleryOut:
    """Register a gallery folder (inside the gallery roots) owned by your organisation."""
    return GalleryOut(**asdict(svc.galleries.register(who, body.name, body.folder, purpose=body.purpose,
                                                              nightly=body.nightly)))


@router.get("", response_model=list[GalleryOut])
def list_galleries(who: PrincipalDep, svc: ServicesDep) -> list[GalleryOut]:
    """The galleries your organisation owns or was granted."""
    return [GalleryOut(**asdict(g)) for g in svc.galleries.list(who)]


@router.get("/{name}", response_model=GalleryOut)
def show_gallery(name: str, who: PrincipalDep, svc: ServicesDep) -> GalleryOut:
    return GalleryOut(**asdict(svc.galleries.show(who, name)))


@router.put("/{name}/retention", response_model=GalleryOut)
def set_gallery_retention(name: str, body: RetentionSet, who: PrincipalDep, svc: ServicesDep) -> GalleryOut:
    """The owner's retention period (days after its last indexing; null: the registry's schedule), never past
    the legal maximum. The nightly sweep erases the gallery when it is due."""
    from scheduler.retention import RetentionService

    RetentionService(svc.galleries).set_gallery_period(who, name, body.days)
    return GalleryOut(**asdict(svc.galleries.show(who, name)))


@router.delete("/{name}", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def delete_gallery(name: str, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Erase every vector of the gallery (an audited erasure job) and forget it."""
    return job_out(svc.galleries.delete(who, name))


@router.post("/{name}/enrol", response_model=EnrolOut)
def enrol_images(name: str, body: EnrolCreate, who: PrincipalDep, svc: ServicesDep) -> EnrolOut:
    """Re-enrol erased images of your gallery (the owner's decision, audited): erased images stay out of every
    index and reindex job until this; the next one indexes them again."""
    removed = svc.galleries.enrol(who, name, body.paths)
    return EnrolOut(gallery=name, reenrolled=[ErasedOut(**m) for m in removed])


@router.get("/{name}/faces", response_model=FacesPage)
def list_faces(name: str, who: PrincipalDep, svc: ServicesDep,
               offset: Annotated[int, Query(ge=0, le=16_000)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> FacesPage:
    """One page of the gallery's faces: face id, image path and sha256, box, external id (no vectors)."""
    total, faces = svc.galleries.faces(who, name, offset=offset, limit=limit)
    nxt = offset + len(faces) if offset + len(faces) < total else None
    return FacesPage(gallery=name, offset=offset, limit=limit, total=total, next_offset=nxt,
                     items=[FaceOut(**asdict(f)) for f in faces])


@router.get("/{name}/faces/{face_id}/crop", response_class=Response, responses=JPEG_RESPONSES)
def face_crop(name: str, face_id: str, who: PrincipalDep, svc: ServicesDep) -> Response:
    """One face of the gallery by its id, cut from its image at the stored box (JPEG). Decided by the access
    rule like the listing; every view audited as `face.viewed`; an image gone or changed answers 410."""
    return jpeg_response(FaceCrops(svc.jobs).gallery_face_crop(who, name, face_id))


@router.delete("/{name}/faces/{face_id}", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def delete_face(name: str, face_id: str, who: PrincipalDep, svc: ServicesDep) -> JobOut:
    """Delete one face by id: an erasure job (the owner's only; audited as every erasure is)."""
    return job_out(svc.galleries.erase_face(who, name, face_id))


@router.post("/{name}/grants", status_code=status.HTTP_204_NO_CONTENT)
def grant_gallery(name: str, body: GrantCreate, who: PrincipalDep, svc: ServicesDep) -> None:
    """Let another organisation search this gallery (the policy gate still decides each search)."""
    svc.galleries.grant(who, name, body.organisation_id)


@router.get("/{name}/grants", response_model=list[GrantOut])
def list_grants(name: str, who: PrincipalDep, svc: ServicesDep) -> list[GrantOut]:
    """The organisations this gallery is granted to (the owner's to see)."""
    return [GrantOut(**g) for g in svc.galleries.grants(who, name)]


@router.delete("/{name}/grants/{organisation_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_grant(name: str, organisation_id: str, who: PrincipalDep, svc: ServicesDep) -> None:
    """Withdraw a grant; the organisation's next search of this gallery answers 'not found'. Audited."""
    if not svc.galleries.revoke(who, name, organisation_id):
        from scheduler.api.problems import Problem

        raise Problem(404, "Not found", f"gallery {name!r} is not granted to {organisation_id!r}", kind="not-found")
