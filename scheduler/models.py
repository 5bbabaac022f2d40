"""Job records: what was asked, by whom, how far it got, what failed and what was found."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, Enum, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from facegate.db import Base, UTCDateTime
from facegate.vocabulary import ChunkKind, ChunkState, JobKind, JobState, ReviewDecision

__all__ = ["NOT_SENT", "ChunkKind", "ChunkState", "ErasedFace", "ErasedImage", "ImageLabel", "Gallery", "GalleryGrant", "GalleryImage",
           "IdempotencyRecord", "Job", "JobChunk", "JobItem", "JobKind", "JobState", "MatchReview", "ProbeResult",
           "ReviewDecision", "WebhookDelivery", "WebhookSecret", "utcnow"]

# The chunk number of a job's items decided at submission and never sent to a worker (an erased image).
NOT_SENT = -1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _stored_as_string(vocabulary: type[enum.StrEnum]) -> Enum:
    """A column of one vocabulary's values in a plain VARCHAR: no database enum type, so no migration, and
    the rows keep the very strings they always had. At least VARCHAR(16), the width these columns had."""
    return Enum(vocabulary, native_enum=False, create_constraint=False,
                length=max(16, *(len(member.value) for member in vocabulary)),
                values_callable=lambda members: [m.value for m in members])


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_stored_as_string(JobKind))
    # The organisation of the API key that submitted the job: authenticated, never declared.
    submitter: Mapped[str] = mapped_column(String(128), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The named user who submitted it (None: a machine key): the audit rows of its steps name that user.
    username: Mapped[str | None] = mapped_column(String(64), nullable=True)
    purpose: Mapped[str | None] = mapped_column(String(64), nullable=True)
    registry_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    decision_rule_ids: Mapped[list] = mapped_column(JSON, default=list)
    decision_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    review_required: Mapped[bool] = mapped_column(Boolean, default=False)
    # How many different reviewers must confirm a match (the registry's, at submission); 0: not stated
    # (a job from before it was: 2 where review is required, else 1).
    reviewers_required: Mapped[int] = mapped_column(Integer, default=0)
    # The legal authorisation the job stands on (facegate/authorisations.py), when its purpose asks for one.
    authorisation_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    gallery: Mapped[str] = mapped_column(String(64), index=True)
    # The gallery's name as its submitter knows it (the key above is internal).
    gallery_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[JobState] = mapped_column(_stored_as_string(JobState), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    total_items: Mapped[int] = mapped_column(Integer, default=0)
    done_items: Mapped[int] = mapped_column(Integer, default=0)
    failed_items: Mapped[int] = mapped_column(Integer, default=0)
    total_chunks: Mapped[int] = mapped_column(Integer, default=0)
    done_chunks: Mapped[int] = mapped_column(Integer, default=0)
    faces: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    untrained: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What the reconciler did for this job, one sentence each ("worker w1 died during chunk 3; re-sent").
    notes: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class JobChunk(Base):
    __tablename__ = "job_chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    paths: Mapped[list] = mapped_column(JSON)
    task: Mapped[ChunkKind] = mapped_column(_stored_as_string(ChunkKind), default=ChunkKind.INDEX)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    whole_gallery: Mapped[bool] = mapped_column(Boolean, default=False)
    # Queued until its result is folded into the job; then done or failed.
    state: Mapped[ChunkState] = mapped_column(_stored_as_string(ChunkState), default=ChunkState.QUEUED)
    folded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # What was sent, exactly (task name, queue, the message with its signed ticket): a lost chunk is re-sent
    # as it was, under its deterministic task id, so a re-send never duplicates work.
    task_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(128), nullable=True)
    message: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    sends: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # The reconciler's last sighting: which live worker runs it and since when; since when it was nowhere.
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    running_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    unplaced_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class JobItem(Base):
    """One image's outcome within a job."""

    __tablename__ = "job_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    chunk_no: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    faces: Mapped[int] = mapped_column(Integer, default=0)
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ProbeResult(Base):
    """One face found in a probe image, with its ranked matches."""

    __tablename__ = "probe_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    face_no: Mapped[int] = mapped_column(Integer)
    box: Mapped[list] = mapped_column(JSON)
    probability: Mapped[float] = mapped_column(Float)
    matches: Mapped[list] = mapped_column(JSON)
    # The face's measured quality (policy.quality.FaceQuality), and why it was not searched when it was
    # below the purpose's floor.
    quality: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    not_searched: Mapped[str | None] = mapped_column(Text, nullable=True)


class Gallery(Base):
    """A gallery the scheduler knows: who owns it, which model embedded it, when it was last indexed."""

    __tablename__ = "galleries"

    # The store's key for it (its Milvus collection). Names are per organisation: `label` is the name its
    # owner gave it; the key is the label itself unless another organisation's gallery holds that key.
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    # The registered folder (inside the gallery roots); None for a gallery made by an ad-hoc index job.
    folder: Mapped[str | None] = mapped_column(Text, nullable=True)
    nightly: Mapped[bool] = mapped_column(Boolean, default=False)
    # The purpose its owner indexes it for: what a reindex on the owner's behalf is decided under.
    purpose: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The enrolment filter (a name in the registry's `quality_filters`) its index jobs apply; None: none.
    quality_filter: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The owner's retention period in days (policy/retention.py); None: the registry's schedule.
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Searches read `generation`; a rebuild for a new model fills `building_generation`, then swaps.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    building_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    building_model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_indexed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_reindex_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class GalleryImage(Base):
    """What the scheduler knows was indexed: the inventory that counts a gallery and drives reindexing."""

    __tablename__ = "gallery_images"

    gallery: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    faces: Mapped[int] = mapped_column(Integer, default=0)
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # size and mtime let reindexing skip hashing files that have not been touched.
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    indexed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ErasedImage(Base):
    """An image an erasure job erased from a gallery: no index or reindex job indexes it again, by its path
    or, for a copy under another name, by its content hash, until its owner re-enrols it."""

    __tablename__ = "erased_images"

    gallery: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    # From the inventory when the image was indexed; None for a path erased that was never indexed.
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    erased_by: Mapped[str] = mapped_column(String(128))
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class ImageLabel(Base):
    """The caller's own id or label for one image of a gallery (Rekognition's ExternalImageId), by path: kept
    here, the one place, and written into every face row indexed for that image (index, reindex, a rebuild
    into a new generation), so it survives the image's content changing. Given by an index request's
    `external_ids` or a gallery's sidecar file (scheduler/labels.py)."""

    __tablename__ = "image_labels"

    gallery: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255))
    set_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    set_by: Mapped[str] = mapped_column(String(128))


class ErasedFace(Base):
    """One face deleted by id from a gallery image: when that image is indexed again (its content changed, a
    rebuild), the detected face at the same place is that face and stays out (scheduler/inventory.py). Only
    where it was is kept (its box), never its vector: keeping the embedding of an erased face would keep the
    biometric record the erasure destroyed."""

    __tablename__ = "erased_faces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    gallery: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    face_id: Mapped[str] = mapped_column(String(32))
    box: Mapped[list] = mapped_column(JSON)
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    erased_by: Mapped[str] = mapped_column(String(128))
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class UserRecord(Base):
    """A person of an organisation (scheduler/users.py): roles, an argon2id password hash, never the password."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    organisation_id: Mapped[str] = mapped_column(String(255), index=True)
    roles: Mapped[list] = mapped_column(JSON, default=list)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_sign_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class GalleryGrant(Base):
    """Another organisation allowed to search a gallery (the policy gate still decides each search)."""

    __tablename__ = "gallery_grants"

    gallery: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    granted_by: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MatchReview(Base):
    """One person's confirmation or rejection of one match. Appended, never overwritten: the match's
    review state is read from all of them (scheduler/reviews.py)."""

    __tablename__ = "match_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    probe_result_id: Mapped[int] = mapped_column(ForeignKey("probe_results.id", ondelete="CASCADE"))
    face_id: Mapped[str] = mapped_column(String(64))
    decision: Mapped[ReviewDecision] = mapped_column(_stored_as_string(ReviewDecision))
    # The username of the signed-in reviewer (or, where no person is required, the key id).
    reviewer: Mapped[str] = mapped_column(String(128))
    reviewer_user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    api_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    organisation_id: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyRecord(Base):
    """An `Idempotency-Key` an organisation sent with a job request: the request's fingerprint and the job
    it made (None while that request is being handled). Honoured for 24 hours (scheduler/idempotency.py)."""

    __tablename__ = "idempotency_keys"

    organisation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class WebhookSecret(Base):
    """The key an organisation's webhooks are signed with (HMAC-SHA256); shown once when created."""

    __tablename__ = "webhook_secrets"

    organisation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """A job's callback: where its view goes when it ends, and how the attempts went."""

    __tablename__ = "webhook_deliveries"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    given_up: Mapped[bool] = mapped_column(Boolean, default=False)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
