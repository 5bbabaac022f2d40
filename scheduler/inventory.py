"""The scheduler's record of a gallery's images and generations: what a finished chunk adds to or removes
from the inventory, and the swap to a rebuilt generation when its job ends."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from facegate.files import sha256_file
from facegate.messages import ErasedFaceOut, ItemOutcome
from facegate.paths import is_text_path
from scheduler.models import ErasedFace, ErasedImage, Gallery, GalleryImage, Job, JobChunk, JobState, utcnow


def record_inventory(s: Session, gallery: str, items: Iterable[ItemOutcome]) -> None:
    for item in items:
        if not is_text_path(item.path):
            continue  # refused by its name (not UTF-8): never indexed, so nothing of it to remember
        size: int | None
        mtime_ns: int | None
        try:
            stat = Path(item.path).stat()
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime_ns = None
        s.merge(GalleryImage(gallery=gallery, path=item.path, image_sha256=item.image_sha256, faces=item.faces,
                             ok=item.ok, reason=item.reason, size=size, mtime_ns=mtime_ns, indexed_at=utcnow()))


def folder_claims(s: Session, real: Path, *, exclude: str | None = None) -> list[str]:
    """The galleries whose registered folder is `real`, lies inside it or around it (`exclude`: not this one)."""
    folders = s.execute(select(Gallery.name, Gallery.folder).where(Gallery.folder.is_not(None))).all()
    claims = [(name, Path(folder)) for name, folder in folders if folder is not None and name != exclude]
    return [name for name, folder in claims
            if real == folder or real.is_relative_to(folder) or folder.is_relative_to(real)]


def record_erasure(s: Session, job: Job, chunk: JobChunk) -> int:
    """Mark what an erasure job's chunk erased from the gallery's current generation, with who and when;
    called before the inventory forgets it (its content hash and size come from there). The count marked."""
    rows = select(GalleryImage).where(GalleryImage.gallery == job.gallery)
    if not chunk.whole_gallery:
        rows = rows.where(GalleryImage.path.in_(chunk.paths))
    known = {r.path: r for r in s.scalars(rows).all()}
    paths = sorted(known) if chunk.whole_gallery else list(chunk.paths)
    for path in paths:
        image = known.get(path)
        s.merge(ErasedImage(gallery=job.gallery, path=path, image_sha256=image.image_sha256 if image else None,
                            size=image.size if image else None, erased_at=utcnow(), erased_by=job.submitter,
                            api_key_id=job.api_key_id, job_id=job.id))
    return len(paths)


def record_face_erasure(s: Session, job: Job, faces: Iterable[ErasedFaceOut]) -> int:
    """Mark the faces an erasure by id deleted (where each was in its image, never its vector), with who and
    when: every later index of that image leaves the face at that place out. The count marked."""
    count = 0
    for face in faces:
        s.add(ErasedFace(gallery=job.gallery, path=face.path, face_id=face.face_id, box=list(face.box),
                         image_sha256=face.image_sha256, erased_at=utcnow(), erased_by=job.submitter,
                         api_key_id=job.api_key_id, job_id=job.id))
        count += 1
    return count


def erased_boxes_for(s: Session, gallery: str, paths: Iterable[str]) -> dict[str, list[list[float]]]:
    """The boxes of the faces deleted by id from each of these images, for the index chunks that read them."""
    # A path that is not UTF-8 text is never stored (its face ids are), so none of its faces has a row here.
    wanted = sorted(p for p in set(paths) if is_text_path(p))
    found: dict[str, list[list[float]]] = {}
    for i in range(0, len(wanted), 500):
        rows = s.execute(select(ErasedFace.path, ErasedFace.box).where(ErasedFace.gallery == gallery,
                                                                       ErasedFace.path.in_(wanted[i : i + 500])))
        for path, box in rows:
            found.setdefault(path, []).append(list(box))
    return found


@dataclass(frozen=True)
class Erased:
    path: str
    image_sha256: str | None
    erased_at: datetime
    erased_by: str


class ErasedMarks:
    """A gallery's erased images, to tell which of some files an index job must leave out: the same path,
    or the same content under another name (hashed only when its size is that of an erased image)."""

    def __init__(self, s: Session, gallery: str) -> None:
        rows = s.scalars(select(ErasedImage).where(ErasedImage.gallery == gallery)).all()
        self.by_path = {r.path: Erased(r.path, r.image_sha256, r.erased_at, r.erased_by) for r in rows}
        self.by_sha = {m.image_sha256: m for m in self.by_path.values() if m.image_sha256}
        self.sizes = {r.size for r in rows if r.image_sha256}

    def __bool__(self) -> bool:
        return bool(self.by_path)

    def match(self, path: str | Path) -> Erased | None:
        mark = self.by_path.get(str(path))
        if mark is not None or not self.by_sha:
            return mark
        try:
            if None not in self.sizes and Path(path).stat().st_size not in self.sizes:
                return None
            return self.by_sha.get(sha256_file(Path(path)))
        except OSError:
            return None


def erased_reason(mark: Erased, path: str, gallery_label: str) -> str:
    """What an erased image's item says: when, by whom, and how to bring it back."""
    what = "erased" if mark.path == path else f"the same image as {mark.path}, which was erased"
    return (f"not indexed: {what} on {mark.erased_at:%Y-%m-%d} by {mark.erased_by}; re-enrol it with "
            f"`facegate gallery enrol {gallery_label} {shlex.quote(path)}`")


def leave_out_erased(s: Session, gallery: str, gallery_label: str,
                     paths: Iterable[str]) -> tuple[list[str], list[ItemOutcome]]:
    """The paths to index, and an item (not indexed, with the reason) for each erased one among them."""
    marks = ErasedMarks(s, gallery)
    paths = list(paths)
    if not marks:
        return paths, []
    kept, erased = [], []
    for path in paths:
        mark = marks.match(path) if is_text_path(path) else None  # a name not UTF-8: the worker refuses it
        if mark is None:
            kept.append(path)
        else:
            erased.append(ItemOutcome(path=path, ok=True, faces=0, image_sha256=mark.image_sha256,
                                      reason=erased_reason(mark, path, gallery_label)))
    return kept, erased


def forget_inventory(s: Session, gallery: str, chunk: JobChunk) -> None:
    rows = select(GalleryImage).where(GalleryImage.gallery == gallery)
    if not chunk.whole_gallery:
        rows = rows.where(GalleryImage.path.in_(chunk.paths))
    for row in s.scalars(rows).all():
        s.delete(row)


def forget_faces(s: Session, gallery: str, items) -> None:
    """Single faces erased by id: each item names the image the face was in; its count goes down."""
    for item in items:
        if item.ok and item.faces:
            row = s.get(GalleryImage, (gallery, item.path))
            if row is not None:
                row.faces = max(0, (row.faces or 0) - item.faces)


def finish_rebuild(gallery: Gallery, job: Job) -> int | None:
    """When `job` was the rebuild of `gallery` into a new generation: switch searches to it if it succeeded
    (else keep the old one), and return the generation to erase now; None when `job` was no rebuild."""
    rebuild = (job.params or {}).get("rebuild_generation")
    if rebuild is None or gallery.building_generation != rebuild:
        return None
    old_generation = gallery.generation
    if job.state in (JobState.DONE, JobState.PARTLY_FAILED):
        # Searches switch only now, to a complete collection; the old one is then erased.
        gallery.generation = rebuild
        gallery.model_version = gallery.building_model_version or job.model_version
        retired = old_generation
    else:
        retired = rebuild  # a failed rebuild leaves the old generation in place
    gallery.building_generation = gallery.building_model_version = None
    return retired
