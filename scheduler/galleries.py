"""Galleries: registration, ownership and grants, counts, erasure, and incremental reindexing."""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.messages import collection_key
from facegate.paths import PathRefused, confine, confined_images
from facegate.vocabulary import AuditEvent, ChunkKind
from policy import ERASE_CAPABILITY
from scheduler.access import ADMIN_ORGANISATION, SYSTEM_ORGANISATION, Access, Action, GalleryHidden, load_policy
from scheduler.gate import ERASURE_PURPOSE
from scheduler.inventory import folder_claims, leave_out_erased
from scheduler.keys import Principal
from facegate.messages import ItemOutcome
from scheduler.labels import LabelsRefused, forget_labels, read_sidecar
from scheduler.models import ErasedFace, ErasedImage, Gallery, GalleryGrant, GalleryImage, JobKind
from scheduler.reading import JobNotFound
from scheduler.service import ChunkSpec, JobRefused, JobService, JobView

if TYPE_CHECKING:
    from index import StoredFace

SYSTEM_PRINCIPAL = Principal(SYSTEM_ORGANISATION, None)
REINDEX_PURPOSE = "system-reindex"


# Not found, or not this organisation's to know of: one answer for both (the access rule's).
GalleryNotFound = GalleryHidden


class GalleryExists(ValueError):
    pass


class FaceNotFound(JobNotFound):
    """No such face in the gallery (or not the asker's to know of): "not found", like a job."""


class StoreNotShared(RuntimeError):
    """This process cannot read the store (a Milvus Lite file the worker holds); says what to do."""


def _retention(row: Gallery, registry) -> dict:
    from scheduler.retention import gallery_schedule

    due = gallery_schedule(row, registry)
    return {"erase_at": due.erase_at, "days": due.days, "since": due.since, "basis": due.basis,
            "owner_days": row.retention_days, "reason": due.reason}


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
    quality_filter: str | None = None
    # Its retention schedule: when it is erased and on what basis (policy/retention.py).
    retention: dict | None = None
    granted_to: list[str] = field(default_factory=list)
    # The vector index its current generation is searched with (index.gallery_index); shown by `show` only.
    index: dict | None = None
    # Images erased and not indexed again until the owner re-enrols them (`enrol`).
    erased_images: int = 0


@dataclass
class ReindexPlan:
    new: list[str]
    changed: list[str]
    deleted: list[str]
    unchanged: int
    rebuild: bool
    # Files found that were erased (by path, or the same content under another name): items, not indexed.
    erased: list[ItemOutcome] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted or self.rebuild)


Erasures = list[dict]  # (named here: inside GalleryService, `list` is its method)


def _erased_dict(row: ErasedImage) -> dict:
    return {"path": row.path, "image_sha256": row.image_sha256, "erased_at": row.erased_at,
            "erased_by": row.erased_by, "job_id": row.job_id}


class GalleryService:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.db_url = jobs.db_url

    @property
    def access(self):
        return self.jobs.gate.access

    # Registration -------------------------------------------------------------------------------

    def register(self, principal: Principal, name: str, folder: str | Path, *, purpose: str,
                 nightly: bool = False) -> GalleryInfo:
        """Register a folder as a gallery of this organisation, for a purpose the policy lets it index for."""
        name = JobService._gallery(name)
        if self.access._gallery(principal, name, own_only=True) is not None:
            # Names are per organisation: only the asker's own galleries can clash.
            raise GalleryExists(f"your organisation already has a gallery {name!r} (reindex it with "
                                f"`facegate reindex {name}`, or register this folder under another name)")
        key = self.access.authorize(principal, Action.REGISTER, name, purpose=purpose).gallery
        images = self.jobs._readable(principal, [folder], Action.REGISTER, directory=True)
        real = Path(folder).expanduser().resolve()
        with session_scope(self.db_url) as s:
            if folder_claims(s, real):
                raise GalleryExists(f"{folder} is already registered to a gallery (or lies inside or around one)")
            s.add(Gallery(name=key, label=name, owner=principal.organisation_id, folder=str(real), nightly=nightly,
                          purpose=purpose))
        self.jobs.audit.append(AuditEvent.GALLERY_REGISTERED, organisation_id=principal.organisation_id,
                               **principal.actor, gallery=key, purpose=purpose,
                               detail={"name": name, "folder": str(real), "nightly": nightly, "images": len(images)})
        return self._info(key)

    # Grants -------------------------------------------------------------------------------------

    def grant(self, principal: Principal, name: str, organisation_id: str) -> None:
        """Let another organisation search this gallery (never reindex, erase or grant it onward)."""
        key = self.access.authorize(principal, Action.GRANT, name).gallery
        if organisation_id in (principal.organisation_id, SYSTEM_ORGANISATION, ADMIN_ORGANISATION) \
                or not organisation_id.strip():
            raise JobRefused(f"cannot grant gallery {name!r} to {organisation_id!r}")
        with session_scope(self.db_url) as s:
            s.merge(GalleryGrant(gallery=key, organisation_id=organisation_id, granted_by=principal.organisation_id))
        self.jobs.audit.append(AuditEvent.GALLERY_GRANTED, organisation_id=principal.organisation_id,
                               **principal.actor, gallery=key, detail={"name": name, "to": organisation_id})

    def revoke(self, principal: Principal, name: str, organisation_id: str) -> bool:
        """Withdraw a grant: True if there was one. Searches of that organisation stop at once."""
        key = self.access.authorize(principal, Action.GRANT, name).gallery
        with session_scope(self.db_url) as s:
            grant = s.get(GalleryGrant, (key, organisation_id))
            if grant is not None:
                s.delete(grant)
        self.jobs.audit.append(AuditEvent.GALLERY_GRANT_REVOKED, organisation_id=principal.organisation_id,
                               **principal.actor, gallery=key,
                               detail={"name": name, "from": organisation_id, "had_grant": grant is not None})
        return grant is not None

    def grants(self, principal: Principal, name: str) -> list[dict]:
        """The grants of a gallery (its owner's to see)."""
        key = self.access.authorize(principal, Action.GRANT, name).gallery
        with session_scope(self.db_url) as s:
            rows = s.scalars(select(GalleryGrant).where(GalleryGrant.gallery == key)
                             .order_by(GalleryGrant.organisation_id)).all()
            return [{"gallery": name, "organisation_id": r.organisation_id, "granted_by": r.granted_by,
                     "at": r.at} for r in rows]

    # builtins.list in annotations from here on: in this class, `list` is this method.
    def list(self, principal: Principal) -> builtins.list[GalleryInfo]:
        with session_scope(self.db_url) as s:
            granted = select(GalleryGrant.gallery).where(GalleryGrant.organisation_id == principal.organisation_id)
            query = select(Gallery.name).order_by(Gallery.name)
            if principal.organisation_id != SYSTEM_ORGANISATION:
                query = query.where((Gallery.owner == principal.organisation_id) | Gallery.name.in_(granted))
            names = s.scalars(query).all()
        return [self._info(n) for n in names]

    def show(self, principal: Principal, name: str) -> GalleryInfo:
        return self._info(self.access.authorize(principal, Action.READ, name).gallery, with_index=True)

    def _info(self, name: str, with_index: bool = False) -> GalleryInfo:
        with session_scope(self.db_url) as s:
            row = _row(s, name)
            index = None
            if with_index:
                from index import IndexPolicy, gallery_index  # pymilvus: only where one gallery is shown

                index = gallery_index(self.settings.resolved_milvus_uri, self.settings.milvus_token,
                                      collection_key(row.name, row.generation), IndexPolicy.from_settings(self.settings))
            images, faces = s.execute(select(func.count(), func.coalesce(func.sum(GalleryImage.faces), 0))
                                      .where(GalleryImage.gallery == name, GalleryImage.ok.is_(True))).one()
            failed = s.scalar(select(func.count()).where(GalleryImage.gallery == name, GalleryImage.ok.is_(False))) or 0
            grants = s.scalars(select(GalleryGrant.organisation_id).where(GalleryGrant.gallery == name)).all()
            erased = s.scalar(select(func.count()).where(ErasedImage.gallery == name)) or 0
            return GalleryInfo(name=row.label or row.name, owner=row.owner, folder=row.folder, nightly=row.nightly,
                               model_version=row.model_version, generation=row.generation,
                               rebuilding=row.building_generation is not None, images=images, failed_images=failed,
                               faces=int(faces), created_at=row.created_at, last_indexed_at=row.last_indexed_at,
                               last_reindex_at=row.last_reindex_at, quality_filter=row.quality_filter,
                               retention=_retention(row, load_policy(self.settings)), granted_to=list(grants),
                               index=index, erased_images=erased)

    # Erasure ------------------------------------------------------------------------------------

    def erase(self, principal: Principal, name: str, *, paths: builtins.list[str] | None = None,
              under: str | None = None) -> JobView:
        """Delete the vectors of named images, of every image under a folder, or (neither) of the gallery."""
        access = self.access.authorize(principal, Action.ERASE, name, purpose=ERASURE_PURPOSE)
        label, name = name, access.gallery
        with session_scope(self.db_url) as s:
            row = _row(s, name)
            generations = [row.generation] + ([row.building_generation] if row.building_generation is not None else [])
            known = s.scalars(select(GalleryImage.path).where(GalleryImage.gallery == name)).all()
        if paths is None and under is None:
            specs = [ChunkSpec(ChunkKind.ERASE, [], g, whole_gallery=True) for g in generations]
            scope = "gallery"
        else:
            if any("\x00" in p for p in [*(paths or []), under or ""]):
                raise JobRefused("an erasure path cannot contain a NUL byte")
            if under is not None:
                prefix = str(Path(under).expanduser().resolve()).rstrip("/") + "/"
                targets = [p for p in known if p.startswith(prefix)]
                scope = f"under {prefix}"
            else:
                resolved = {str(Path(p).expanduser().resolve()) for p in paths or []}
                targets = [p for p in known if p in resolved] + sorted(resolved - set(known))
                scope = "images"
            if not targets:
                raise JobRefused(f"no indexed images of gallery {label!r} match {under or paths}")
            size = self.settings.index_chunk_size * 8
            specs = [ChunkSpec(ChunkKind.ERASE, targets[i : i + size], g) for g in generations
                     for i in range(0, len(targets), size)]
        return self.jobs.queue_job(JobKind.ERASE, name, principal, ERASURE_PURPOSE, {"scope": scope}, specs,
                                   capability=ERASE_CAPABILITY, access=access, label=label)

    def erase_face(self, principal: Principal, name: str, face_id: str) -> JobView:
        """Delete one face by id (an erasure: the owner's only, never held back, audited like every erasure)."""
        if not re.fullmatch(r"[0-9a-f]{32}", face_id or ""):
            raise JobRefused(f"face id {face_id!r} is not a FaceGate face id (32 hexadecimal characters)")
        access = self.access.authorize(principal, Action.ERASE, name, purpose=ERASURE_PURPOSE)
        label, key = name, access.gallery
        with session_scope(self.db_url) as s:
            generation = _row(s, key).generation
        return self.jobs.queue_job(JobKind.ERASE, key, principal, ERASURE_PURPOSE, {"scope": f"face {face_id}"},
                                   [ChunkSpec(ChunkKind.ERASE, [], generation, face_ids=[face_id])],
                                   capability=ERASE_CAPABILITY, access=access, label=label)

    def faces(self, principal: Principal, name: str, *, offset: int = 0,
              limit: int = 100) -> tuple[int, Sequence[StoredFace]]:
        """(faces in all, one page of them) of the gallery's current generation: ids, image, box, external id."""
        from index import GalleryNotFound as StoreGalleryNotFound

        access = self.access.authorize(principal, Action.READ, name)

        def page(store, collection):
            try:
                return store.count(collection), store.list_faces(collection, offset=offset, limit=limit)
            except StoreGalleryNotFound:
                return 0, []  # registered, nothing indexed yet

        return self._read_store(access, page)

    def face(self, principal: Principal, name: str, face_id: str) -> tuple[Access, StoredFace]:
        """One face of the gallery's current generation by its id, with the access that read it (decided
        by the access rule: another organisation's gallery, or a face it does not hold, is not found)."""
        from index import GalleryNotFound as StoreGalleryNotFound

        access = self.access.authorize(principal, Action.READ, name)
        if not re.fullmatch(r"[0-9a-f]{32}", face_id or ""):
            raise FaceNotFound(f"no face {face_id} in gallery {name!r}")

        def one(store, collection):
            try:
                return store.get_faces(collection, [face_id])
            except StoreGalleryNotFound:
                return []

        found = self._read_store(access, one)
        if not found:
            raise FaceNotFound(f"no face {face_id} in gallery {name!r}")
        return access, found[0]

    def _read_store(self, access: Access, read):
        """`read(store, collection)` on the gallery's current generation, from this process.

        It needs a store it may share with the workers (a Milvus or `milvus-lite server` URI); a Milvus Lite
        file belongs to the one worker process that opened it."""
        from index import GalleryStore

        uri = self.settings.resolved_milvus_uri
        if "://" not in uri:
            raise StoreNotShared("reading faces reads the store from the API process, and a Milvus Lite file "
                                 "belongs to the worker: serve it with `milvus-lite server` (or use a Milvus "
                                 "server) and set FACEGATE_MILVUS_URI to its http:// URI")
        assert access.gallery is not None  # decided for a gallery: its key
        store = GalleryStore(uri)
        try:
            return read(store, collection_key(access.gallery, access.generation))
        finally:
            store.close()

    def delete(self, principal: Principal, name: str) -> JobView:
        """Erase every vector of the gallery, then forget it (its name can be registered again)."""
        key = self.access._gallery(principal, name)
        job = self.erase(principal, name)
        name = key.name
        with session_scope(self.db_url) as s:
            for grant in s.scalars(select(GalleryGrant).where(GalleryGrant.gallery == name)).all():
                s.delete(grant)
            # Forgotten with it: a folder registered again later is a new gallery, decided afresh.
            for mark in s.scalars(select(ErasedImage).where(ErasedImage.gallery == name)).all():
                s.delete(mark)
            for face in s.scalars(select(ErasedFace).where(ErasedFace.gallery == name)).all():
                s.delete(face)
            forget_labels(s, name)
            s.delete(_row(s, name))
        return job

    # Re-enrolment --------------------------------------------------------------------------------

    def enrol(self, principal: Principal, name: str, paths: Sequence[str]) -> Erasures:
        """Re-enrol erased images: the owner's explicit decision, audited. Each path names an erased image
        (the path it was erased at, a folder holding such paths, or a readable file of the same content);
        its erased mark goes, and the next index or reindex indexes it again. The marks removed."""
        key = self.access.authorize(principal, Action.ENROL, name).gallery
        if not paths:
            raise JobRefused("name the erased images to re-enrol (paths, or a folder)")
        if any("\x00" in p for p in paths):
            raise JobRefused("a path to re-enrol cannot contain a NUL byte")
        wanted = {str(Path(p).expanduser().resolve()) for p in paths}
        with session_scope(self.db_url) as s:
            sizes = {size for size, sha in s.execute(select(ErasedImage.size, ErasedImage.image_sha256)
                                                      .where(ErasedImage.gallery == key)) if sha}
        digests: set[str] = set()
        for given in paths:
            try:  # a file the owner may read: its content finds a mark made under another name
                readable = self.access.readable_paths(principal, [given], action=Action.ENROL)
            except PathRefused:
                continue
            digests.update(sha256_file(p) for p in readable if None in sizes or p.stat().st_size in sizes)
        with session_scope(self.db_url) as s:
            marks = s.scalars(select(ErasedImage).where(ErasedImage.gallery == key)).all()
            chosen = [m for m in marks if m.path in wanted or any(m.path.startswith(w.rstrip("/") + "/") for w in wanted)
                      or (m.image_sha256 is not None and m.image_sha256 in digests)]
            if not chosen:
                raise JobRefused(f"no erased image of gallery {name!r} matches {', '.join(paths)}")
            removed = [_erased_dict(m) for m in chosen]
            for mark in chosen:
                s.delete(mark)
            # Re-enrolling an image brings back the faces deleted from it by id too.
            erased_paths = {m.path for m in chosen}
            for face in s.scalars(select(ErasedFace).where(ErasedFace.gallery == key)).all():
                if face.path in erased_paths:
                    s.delete(face)
        self.jobs.audit.append(AuditEvent.GALLERY_REENROLLED, organisation_id=principal.organisation_id,
                               **principal.actor, gallery=key, capability=Action.ENROL.value, allowed=True,
                               detail={"name": name, "count": len(removed), "asked": list(paths)[:100],
                                       "images": [{k: str(v) if k == "erased_at" else v for k, v in m.items()}
                                                  for m in removed][:1000]})
        return removed

    # Reindexing ---------------------------------------------------------------------------------

    def plan_reindex(self, name: str, worker_model_version: str | None) -> ReindexPlan:
        """What a reindex does: the gallery's folder listed again, and every image it holds already looked at
        where it lies (a gallery made by index jobs, or fed from more than one folder, is reindexed too)."""
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, name)
            if row is None:
                raise JobRefused(f"no gallery {name!r} to reindex")
            folder, owner, label = row.folder, row.owner, row.label or row.name
            inventory = {r.path: r for r in s.scalars(select(GalleryImage).where(GalleryImage.gallery == name))}
            rebuild = bool(worker_model_version and row.model_version and worker_model_version != row.model_version)
        if folder is None and not inventory:
            raise JobRefused(f"gallery {name!r} has no folder and no images to reindex: index a folder into it")
        # The owner's roots: a gallery never reaches into another organisation's uploads.
        roots = self.settings.roots_for(owner)
        try:
            files = confined_images([folder], roots) if folder is not None else []
        except PathRefused as exc:
            raise JobRefused(str(exc)) from None
        present = {str(p) for p in files}
        deleted, kept = [], 0
        for known_path in sorted(set(inventory) - present):
            if not Path(known_path).is_file():
                deleted.append(known_path)  # gone from disk: its vectors go too
                continue
            try:  # still there, outside the folder: looked at again, if the owner may still read it
                files.append(confine(known_path, roots))
            except PathRefused:
                kept += 1  # no longer readable (the roots changed): left as it is, neither read nor erased
        new, changed, unchanged = [], [], kept
        for path in files:
            known = inventory.get(str(path))
            if known is None:
                new.append(str(path))
                continue
            stat = path.stat()
            if known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
                unchanged += 1
            elif known.image_sha256 != sha256_file(path):  # touched: the content hash decides
                changed.append(str(path))
            else:
                unchanged += 1
        if rebuild:  # a new model: everything is embedded again, into a new generation
            new, changed, unchanged = [str(p) for p in files], [], kept
        # Erased images stay erased (by path, or a copy by content) until their owner re-enrols them.
        with session_scope(self.db_url) as s:
            work, erased = leave_out_erased(s, name, label, new + changed)
        left_out = {i.path for i in erased}
        new, changed = [p for p in new if p not in left_out], [p for p in changed if p not in left_out]
        assert len(work) == len(new) + len(changed)
        return ReindexPlan(new=new, changed=changed, deleted=deleted, unchanged=unchanged, rebuild=rebuild,
                           erased=erased)

    def reindex(self, name: str, *, principal: Principal, purpose: str | None = None,
                worker_model_version: str | None = None) -> JobView:
        """Index new and changed files, erase deleted ones; on a model change, rebuild into a new generation.

        Decided for the organisation that asked (the owner, for its purpose or the gallery's), or, for the
        system submitter, for the owner it acts on behalf of: a moratorium on the owner stops it."""
        import uuid

        job_id = uuid.uuid4().hex
        access = self.access.authorize(principal, Action.REINDEX, name, purpose=purpose, job_id=job_id,
                                       raise_on_denial=False)
        name = access.gallery
        purpose = access.purpose if principal.organisation_id != SYSTEM_ORGANISATION else REINDEX_PURPOSE
        if not access.allowed:
            return self.jobs.queue_job(JobKind.REINDEX, name, principal, purpose or REINDEX_PURPOSE, {}, [],
                                       capability="index", access=access, job_id=job_id)
        plan = self.plan_reindex(name, worker_model_version)
        with session_scope(self.db_url) as s:
            row = _row(s, name)
            folder, owner = row.folder, row.owner
        try:  # the folder's sidecar file: labels for its images, kept for every index of them from now on
            labels = read_sidecar(folder, self.settings.roots_for(owner)) if folder is not None else {}
        except LabelsRefused as exc:
            raise JobRefused(f"gallery {name!r}: {exc}") from None
        with session_scope(self.db_url) as s:
            row = _row(s, name)
            target = row.generation
            if plan.rebuild:
                target = max(row.generation, row.building_generation or 0) + 1
                row.building_generation = target
            current = row.generation
            quality_filter = row.quality_filter
        size = self.settings.index_chunk_size
        work = plan.new + plan.changed
        rebuild_model = worker_model_version if plan.rebuild else None
        specs = [ChunkSpec(ChunkKind.INDEX, work[i : i + size], target, model_version=rebuild_model)
                 for i in range(0, len(work), size)]
        specs += [ChunkSpec(ChunkKind.ERASE, plan.deleted[i : i + size * 8], current)
                  for i in range(0, len(plan.deleted), size * 8)]
        params = {"new": len(plan.new), "changed": len(plan.changed), "deleted": len(plan.deleted),
                  "unchanged": plan.unchanged, "erased": len(plan.erased),
                  "rebuild_generation": target if plan.rebuild else None,
                  "worker_model_version": worker_model_version, "quality_filter": quality_filter}
        return self.jobs.queue_job(JobKind.REINDEX, name, principal, purpose, params, specs, capability="index",
                                   access=access, job_id=job_id, not_sent=plan.erased, labels=labels)

    def nightly_galleries(self) -> builtins.list[str]:
        with session_scope(self.db_url) as s:
            return list(s.scalars(select(Gallery.name).where(Gallery.nightly.is_(True), Gallery.folder.is_not(None))))


def _row(s: Session, key: str) -> Gallery:
    """A gallery the caller was just authorised for; hidden only if it was erased since."""
    row = s.get(Gallery, key)
    if row is None:
        raise GalleryHidden(f"no gallery {key!r}")
    return row
