"""The scheduler's record of a gallery's images and generations: what a finished chunk adds to or removes
from the inventory, and the swap to a rebuilt generation when its job ends."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from facegate.messages import ItemOutcome
from facegate.paths import is_text_path
from scheduler.models import Gallery, GalleryImage, Job, JobChunk, JobState, utcnow


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


def forget_inventory(s: Session, gallery: str, chunk: JobChunk) -> None:
    rows = select(GalleryImage).where(GalleryImage.gallery == gallery)
    if not chunk.whole_gallery:
        rows = rows.where(GalleryImage.path.in_(chunk.paths))
    for row in s.scalars(rows).all():
        s.delete(row)


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
