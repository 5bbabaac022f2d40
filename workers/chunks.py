"""The work of one chunk, as plain functions: testable without a broker, called by the thin Celery tasks."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from facegate.messages import ChunkResult, EraseChunk, ErasedFaceOut, IndexChunk, ItemOutcome, Match, ProbeFace, SearchChunk, collection_key
from facegate.paths import PathRefused, confine
from index import FaceRecord, GalleryNotFound, GalleryStore, ModelVersionMismatch
from policy.quality import QualityFloor, check_quality
from workers.pipeline import AnalysedImage, FacePipeline, ProgressCallback


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _confined(paths: Sequence[str], roots: Sequence[Path]) -> tuple[list[str], list[ItemOutcome]]:
    """The worker checks confinement again: a message on the broker is not trusted to be from the scheduler."""
    allowed, refused = [], []
    for path in paths:
        try:
            confine(path, roots)
            allowed.append(path)
        except PathRefused as exc:
            refused.append(ItemOutcome(path=path, ok=False, reason=str(exc)))
    return allowed, refused


def _judged(images: list[AnalysedImage], floor: QualityFloor | None, who: str) -> dict[tuple[str, int], str]:
    """(path, face_no) -> why the face is below `floor`, for every face that is; {} without a floor."""
    if floor is None or floor.empty:
        return {}
    below = {}
    for img in images:
        for n, _face in enumerate(img.faces):
            if n >= len(img.qualities):
                below[(img.path, n)] = f"face quality was not measured; {who} states a quality floor"
                continue
            verdict = check_quality(img.qualities[n], floor, who)
            if not verdict.passed:
                below[(img.path, n)] = "; ".join(verdict.reasons)
    return below


def _explain(outcomes: list[ItemOutcome], images: list[AnalysedImage], below: dict[tuple[str, int], str],
             what: str) -> list[ItemOutcome]:
    """Each image's item says which of its faces were left out and why; an image none of whose faces
    passed fails as an item."""
    if not below:
        return outcomes
    faces_of = {img.path: len(img.faces) for img in images}
    explained = []
    for item in outcomes:
        left_out = [(n, why) for (path, n), why in sorted(below.items()) if path == item.path]
        if not item.ok or not left_out:
            explained.append(item)
            continue
        kept = faces_of.get(item.path, 0) - len(left_out)
        reason = "; ".join(f"face {n} {what}: {why}" for n, why in left_out)
        explained.append(item.model_copy(update={"ok": kept > 0, "reason": reason, "faces": kept}))
    return explained


# A detected face is the face deleted by id from the same image when their boxes overlap by at least this
# intersection over union: PASCAL VOC's criterion for two boxes being one detection. What changes an image
# while keeping its people (re-saved, retouched, metadata edited) leaves each face where it was, and the
# detector's jitter between runs is far below it, while two different faces of one photo barely overlap.
# Boxes, not embeddings: an erased face's vector is not kept anywhere (keeping it would undo the erasure).
SAME_FACE_IOU = 0.5


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, ax2, ay2 = (float(v) for v in a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in b[:4])
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def same_face(box: Sequence[float], erased: Sequence[Sequence[float]]) -> bool:
    """Whether a detected face is one of the faces deleted by id from its image (by where they were)."""
    return any(box_iou(box, e) >= SAME_FACE_IOU for e in erased)


def _erased_faces(images: list[AnalysedImage], erased_boxes: dict[str, list[list[float]]]) -> set[tuple[str, int]]:
    return {(img.path, n) for img in images for n, face in enumerate(img.faces)
            if erased_boxes.get(img.path) and same_face(face.box, erased_boxes[img.path])}


def _say_erased(outcomes: list[ItemOutcome], erased: set[tuple[str, int]]) -> list[ItemOutcome]:
    """An image some of whose faces were deleted by id: its item counts the others and says which stayed out
    (not a failure: the owner erased them)."""
    said = []
    for item in outcomes:
        left_out = sorted(n for path, n in erased if path == item.path)
        if not item.ok or not left_out:
            said.append(item)
            continue
        note = "; ".join(f"face {n} not indexed: deleted by id before" for n in left_out)
        said.append(item.model_copy(update={"faces": max(0, item.faces - len(left_out)),
                                            "reason": f"{item.reason}; {note}" if item.reason else note}))
    return said


def run_index_chunk(message: IndexChunk, pipeline: FacePipeline, store: GalleryStore, roots: Sequence[Path],
                    on_progress: ProgressCallback | None = None,
                    quality_filter: QualityFloor | None = None) -> ChunkResult:
    """Index the chunk's images; with `quality_filter` (the message's named enrolment filter, looked up in
    the registry by the caller), faces below it are not enrolled and their image's item says why."""
    started = _now()
    result = ChunkResult(job_id=message.job_id, chunk_no=message.chunk_no, kind="index",
                         model_version=pipeline.model_version, untrained=pipeline.untrained, started_at=started)
    gallery = collection_key(message.gallery, message.generation)
    try:
        # Before any pixel is read: a gallery of another model version must not receive these vectors.
        store.ensure_gallery(gallery, pipeline.model_version, dimension=pipeline.dimension)
    except ModelVersionMismatch as exc:
        result.items = [ItemOutcome(path=p, ok=False, reason=str(exc)) for p in message.paths]
        result.finished_at = _now()
        return result

    paths, refused = _confined(message.paths, roots)
    images, outcomes = pipeline.analyse(paths, on_progress=on_progress)
    erased = _erased_faces(images, message.erased_boxes)
    below = {k: v for k, v in _judged(images, quality_filter, f"gallery filter '{message.quality_filter}'").items()
             if k not in erased}
    records = [
        FaceRecord(gallery=gallery, image_path=img.path, image_sha256=img.sha256, face_no=n,
                   box=face.box, probability=face.probability, landmarks=face.landmarks,
                   model_version=pipeline.model_version, vector=img.embeddings[n],
                   external_id=message.external_ids.get(img.path, ""))
        for img in images
        for n, face in enumerate(img.faces)
        if (img.path, n) not in below and (img.path, n) not in erased
    ]
    store.upsert_faces(records)
    # A file whose content changed keeps its path: the faces of its old content go.
    store.delete_stale_versions(gallery, {img.path: img.sha256 for img in images})
    result.items = refused + _say_erased(_explain(outcomes, images, below, "not enrolled"), erased)
    result.finished_at = _now()
    return result


def run_search_chunk(message: SearchChunk, pipeline: FacePipeline, store: GalleryStore, roots: Sequence[Path],
                     on_progress: ProgressCallback | None = None, quality_floor: QualityFloor | None = None,
                     floor_owner: str = "the purpose") -> ChunkResult:
    """Search each probe face; a face below `quality_floor` (the purpose's, named `floor_owner` in reasons)
    is not searched: it is reported with its quality and why, and its image's item says so."""
    started = _now()
    result = ChunkResult(job_id=message.job_id, chunk_no=message.chunk_no, kind="search",
                         model_version=pipeline.model_version, untrained=pipeline.untrained, started_at=started)
    gallery = collection_key(message.gallery, message.generation)
    try:
        gallery_version = store.model_version(gallery)
    except GalleryNotFound as exc:
        result.error = str(exc)
        result.finished_at = _now()
        return result
    if gallery_version != pipeline.model_version:
        # Refused before any probe is embedded: a similarity across models means nothing.
        result.error = (f"gallery {message.gallery!r} was embedded by model version {gallery_version!r}, "
                        f"this worker embeds with {pipeline.model_version!r}: not compared")
        result.finished_at = _now()
        return result

    paths, refused = _confined(message.paths, roots)
    images, outcomes = pipeline.analyse(paths, aligned=message.aligned, on_progress=on_progress)
    below = _judged(images, quality_floor, floor_owner)
    faces = [(img, n, face) for img in images for n, face in enumerate(img.faces) if (img.path, n) not in below]
    vectors = np.stack([img.embeddings[n] for img, n, _ in faces]) if faces else np.empty((0, pipeline.dimension), np.float32)
    hits = store.search(gallery, vectors, model_version=pipeline.model_version,
                        top_k=message.top_k, threshold=message.threshold)
    searched = {(img.path, n): matches for (img, n, _), matches in zip(faces, hits)}
    result.probes = [
        ProbeFace(path=img.path, face_no=n, box=list(face.box), probability=face.probability,
                  quality=img.qualities[n].model_dump() if n < len(img.qualities) else None,
                  not_searched=below.get((img.path, n)),
                  matches=[Match(face_id=m.face_id, image_path=m.image_path, image_sha256=m.image_sha256,
                                 similarity=m.similarity, box=m.box, external_id=m.external_id)
                           for m in searched.get((img.path, n), [])])
        for img in images for n, face in enumerate(img.faces)
    ]
    result.items = refused + _explain(outcomes, images, below, "not searched")
    result.finished_at = _now()
    return result


def run_erase_chunk(message: EraseChunk, store: GalleryStore) -> ChunkResult:
    """Delete the named images' faces (or the whole gallery generation); report faces removed per image."""
    started = _now()
    gallery = collection_key(message.gallery, message.generation)
    result = ChunkResult(job_id=message.job_id, chunk_no=message.chunk_no, kind="erase", started_at=started)
    if message.whole_gallery:
        faces = store.count(gallery) if store.has_gallery(gallery) else 0
        store.drop_gallery(gallery)
        result.items = [ItemOutcome(path=f"gallery:{gallery}", ok=True, faces=faces)]
    elif not store.has_gallery(gallery):
        result.items = [ItemOutcome(path=p, ok=True, faces=0) for p in message.paths]
        result.items += [ItemOutcome(path=f"face:{f}", ok=False, reason=f"no face {f} in gallery {message.gallery!r}")
                         for f in message.face_ids]
    elif message.face_ids:
        # One face by id: its item names the image it was in, so the inventory's count follows.
        deleted = {f.face_id: f for f in store.delete_faces(gallery, message.face_ids)}
        result.erased_faces = [ErasedFaceOut(face_id=f.face_id, path=f.image_path, image_sha256=f.image_sha256,
                                             box=list(f.box)) for f in deleted.values()]
        result.items = [ItemOutcome(path=deleted[f].image_path, ok=True, faces=1, image_sha256=deleted[f].image_sha256)
                        if f in deleted else
                        ItemOutcome(path=f"face:{f}", ok=False, reason=f"no face {f} in gallery {message.gallery!r}")
                        for f in message.face_ids]
    else:
        result.items = [ItemOutcome(path=p, ok=True, faces=store.delete_image(gallery, image_path=p))
                        for p in message.paths]
    result.finished_at = _now()
    return result
