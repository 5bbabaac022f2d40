"""Face crops: the probe face of a search result, the gallery face of one of its matches, or a gallery's face
by its id, cut at the stored box from the image file, with a small margin, as a JPEG.

Seeing a face is a use of a biometric record: each crop is decided by the one access rule (the job must be
the asker's organisation's, another's is "not found"; the gallery must still be the asker's to read) and
every view is an audit row (`face.viewed`) naming who looked at which face. An image that is no longer on
disk, or whose bytes changed since it was indexed, is reported as gone (CropGone), never cut from whatever
lies at the path now.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.vocabulary import AuditEvent
from scheduler.access import Action
from scheduler.keys import Principal
from scheduler.models import Job, ProbeResult
from scheduler.reading import JobNotFound

# Around the box, as a share of its width and height on each side: a little context, as a reviewer sees it.
MARGIN = 0.2
# The longest side of a crop sent back; larger faces are scaled down (a thumbnail, not the photo).
MAX_SIDE = 320
JPEG_QUALITY = 88


class CropGone(LookupError):
    """The image the face was found in has gone (deleted, moved, or its content changed): nothing to show."""


@dataclass(frozen=True)
class Crop:
    jpeg: bytes
    width: int
    height: int


def cut(path: str | Path, box: list[float], *, max_pixels: int, expected_sha256: str | None = None) -> Crop:
    """The face at `box` (x1, y1, x2, y2 in the upright image's pixels, as the detector gave it) as a JPEG."""
    p = Path(path)
    if not p.is_file():
        raise CropGone(f"the image {p.name} is gone: it is no longer at {p}")
    if expected_sha256 is not None and sha256_file(p) != expected_sha256:
        raise CropGone(f"the image {p.name} is gone: the file at {p} changed since it was indexed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise CropGone(f"the image {p.name} is over the limit of {max_pixels} pixels")
                opened.load()
                # Boxes are in the upright image's pixels (the workers transpose by EXIF before detecting).
                image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise CropGone(f"the image {p.name} can no longer be read: {exc}") from None
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    mx, my = (x2 - x1) * MARGIN, (y2 - y1) * MARGIN
    area = (max(0, int(x1 - mx)), max(0, int(y1 - my)), min(image.width, int(x2 + mx + 1)),
            min(image.height, int(y2 + my + 1)))
    if area[2] <= area[0] or area[3] <= area[1]:
        raise CropGone(f"the stored box {box} lies outside the image {p.name} ({image.width}x{image.height})")
    face = image.crop(area)
    face.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    face.save(out, "JPEG", quality=JPEG_QUALITY)
    return Crop(out.getvalue(), face.width, face.height)


class FaceCrops:
    """Crops of a job's faces for one asker: decided, cut and audited."""

    def __init__(self, jobs) -> None:  # a JobService (its settings, database, audit log and access rule)
        self.jobs = jobs

    def _probe(self, principal: Principal, job_id: str, probe_id: int) -> tuple[Job, ProbeResult]:
        with session_scope(self.jobs.db_url) as s:
            job = s.get(Job, job_id)
            if job is None or job.submitter != principal.organisation_id:
                raise JobNotFound(f"no job {job_id}")
            probe = s.get(ProbeResult, probe_id)
            if probe is None or probe.job_id != job_id:
                raise JobNotFound(f"no probe face {probe_id} in job {job_id}")
            s.expunge(job)
            s.expunge(probe)
            return job, probe

    def probe_crop(self, principal: Principal, job_id: str, probe_id: int) -> Crop:
        """The probe face `probe_id` of search job `job_id`."""
        job, probe = self._probe(principal, job_id, probe_id)
        self._authorize(principal, job)
        return self._job_face(principal, job, probe, face="probe", path=probe.path, box=probe.box,
                                   sha256=None, face_id=None)

    def match_crop(self, principal: Principal, job_id: str, probe_id: int, face_id: str) -> Crop:
        """The gallery face `face_id` that matched probe face `probe_id` of job `job_id`."""
        job, probe = self._probe(principal, job_id, probe_id)
        match = next((m for m in probe.matches or [] if m.get("face_id") == face_id), None)
        if match is None:
            raise JobNotFound(f"no match {face_id} for probe face {probe_id} in job {job_id}")
        self._authorize(principal, job)
        return self._job_face(principal, job, probe, face="gallery", path=match["image_path"],
                                   box=match["box"], sha256=match.get("image_sha256"), face_id=face_id)

    def _authorize(self, principal: Principal, job: Job) -> None:
        # The job is the asker's; the gallery it searched must still be the asker's to read (a revoked grant,
        # an erased gallery: not found), through the one access rule.
        self.jobs.gate.access.authorize(principal, Action.READ, job.gallery, purpose=job.purpose, job_id=job.id,
                                        by_key=True)

    def gallery_face_crop(self, principal: Principal, gallery: str, face_id: str) -> Crop:
        """The face `face_id` of gallery `gallery` (as the faces listing names it), cut from its image at its
        stored box: readable only by those the access rule lets read the gallery; audited like every view."""
        from scheduler.galleries import GalleryService

        access, face = GalleryService(self.jobs).face(principal, gallery, face_id)
        detail = {"face": "gallery", "face_id": face_id, "image_path": face.image_path,
                  "user": getattr(principal, "user", None), "name": gallery}
        return self._cut_and_audit(principal, detail, path=face.image_path, box=face.box, sha256=face.image_sha256,
                                   job_id=None, purpose=access.purpose, gallery=access.gallery)

    def _cut_and_audit(self, principal: Principal, detail: dict, *, path: str, box: list[float], sha256: str | None,
                       job_id: str | None, purpose: str | None, gallery: str | None) -> Crop:
        try:
            crop = cut(path, box, max_pixels=self.jobs.settings.max_image_pixels, expected_sha256=sha256)
        except CropGone as exc:
            detail["gone"] = str(exc)
            raise
        finally:
            # Every view is recorded, also one that found the image gone (someone asked to see that face).
            self.jobs.audit.append(AuditEvent.FACE_VIEWED, organisation_id=principal.organisation_id,
                                   **principal.actor, job_id=job_id, capability="read",
                                   purpose=purpose, gallery=gallery, detail=detail)
        return crop

    def _job_face(self, principal: Principal, job: Job, probe: ProbeResult, *, face: str, path: str,
                  box: list[float], sha256: str | None, face_id: str | None) -> Crop:
        detail = {"face": face, "probe_result_id": probe.id, "face_id": face_id, "image_path": path,
                  "user": getattr(principal, "user", None)}
        return self._cut_and_audit(principal, detail, path=path, box=box, sha256=sha256, job_id=job.id,
                                   purpose=job.purpose, gallery=job.gallery)


__all__ = ["MARGIN", "MAX_SIDE", "Crop", "CropGone", "FaceCrops", "cut"]
