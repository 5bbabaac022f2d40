"""Typed messages that cross the queue between the scheduler and the workers.

They carry ids, paths and small results: never pixels, never embeddings.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

# The only names the scheduler and the workers share besides these models.
INDEX_CHUNK_TASK = "facegate.index_chunk"
SEARCH_CHUNK_TASK = "facegate.search_chunk"
# Embed the two images of each pair and return their cosine similarity (evaluation, capability `compare`).
COMPARE_PAIRS_TASK = "facegate.compare_pairs"
ERASE_CHUNK_TASK = "facegate.erase_chunk"
MODEL_INFO_TASK = "facegate.model_info"
NIGHTLY_REINDEX_TASK = "facegate.nightly_reindex"
RETENTION_TASK = "facegate.retention_sweep"
RECONCILE_TASK = "facegate.reconcile_jobs"


# fullmatch, never match with `$`: `$` also matches before a trailing newline.
GALLERY_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# A name a caller gives is at most 56 characters; the store's key for it may carry a 8-character suffix.
MAX_GALLERY_NAME = 56
# A rebuilt gallery lives in a collection of a new generation: "<gallery>__g<n>".
GENERATION_SEPARATOR = "__g"


def validate_gallery_name(name: str, max_length: int = MAX_GALLERY_NAME) -> str:
    if not isinstance(name, str) or not GALLERY_NAME_RE.fullmatch(name) or "__" in name or len(name) > max_length:
        raise ValueError(
            f"gallery name {name!r} is not valid: use a letter, then letters, digits or single '_' (at most 56)"
        )
    return name


def collection_key(gallery: str, generation: int = 0) -> str:
    """The store's name for one generation of a gallery (generation 0 keeps the gallery's own name)."""
    return gallery if generation == 0 else f"{gallery}{GENERATION_SEPARATOR}{generation}"


def model_queue(model_version: str) -> str:
    """Work that needs one model version (searching its gallery) goes to the workers that run it."""
    return "facegate.model." + re.sub(r"[^A-Za-z0-9_.-]", "_", model_version)


def validate_gallery_key(key: str) -> str:
    return validate_gallery_name(key, max_length=64)


GalleryName = Annotated[str, AfterValidator(validate_gallery_key)]


def chunk_task_id(job_id: str, chunk_no: int) -> str:
    """Deterministic task id: a chunk sent twice is the same task, and its result has one home."""
    return f"facegate-{job_id}-{chunk_no:05d}"


class IndexChunk(BaseModel):
    """Index these images of a gallery into that gallery's collection."""

    kind: Literal["index"] = "index"
    job_id: str
    chunk_no: int = Field(ge=0)
    gallery: GalleryName
    generation: int = Field(default=0, ge=0)
    paths: list[str]
    # An enrolment filter named in the registry's `quality_filters` (Rekognition's QualityFilter): faces
    # below it are not indexed. None: every detected face is.
    quality_filter: str | None = None
    # The caller's own id for each image (Rekognition's ExternalImageId), by path; stored with its faces.
    external_ids: dict[str, str] = Field(default_factory=dict)
    # Faces deleted by id from these images, by path: their boxes. A detected face at the same place is
    # that face (workers/chunks.py: same_face) and is not indexed again.
    erased_boxes: dict[str, list[list[float]]] = Field(default_factory=dict)
    ticket: str | None = None


class SearchChunk(BaseModel):
    """Find the faces in these probe images and search each against a gallery."""

    kind: Literal["search"] = "search"
    job_id: str
    chunk_no: int = Field(ge=0)
    gallery: GalleryName
    generation: int = Field(default=0, ge=0)
    paths: list[str]
    top_k: int = Field(ge=1, le=1000)
    threshold: float = Field(ge=-1.0, le=1.0)
    # Probes that are already 160x160 aligned face crops skip detection.
    aligned: bool = False
    ticket: str | None = None


class EraseChunk(BaseModel):
    """Delete the vectors of these images (by path) from a gallery, or the whole gallery generation."""

    kind: Literal["erase"] = "erase"
    job_id: str
    chunk_no: int = Field(ge=0)
    gallery: GalleryName
    generation: int = Field(default=0, ge=0)
    paths: list[str] = Field(default_factory=list)
    whole_gallery: bool = False
    # Faces to delete by id (one face, not its whole image).
    face_ids: list[str] = Field(default_factory=list)
    ticket: str | None = None


class CompareChunk(BaseModel):
    """Compare the two images of each pair: the worker embeds every distinct image once (its most probable
    face) and returns one similarity per pair. Paths go out, similarities come back; never embeddings."""

    kind: Literal["compare"] = "compare"
    job_id: str
    chunk_no: int = Field(ge=0)
    pairs: list[tuple[str, str]]
    # Score the best pair of faces, one from each image (POST /v1/compare), not the most probable two.
    best_pair: bool = False
    ticket: str | None = None


class PairScore(BaseModel):
    """One compared pair: the cosine similarity of the two images' most probable faces, or why there is none
    (an image with no face, or one that could not be read)."""

    first: str
    second: str
    similarity: float | None = None
    reason: str | None = None
    # With best_pair: which face of each image (indices in detection order) gave the similarity.
    faces: tuple[int, int] | None = None


class ItemOutcome(BaseModel):
    """What happened to one image: its faces, or the reason it failed."""

    path: str
    ok: bool
    reason: str | None = None
    faces: int = 0
    image_sha256: str | None = None


class Match(BaseModel):
    face_id: str
    image_path: str
    image_sha256: str
    similarity: float
    box: list[float]
    # The external id the image was indexed with, if any (None in galleries made before external ids).
    external_id: str | None = None


class ProbeFace(BaseModel):
    """One face found in a probe image, with its ranked gallery matches (best first)."""

    path: str
    face_no: int
    box: list[float]
    probability: float
    matches: list[Match]
    # The face's measured quality (policy.quality.FaceQuality's fields), shown with every match.
    quality: dict[str, float | None] | None = None
    # Set when the face was below the purpose's quality floor: why it was not searched (no matches then).
    not_searched: str | None = None


class ErasedFaceOut(BaseModel):
    """A face an erasure by id deleted: where it was, so that it stays deleted when its image is indexed again."""

    face_id: str
    path: str
    image_sha256: str
    box: list[float]


class ChunkResult(BaseModel):
    """A worker's answer for one chunk. `refused` is set when the chunk was not run at all."""

    job_id: str
    chunk_no: int
    kind: Literal["index", "search", "erase", "compare"]
    model_version: str | None = None
    untrained: bool = False
    items: list[ItemOutcome] = Field(default_factory=list)
    probes: list[ProbeFace] = Field(default_factory=list)
    # compare chunks: one entry per pair, in the order of the message's pairs.
    scores: list[PairScore] = Field(default_factory=list)
    # erase chunks by face id: the faces deleted.
    erased_faces: list[ErasedFaceOut] = Field(default_factory=list)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The whole chunk could not run: gallery missing, model version mismatch. Items are not attempted.
    error: str | None = None
    # Refused by policy at execution time; nothing was read or written.
    refused: str | None = None


ChunkMessage = IndexChunk | SearchChunk | EraseChunk | CompareChunk
# What a ticket binds besides the work's content: these fields of the message, compared one by one.
_ADDRESS = {"job_id", "chunk_no", "kind", "gallery", "generation", "ticket"}


def work_digest(message: BaseModel) -> str:
    """sha256 of everything a chunk acts on besides its address: its paths (or pairs), and for a search its
    top-k, threshold and alignment, for an erasure its whole-gallery flag. Signed into the ticket, so a
    ticket read off the broker cannot carry other work."""
    content = message.model_dump(mode="json", exclude=_ADDRESS)
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def work_binding(message: ChunkMessage) -> dict:
    """The ticket claims this message must match (policy.WORK_CLAIMS), as values read off the message."""
    return {"job_id": message.job_id, "chunk_no": message.chunk_no, "task": message.kind,
            "gallery": getattr(message, "gallery", ""), "generation": getattr(message, "generation", 0),
            "target_digest": work_digest(message)}
