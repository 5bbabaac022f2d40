"""Galleries: registration, ownership and grants, counts, erasure, and incremental reindexing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from facegate.db import session_scope
from facegate.paths import PathRefused, confine, confined_images
from scheduler.keys import Principal
from scheduler.models import Gallery, GalleryGrant, GalleryImage, JobKind
from scheduler.service import SYSTEM_ORGANISATION, ChunkSpec, JobRefused, JobService, JobView

SYSTEM_PRINCIPAL = Principal(SYSTEM_ORGANISATION, None)
REINDEX_PURPOSE = "system-reindex"


class GalleryNotFound(LookupError):
    pass


class GalleryExists(ValueError):
    pass


@dataclass
class GalleryInfo:
    name: str
    owner: str
    folder: str | None
    nightly: bool
    model_version: str | None
    generation: int
    rebuilding: bool
    images: int
    failed_images: int
    faces: int
    created_at: datetime
    last_indexed_at: datetime | None
    last_reindex_at: datetime | None
    granted_to: list[str] = field(default_factory=list)


@dataclass
class ReindexPlan:
    new: list[str]
    changed: list[str]
    deleted: list[str]
    unchanged: int
    rebuild: bool

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted or self.rebuild)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class GalleryService:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.db_url = jobs.db_url

    # Access -------------------------------------------------------------------------------------

    def _visible(self, s, name: str, principal: Principal, *, owner_only: bool = False) -> Gallery:  # noqa: ANN001
        """The gallery if this organisation owns it (or, for reading, was granted it); else not found."""
        row = s.get(Gallery, name)
        if row is None:
            raise GalleryNotFound(f"no gallery {name!r}")
        org = principal.organisation_id
        if org in (row.owner, SYSTEM_ORGANISATION):
            return row
        if not owner_only and s.get(GalleryGrant, (name, org)) is not None:
            return row
        raise GalleryNotFound(f"no gallery {name!r}")  # another's gallery does not exist for you

    # Registration -------------------------------------------------------------------------------

    def register(self, principal: Principal, name: str, folder: str | Path, *, nightly: bool = False) -> GalleryInfo:
        name = JobService._gallery(name)
        try:
            real = confine(folder, self.settings.resolved_gallery_roots)
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        if not real.is_dir():
            raise JobRefused(f"{folder} is not a directory")
        with session_scope(self.db_url) as s:
            if s.get(Gallery, name) is not None:
                raise GalleryExists(f"gallery {name!r} already exists")
            s.add(Gallery(name=name, owner=principal.organisation_id, folder=str(real), nightly=nightly))
        self.jobs.audit.append("gallery.registered", organisation_id=principal.organisation_id,
                               api_key_id=principal.key_id, gallery=name,
                               detail={"folder": str(real), "nightly": nightly})
        return self.show(principal, name)

    def grant(self, principal: Principal, name: str, organisation_id: str) -> None:
        with session_scope(self.db_url) as s:
            self._visible(s, name, principal, owner_only=True)
            s.merge(GalleryGrant(gallery=name, organisation_id=organisation_id, granted_by=principal.organisation_id))
        self.jobs.audit.append("gallery.granted", organisation_id=principal.organisation_id,
                               api_key_id=principal.key_id, gallery=name, detail={"to": organisation_id})

    def list(self, principal: Principal) -> list[GalleryInfo]:
        with session_scope(self.db_url) as s:
            granted = select(GalleryGrant.gallery).where(GalleryGrant.organisation_id == principal.organisation_id)
            query = select(Gallery.name).order_by(Gallery.name)
            if principal.organisation_id != SYSTEM_ORGANISATION:
                query = query.where((Gallery.owner == principal.organisation_id) | Gallery.name.in_(granted))
            names = s.scalars(query).all()
        return [self.show(principal, n) for n in names]

    def show(self, principal: Principal, name: str) -> GalleryInfo:
        with session_scope(self.db_url) as s:
            row = self._visible(s, name, principal)
            images, faces = s.execute(select(func.count(), func.coalesce(func.sum(GalleryImage.faces), 0))
                                      .where(GalleryImage.gallery == name, GalleryImage.ok.is_(True))).one()
            failed = s.scalar(select(func.count()).where(GalleryImage.gallery == name, GalleryImage.ok.is_(False)))
            grants = s.scalars(select(GalleryGrant.organisation_id).where(GalleryGrant.gallery == name)).all()
            return GalleryInfo(name=row.name, owner=row.owner, folder=row.folder, nightly=row.nightly,
                               model_version=row.model_version, generation=row.generation,
                               rebuilding=row.building_generation is not None, images=images, failed_images=failed,
                               faces=int(faces), created_at=row.created_at, last_indexed_at=row.last_indexed_at,
                               last_reindex_at=row.last_reindex_at, granted_to=list(grants))

    # Erasure ------------------------------------------------------------------------------------

    def erase(self, principal: Principal, name: str, *, paths: list[str] | None = None,
              under: str | None = None) -> JobView:
        """Delete the vectors of named images, of every image under a folder, or (neither) of the gallery."""
        with session_scope(self.db_url) as s:
            row = self._visible(s, name, principal, owner_only=True)
            generations = [row.generation] + ([row.building_generation] if row.building_generation is not None else [])
            known = s.scalars(select(GalleryImage.path).where(GalleryImage.gallery == name)).all()
        if paths is None and under is None:
            specs = [ChunkSpec("erase", [], g, whole_gallery=True) for g in generations]
            scope = "gallery"
        else:
            if under is not None:
                prefix = str(Path(under).expanduser().resolve()).rstrip("/") + "/"
                targets = [p for p in known if p.startswith(prefix)]
                scope = f"under {prefix}"
            else:
                resolved = {str(Path(p).expanduser().resolve()) for p in paths}
                targets = [p for p in known if p in resolved] + sorted(resolved - set(known))
                scope = "images"
            if not targets:
                raise JobRefused(f"no indexed images of gallery {name!r} match {under or paths}")
            size = self.settings.index_chunk_size * 8
            specs = [ChunkSpec("erase", targets[i : i + size], g) for g in generations
                     for i in range(0, len(targets), size)]
        return self.jobs.queue_job(JobKind.ERASE, name, principal, "erasure", {"scope": scope}, specs,
                                   capability="erase")

    def delete(self, principal: Principal, name: str) -> JobView:
        """Erase every vector of the gallery, then forget it (its name can be registered again)."""
        job = self.erase(principal, name)
        with session_scope(self.db_url) as s:
            for grant in s.scalars(select(GalleryGrant).where(GalleryGrant.gallery == name)).all():
                s.delete(grant)
            s.delete(s.get(Gallery, name))
        return job

    # Reindexing ---------------------------------------------------------------------------------

    def plan_reindex(self, name: str, worker_model_version: str | None) -> ReindexPlan:
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, name)
            if row is None or row.folder is None:
                raise JobRefused(f"gallery {name!r} has no registered folder to reindex")
            folder = row.folder
            inventory = {r.path: r for r in s.scalars(select(GalleryImage).where(GalleryImage.gallery == name))}
            rebuild = bool(worker_model_version and row.model_version and worker_model_version != row.model_version)
        try:
            files = confined_images([folder], self.settings.resolved_gallery_roots)
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        new, changed, unchanged = [], [], 0
        for path in files:
            known = inventory.get(str(path))
            if known is None:
                new.append(str(path))
                continue
            stat = path.stat()
            if known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
                unchanged += 1
            elif known.image_sha256 != _sha256(path):  # touched: the content hash decides
                changed.append(str(path))
            else:
                unchanged += 1
        present = {str(p) for p in files}
        deleted = sorted(p for p in inventory if p not in present)
        if rebuild:  # a new model: everything is embedded again, into a new generation
            new, changed, unchanged = [str(p) for p in files], [], 0
        return ReindexPlan(new=new, changed=changed, deleted=deleted, unchanged=unchanged, rebuild=rebuild)

    def reindex(self, name: str, *, principal: Principal = SYSTEM_PRINCIPAL,
                worker_model_version: str | None = None) -> JobView:
        """Index new and changed files, erase deleted ones; on a model change, rebuild into a new generation."""
        plan = self.plan_reindex(name, worker_model_version)
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, name)
            target = row.generation
            if plan.rebuild:
                target = max(row.generation, row.building_generation or 0) + 1
                row.building_generation = target
            current = row.generation
        size = self.settings.index_chunk_size
        work = plan.new + plan.changed
        rebuild_model = worker_model_version if plan.rebuild else None
        specs = [ChunkSpec("index", work[i : i + size], target, model_version=rebuild_model)
                 for i in range(0, len(work), size)]
        specs += [ChunkSpec("erase", plan.deleted[i : i + size * 8], current)
                  for i in range(0, len(plan.deleted), size * 8)]
        params = {"new": len(plan.new), "changed": len(plan.changed), "deleted": len(plan.deleted),
                  "unchanged": plan.unchanged, "rebuild_generation": target if plan.rebuild else None,
                  "worker_model_version": worker_model_version}
        return self.jobs.queue_job(JobKind.REINDEX, name, principal, REINDEX_PURPOSE, params, specs,
                                   capability="index")

    def nightly_galleries(self) -> list[str]:
        with session_scope(self.db_url) as s:
            return list(s.scalars(select(Gallery.name).where(Gallery.nightly.is_(True), Gallery.folder.is_not(None))))
