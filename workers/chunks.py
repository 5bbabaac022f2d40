"""The work of one chunk, as plain functions: testable without a broker, called by the thin Celery tasks."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from facegate.messages import ChunkResult, EraseChunk, IndexChunk, ItemOutcome, Match, ProbeFace, SearchChunk, collection_key
from facegate.paths import PathRefused, confine
from index import FaceRecord, GalleryNotFound, GalleryStore, ModelVersionMismatch
from workers.pipeline import FacePipeline, ProgressCallback


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


def run_index_chunk(message: IndexChunk, pipeline: FacePipeline, store: GalleryStore, roots: Sequence[Path],
                    on_progress: ProgressCallback | None = None) -> ChunkResult:
    started = _now()
    result = ChunkResult(job_id=message.job_id, chunk_no=message.chunk_no, kind="index",
                         model_version=pipeline.model_version, untrained=pipeline.untrained, started_at=started)
    gallery = collection_key(message.gallery, message.generation)
    try:
        # Before any pixel is read: a gallery of another model version must not receive these vectors.
        store.ensure_gallery(gallery, pipeline.model_version)
    except ModelVersionMismatch as exc:
        result.items = [ItemOutcome(path=p, ok=False, reason=str(exc)) for p in message.paths]
        result.finished_at = _now()
        return result

    paths, refused = _confined(message.paths, roots)
    images, outcomes = pipeline.analyse(paths, on_progress=on_progress)
    records = [
        FaceRecord(gallery=gallery, image_path=img.path, image_sha256=img.sha256, face_no=n,
                   box=face.box, probability=face.probability, landmarks=face.landmarks,
                   model_version=pipeline.model_version, vector=img.embeddings[n])
        for img in images
        for n, face in enumerate(img.faces)
    ]
    store.upsert_faces(records)
    # A file whose content changed keeps its path: the faces of its old content go.
    store.delete_stale_versions(gallery, {img.path: img.sha256 for img in images})
    result.items = refused + outcomes
    result.finished_at = _now()
    return result


def run_search_chunk(message: SearchChunk, pipeline: FacePipeline, store: GalleryStore, roots: Sequence[Path],
                     on_progress: ProgressCallback | None = None) -> ChunkResult:
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
    faces = [(img, n, face) for img in images for n, face in enumerate(img.faces)]
    vectors = np.stack([img.embeddings[n] for img, n, _ in faces]) if faces else np.empty((0, 512), np.float32)
    hits = store.search(gallery, vectors, model_version=pipeline.model_version,
                        top_k=message.top_k, threshold=message.threshold)
    result.probes = [
        ProbeFace(path=img.path, face_no=n, box=list(face.box), probability=face.probability,
                  matches=[Match(face_id=m.face_id, image_path=m.image_path, image_sha256=m.image_sha256,
                                 similarity=m.similarity, box=m.box) for m in matches])
        for (img, n, face), matches in zip(faces, hits)
    ]
    result.items = refused + outcomes
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
    else:
        result.items = [ItemOutcome(path=p, ok=True, faces=store.delete_image(gallery, image_path=p))
                        for p in message.paths]
    result.finished_at = _now()
    return result
