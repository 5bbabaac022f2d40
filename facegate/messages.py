"""Typed messages that cross the queue between the scheduler and the workers.

They carry ids, paths and small results: never pixels, never embeddings.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

# The only names the scheduler and the workers share besides these models.
INDEX_CHUNK_TASK = "facegate.index_chunk"
SEARCH_CHUNK_TASK = "facegate.search_chunk"


GALLERY_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def validate_gallery_name(name: str) -> str:
    if not GALLERY_NAME_RE.match(name):
        raise ValueError(
            f"gallery name {name!r} is not valid: use a letter, then letters, digits or '_' (at most 63)"
        )
    return name


GalleryName = Annotated[str, AfterValidator(validate_gallery_name)]


def chunk_task_id(job_id: str, chunk_no: int) -> str:
    """Deterministic task id: a chunk sent twice is the same task, and its result has one home."""
    return f"facegate-{job_id}-{chunk_no:05d}"


class IndexChunk(BaseModel):
    """Index these images of a gallery into that gallery's collection."""

    kind: Literal["index"] = "index"
    job_id: str
    chunk_no: int = Field(ge=0)
    gallery: GalleryName
    paths: list[str]
    ticket: str | None = None


class SearchChunk(BaseModel):
    """Find the faces in these probe images and search each against a gallery."""

    kind: Literal["search"] = "search"
    job_id: str
    chunk_no: int = Field(ge=0)
    gallery: GalleryName
    paths: list[str]
    top_k: int = Field(ge=1, le=1000)
    threshold: float = Field(ge=-1.0, le=1.0)
    # Probes that are already 160x160 aligned face crops skip detection.
    aligned: bool = False
    ticket: str | None = None


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


class ProbeFace(BaseModel):
    """One face found in a probe image, with its ranked gallery matches (best first)."""

    path: str
    face_no: int
    box: list[float]
    probability: float
    matches: list[Match]


class ChunkResult(BaseModel):
    """A worker's answer for one chunk. `refused` is set when the chunk was not run at all."""

    job_id: str
    chunk_no: int
    kind: Literal["index", "search"]
    model_version: str | None = None
    untrained: bool = False
    items: list[ItemOutcome] = Field(default_factory=list)
    probes: list[ProbeFace] = Field(default_factory=list)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The whole chunk could not run: gallery missing, model version mismatch. Items are not attempted.
    error: str | None = None
    # Refused by policy at execution time; nothing was read or written.
    refused: str | None = None
