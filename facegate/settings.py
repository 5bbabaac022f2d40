"""One settings class for the whole system, read from `FACEGATE_*` environment variables."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "facegate"


class Settings(BaseSettings):
    """Every knob FaceGate has. Unset optional URLs mean "use the embedded default"."""

    model_config = SettingsConfigDict(env_prefix="FACEGATE_", env_file=None, extra="ignore")

    # Where the embedded defaults keep their files: job database, Milvus Lite store, embedded Redis.
    data_dir: Path = Field(default_factory=_default_data_dir)

    # Queue. No broker URL means: start an embedded Redis and a worker for this command.
    broker_url: str | None = None
    result_backend_url: str | None = None
    # Redis redelivers an unacked task after this many seconds; keep it far above the longest chunk.
    visibility_timeout_s: int = 4 * 3600
    result_expires_s: int = 14 * 24 * 3600
    # The reconciler (scheduler/reconcile.py, run by beat, `facegate jobs ID` and every waiting command) looks
    # for chunks in no queue and held by no live worker this often; one still unplaced after the grace is
    # re-sent under its own task id, and failed with its reason after this many sends in all.
    reconcile_interval_s: int = Field(default=30, ge=1)
    reconcile_grace_s: int = Field(default=20, ge=0)
    chunk_max_sends: int = Field(default=4, ge=1)

    # Vector store: a Milvus Lite file (default: DATA_DIR/milvus.db) or a Milvus server URI.
    milvus_uri: str | None = None
    milvus_token: str | None = None
    # The vector index of a gallery on a Milvus server (index/policy.py): exact FLAT below this many faces,
    # HNSW at or above it (built when a gallery's writes pass the size). Milvus Lite always searches FLAT.
    milvus_ann_min_faces: int = Field(default=100_000, ge=1)
    # HNSW: graph degree and build beam (set at build: a change applies to the next build), and the search
    # beam ef (raised to the top-k when below it; higher: nearer exact recall, slower).
    milvus_hnsw_m: int = Field(default=16, ge=4, le=64)
    milvus_hnsw_ef_construction: int = Field(default=200, ge=8, le=1024)
    milvus_hnsw_ef: int = Field(default=2048, ge=1, le=32768)

    # Job records: SQLite file by default (DATA_DIR/facegate.db), PostgreSQL by URL.
    database_url: str | None = None

    # Every path a caller names must resolve inside one of these (colon- or comma-separated in env).
    gallery_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Work split: images per queued chunk.
    index_chunk_size: int = Field(default=16, ge=1, le=4096)
    search_chunk_size: int = Field(default=16, ge=1, le=4096)

    # Inference. Unset (None) knobs are chosen per device by workers/batching.py.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    embed_batch_size: int | None = Field(default=None, ge=1, le=8192)  # faces per embedding pass
    torch_threads: int | None = Field(default=None, ge=1)
    # Embedding compute dtype. auto: fp16 on CUDA, bf16 on a CPU with native bf16 (AMX / AVX512-BF16),
    # else fp32. Half precision stays within 0.01 cosine distance of fp32 (tests/test_perf_precision.py).
    embed_precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    channels_last: bool = True
    detect_batch_size: int | None = Field(default=None, ge=1, le=256)  # images per MTCNN call (letterboxed)
    detect_threads: int | None = Field(default=None, ge=1, le=64)  # MTCNN instances running at once
    decode_threads: int | None = Field(default=None, ge=1, le=64)  # read, hash and decode ahead of detection
    embed_thread: bool | None = None  # embed on a thread of its own, overlapped with detection

    # The embedding model (facegate/embedding_models.py): facenet-vggface2 (InceptionResnetV1 with
    # facenet-pytorch's VGGFace2 weights, see `weights`; the default), dlib-resnet-v1 (dlib's public-domain
    # ResNet face descriptor, installed with FaceGate: no download), or untrained (tests only). Production
    # commands never switch it: a worker without its model's weights fails, saying how to get them.
    model: Literal["facenet-vggface2", "dlib-resnet-v1", "untrained"] = "facenet-vggface2"
    # Weights of facenet-vggface2: "vggface2" (facenet-pytorch's download into the torch cache), a path to a state dict
    # file (then weights_sha256 is required), or "untrained" (tests and offline demos only).
    weights: str = "vggface2"
    weights_sha256: str | None = None
    untrained_seed: int = 0

    # Detection.
    min_face_size: int = Field(default=20, ge=8)
    min_face_probability: float = Field(default=0.9, ge=0.0, le=1.0)
    # Larger images are detected on a copy of this longest side (crops still come from the original), so
    # the smallest face found is min_face_size * longest side / max_detect_side original pixels (2.5% of
    # the longest side at 800). Detection cost grows with pixels: 800 finds 98.8% of what full-size MTCNN
    # finds at 3.4x the naive loop's speed on CPU (bench/README.md); Immich detects at 640. Raise it for
    # large group photos with small faces.
    max_detect_side: int = Field(default=800, ge=160)

    # Decoding limits: decompression bombs and oversized uploads fail as one item, not the job.
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_image_bytes: int = Field(default=50 * 1024 * 1024, ge=1)

    # Search defaults.
    default_top_k: int = Field(default=10, ge=1, le=1000)
    # Unset: the model's own (0.5 for facenet-vggface2, 0.93 for dlib-resnet-v1, whose different people
    # reach cosine 0.92); either way raised to the purpose's floor.
    default_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    # Policy. The registry file says who is under which moratorium (default: the shipped Rekognition
    # registry); the scope override widens a police moratorium to all law enforcement.
    policy_registry: Path | None = None
    policy_scope: Literal["police", "all_law_enforcement"] | None = None
    # Signs the execution tickets the scheduler gives each job and the worker checks. Unset: a random
    # secret kept in DATA_DIR/secrets (fine on one machine; set it explicitly for several).
    ticket_secret: SecretStr | None = None
    ticket_ttl_s: int = Field(default=24 * 3600, ge=60)
    # Similarity -> false-match-rate calibrations, one file per model version (written by `facegate
    # evaluate`, read by the policy gate at both ends: share it between machines). Default DATA_DIR/calibration.
    calibration_dir: Path | None = None

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    max_upload_files: int = Field(default=1000, ge=1, le=100_000)
    # Webhooks (a job's callback_url) to loopback, private, link-local or reserved addresses: refused
    # unless this is set (a receiver on the same host or network as FaceGate).
    webhook_allow_private: bool = False
    # POST /v1/search and /v1/compare wait this long for the job, then answer 504 naming it.
    sync_timeout_s: float = Field(default=60.0, gt=0, le=600)
    # The console's sign-in sessions end this long after sign-in, however busy (and at sign-out).
    console_session_minutes: int = Field(default=480, ge=1, le=7 * 24 * 60)
    # Uploaded probes are removed when their job ends, unless kept this many days (then an expiry
    # sweep removes them). Audited either way.
    upload_retention_days: int = Field(default=0, ge=0)
    # Signs audit checkpoints (HMAC-SHA256). Unset: a random secret kept in DATA_DIR/secrets; set it
    # to one a compliance officer holds, so a checkpoint kept elsewhere can be checked against the log.
    audit_checkpoint_secret: SecretStr | None = None
    # Flower: "user:password[,user2:password2]". Flower refuses to start without it unless told otherwise.
    flower_basic_auth: SecretStr | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_address: str = "127.0.0.1"

    # Nightly reindexing of registered galleries (Celery beat), at this local time in this time zone.
    nightly_reindex_time: str = Field(default="02:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    nightly_reindex_timezone: str = "UTC"

    # Worker.
    worker_concurrency: int = Field(default=1, ge=1)
    worker_pool: Literal["threads", "solo", "prefork"] = "threads"

    @field_validator("gallery_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace(",", os.pathsep).split(os.pathsep)]
            return [p for p in parts if p]
        return value

    @field_validator("weights_sha256")
    @classmethod
    def _normalise_sha(cls, value: str | None) -> str | None:
        return value.strip().lower() if value else value

    def default_threshold_for(self, model_version: str | None) -> float:
        """The threshold of a search that names none, before the purpose's floor raises it."""
        if self.default_threshold is not None:
            return self.default_threshold
        from facegate.embedding_models import FACENET_VGGFACE2, MODELS, model_of

        model = model_of(model_version)
        return (model or MODELS[FACENET_VGGFACE2]).default_threshold

    # Derived locations -------------------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'facegate.db'}"

    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    @property
    def resolved_result_backend(self) -> str | None:
        return self.result_backend_url or self.broker_url

    def resolved_ticket_secret(self) -> str:
        if self.ticket_secret is not None and self.ticket_secret.get_secret_value():
            return self.ticket_secret.get_secret_value()
        return self._local_secret("ticket-secret")

    def resolved_audit_checkpoint_secret(self) -> str:
        if self.audit_checkpoint_secret is not None and self.audit_checkpoint_secret.get_secret_value():
            return self.audit_checkpoint_secret.get_secret_value()
        return self._local_secret("audit-checkpoint-secret")

    def _local_secret(self, name: str) -> str:
        path = self.data_dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(48))
        return path.read_text().strip()

    @property
    def resolved_calibration_dir(self) -> Path:
        return self.calibration_dir or self.data_dir / "calibration"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def resolved_gallery_roots(self) -> list[Path]:
        """The configured roots every organisation may read (uploads are not among them: see roots_for)."""
        roots = self.gallery_roots or [self.data_dir / "galleries"]
        return [Path(r).expanduser().resolve() for r in roots]

    def uploads_for(self, organisation_id: str) -> Path:
        return self.uploads_dir / organisation_id

    def roots_for(self, organisation_id: str) -> list[Path]:
        """What one organisation may read: the configured roots and its own uploads, no one else's."""
        return [*self.resolved_gallery_roots, self.uploads_for(organisation_id).expanduser().resolve()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and the CLI change the environment at run time)."""
    get_settings.cache_clear()
