"""Request and response models at the edge of the API (what the OpenAPI document describes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from facegate.vocabulary import JobState, ReviewDecision


class GalleryCreate(BaseModel):
    name: str = Field(description="Letters, digits and single underscores; starts with a letter.")
    folder: str = Field(description="A folder inside the configured gallery roots.")
    purpose: str = Field(description="The registry purpose it is indexed for; decides registration and every "
                                     "reindex on your behalf.")
    nightly: bool = Field(default=False, description="Reindex it every night.")


class GrantOut(BaseModel):
    gallery: str
    organisation_id: str
    granted_by: str
    at: datetime


class AuditRowOut(BaseModel):
    seq: int
    at: str = Field(description="UTC, ISO 8601 with microseconds: the form the hash chain hashes.")
    event: str
    organisation_id: str
    username: str | None = Field(description="The named user who acted; null for a machine key or the system.")
    api_key_id: str | None = Field(description="The key that acted (`user:<id>` for a named user).")
    job_id: str | None
    capability: str | None
    purpose: str | None
    gallery: str | None
    registry_hash: str | None
    rule_ids: list[str]
    allowed: bool | None
    detail: dict[str, Any]
    prev_hash: str
    row_hash: str


class AuditPage(BaseModel):
    offset: int
    limit: int
    next_offset: int | None = Field(description="Where the next (older) page starts; null on the last page.")
    items: list[AuditRowOut] = Field(description="Newest first.")


class AuditHeadOut(BaseModel):
    rows: int = Field(description="How many rows the log holds (the last row's seq).")
    head_hash: str = Field(description="The last row's hash: record it elsewhere, with the row count.")
    ok: bool
    first_broken_seq: int | None = None
    reason: str | None = None


class AuditCheckpoint(BaseModel):
    rows: int
    head_hash: str
    at: str
    signature: str


class AuditVerifyRequest(BaseModel):
    checkpoint: AuditCheckpoint | None = None


class GalleryOut(BaseModel):
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
    quality_filter: str | None = Field(default=None, description="The enrolment filter its index jobs apply.")
    retention: dict | None = Field(default=None, description="Its retention schedule: erase_at, days, since, "
                                   "basis (owner, purpose, default or legal maximum), owner_days, reason")
    granted_to: list[str]
    index: dict | None = Field(default=None, description="The vector index its current generation is searched "
                               "with: type (FLAT or HNSW), build_params, search_params, metric, engine; only "
                               "in one gallery's view. null: nothing indexed yet; {error}: the store did not answer")
    erased_images: int = Field(default=0, description="Images erased and not indexed again until re-enrolled.")


class EnrolCreate(BaseModel):
    paths: list[str] = Field(min_length=1, description="Erased images to re-enrol: the paths they were erased at, "
                             "a folder holding them, or readable files of the same content.")


class ErasedOut(BaseModel):
    path: str
    image_sha256: str | None
    erased_at: datetime
    erased_by: str
    job_id: str | None


class EnrolOut(BaseModel):
    gallery: str
    reenrolled: list[ErasedOut] = Field(description="The erased marks removed: the next index or reindex indexes "
                                        "these images again.")


class RetentionSet(BaseModel):
    days: int | None = Field(ge=1, description="Days after its last indexing; null: the registry's schedule.")


class GrantCreate(BaseModel):
    organisation_id: str


class JobCreate(BaseModel):
    kind: Literal["index", "search", "reindex"]
    gallery: str
    purpose: str = Field(description="A purpose of the policy registry; decides what is allowed.")
    folder: str | None = Field(default=None, description="index: the folder to index (default: the gallery's).")
    probes: list[str] = Field(default_factory=list, description="search: probe files or folders (paths).")
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0,
                                    description="search: minimum cosine similarity (default: the purpose's floor).")
    top_k: int | None = Field(default=None, ge=1, le=1000)
    aligned: bool = False
    quality_filter: str | None = Field(default=None, description="index: enrol only faces at or above this "
                                       "filter of the registry's `quality_filters` (e.g. medium).")
    authorisation: str | None = Field(default=None, description="search: the id of the recorded legal "
                                      "authorisation it stands on (required by some purposes).")
    external_ids: dict[str, str] | None = Field(default=None, description="index: your own id or label for "
                                                "images (Rekognition's ExternalImageId), keyed by path (absolute, "
                                                "or relative to the folder); kept with the image (over the folder's "
                                                "`external_ids.csv` sidecar, which is read too), stored with each "
                                                "of its faces whenever it is indexed and returned with every match")
    callback_url: str | None = Field(default=None, max_length=2048, description="http(s) URL the job's view is "
                                     "POSTed to when it ends, signed with your organisation's webhook secret "
                                     "(X-FaceGate-Signature: sha256=<HMAC-SHA256 of the body>)")


class AuthorisationCreate(BaseModel):
    kind: str = Field(description="A kind of the registry's `authorisation_kinds`: warrant, court-order, exigent.")
    reference: str = Field(min_length=1, max_length=256, description="The authority's identifier (warrant number).")
    issuing_authority: str = Field(min_length=1, max_length=256)
    issued_at: datetime = Field(description="When it was issued (ISO 8601; UTC when no offset is given).")


class AuthorisationWithdraw(BaseModel):
    reason: str = Field(min_length=1, max_length=1000, description="Why: refused by the court, revoked, no longer "
                                                                   "needed.")


class AuthorisationOut(BaseModel):
    id: str
    organisation_id: str
    kind: str
    reference: str
    issuing_authority: str
    issued_at: datetime
    recorded_at: datetime
    confirmed_at: datetime | None
    withdrawn_at: datetime | None
    withdrawn_reason: str | None
    recorded_by: str | None = Field(default=None, description="The key that recorded it (`user:<id>` for a user)")
    status: str = Field(description="valid, lapsed, withdrawn, not-yet-issued or unknown-kind, now")
    valid_until: datetime | None = Field(description="When it lapses under the registry's rule (None: until "
                                                     "withdrawn)")
    rule: str


class ItemError(BaseModel):
    path: str
    reason: str | None


class PolicyDecisionOut(BaseModel):
    reason: str | None
    rule_ids: list[str]
    registry_hash: str | None


class JobOut(BaseModel):
    id: str
    kind: str
    state: JobState
    submitter: str
    purpose: str | None
    gallery: str
    progress: dict
    faces: int
    model_version: str | None
    untrained: bool
    warning: str | None
    review_required: bool
    policy: PolicyDecisionOut
    params: dict
    error: str | None
    errors: list[ItemError]
    notes: list[str] = Field(default_factory=list, description="What was done to keep the job going: chunks "
                             "a dead worker or a restarted broker lost, re-sent (or failed after too many sends).")
    no_face: list[ItemError] = Field(default_factory=list, description="search: probe images read without error "
                                     "in which no face was found (reason 'no face found'): not searched, so "
                                     "never a 'no match'")
    not_indexed: list[ItemError] = Field(default_factory=list, description="Images an index job left out and why "
                                         "(erased, until their owner re-enrols them); not failures")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ChunkOut(BaseModel):
    chunk: int
    task: str
    state: str = Field(description="queued, running (on `worker` since `running_since`), lost, done or failed")
    images: int
    worker: str | None
    running_since: datetime | None
    sends: int = Field(description="How many times it was sent: more than 1 after a re-send of a lost chunk.")
    sent_at: datetime | None
    unplaced_since: datetime | None = Field(description="Since when it was seen in no queue and held by no worker.")


class ReviewOut(BaseModel):
    reviewer: str
    decision: ReviewDecision
    at: str
    note: str | None = None


class MatchOut(BaseModel):
    face_id: str
    image_path: str
    image_sha256: str
    external_id: str | None = Field(default=None, description="The external id the image was indexed with")
    similarity: float
    false_match_rate: float | None = Field(default=None, description="FMR at this similarity for the model "
                                          "version's calibration; None when the version is not calibrated")
    false_match_rate_below_limit: bool | None = Field(default=None, description="True: the FMR is below "
                                                      "false_match_rate (no impostor scored this high)")
    box: list[float]
    probe_quality: dict[str, float | None] | None = Field(default=None, description="The probe face's measured "
                                                          "quality (size, sharpness, brightness, pose, probability)")
    review: str = Field(description="confirmed (enough different reviewers confirmed it), rejected (a reviewer "
                                    "rejected it), unconfirmed, or not_required")
    confirmations: int = Field(default=0, description="Different reviewers who confirmed it")
    reviewers_required: int = Field(default=0, description="Different reviewers who must confirm it")
    reviewer: str | None = Field(default=None, description="Who reviewed it last")
    reviewed_at: str | None = None
    reviewed_by: list[str] = Field(default_factory=list, description="Everyone who reviewed it")
    reviews: list[ReviewOut] = Field(default_factory=list, description="Every review, oldest first (appended, "
                                     "never overwritten)")


class ProbeFaceOut(BaseModel):
    id: int
    path: str
    face_no: int
    box: list[float]
    probability: float
    quality: dict[str, float | None] | None = Field(default=None, description="Measured quality of this probe face")
    not_searched: str | None = Field(default=None, description="Why the face was not searched: below the "
                                     "purpose's quality floor")
    matches: list[MatchOut]


class ResultsPage(BaseModel):
    job_id: str
    state: str
    untrained: bool
    offset: int
    limit: int
    total: int
    next_offset: int | None
    items: list[ProbeFaceOut]
    no_face: list[ItemError] = Field(default_factory=list, description="Probe images in which no face was found "
                                     "(they have no items above)")


class ErasureCreate(BaseModel):
    gallery: str
    paths: list[str] | None = Field(default=None, description="Erase these images.")
    under: str | None = Field(default=None, description="Erase every image under this folder.")
    whole_gallery: bool = Field(default=False, description="Erase every vector of the gallery.")


class ReviewCreate(BaseModel):
    face_id: str
    decision: ReviewDecision
    reviewer: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="Deprecated: a review is recorded with the signed-in user (HTTP "
                                             "Basic); if given, it must name that user")
    note: str | None = None

    @field_validator("reviewer")
    @classmethod
    def _named(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("a review names its reviewer: this one is only spaces")
        return value.strip()


class FaceOut(BaseModel):
    face_id: str
    image_path: str
    image_sha256: str
    face_no: int
    box: list[float]
    probability: float
    external_id: str | None


class FacesPage(BaseModel):
    gallery: str
    offset: int
    limit: int
    total: int
    next_offset: int | None
    items: list[FaceOut]
