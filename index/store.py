"""GalleryStore: upsert, delete and search face vectors in Milvus (Lite file or server), one collection per gallery."""

from __future__ import annotations

from contextlib import contextmanager, suppress
from functools import partial

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from facegate.messages import GENERATION_SEPARATOR
from facegate.messages import validate_gallery_key as check_gallery_name
from index.policy import FLAT, HNSW, IndexChoice, IndexPolicy, choose_index

# The dimension of a gallery created without one (facenet-vggface2's); each collection carries its own.
EMBEDDING_DIM = 512
COLLECTION_PREFIX = "facegate_"
MODEL_VERSION_PROPERTY = "facegate.model_version"
# A Milvus server takes and sends at most 64 MB per gRPC message: an upsert call holds at most this many
# rows and about this many bytes (vectors, paths and the rest, estimated), well under the limit.
UPSERT_BATCH_ROWS = 8192
CALL_BYTES = 24 * 1024 * 1024
# Milvus caps nq per search call.
SEARCH_BATCH_PROBES = 4096
# A search answer carries top_k hits per probe, each with its path, hash and box: the probes of one call
# are capped so that probes x top_k stays at this many hits (1,000 probes at top-10, 65 at top-1000). A
# call whose answer still outgrows the message limit (very long paths) is split in two, down to one probe.
SEARCH_RESULT_HITS = 65536
# Paths per `image_path in [...]` query when looking for stale faces: keeps each filter string small.
STALE_QUERY_PATHS = 1024
# New galleries: inner product of unit vectors (the store normalises what it writes), which is the cosine
# similarity without Milvus Lite re-normalising the whole gallery on every search call. Galleries created
# with COSINE before keep it: the store reads each collection's metric.
VECTOR_METRIC = "IP"
SUPPORTED_METRICS = ("IP", "COSINE")
# Milvus Lite keeps unflushed rows in a memtable that every filter and search evaluates in Python, and an
# in-process Lite's memory grows with it (bench/store_writes.py): flush after this many rows written.
LITE_FLUSH_ROWS = 2048
# Every read sees every write acknowledged before it: a Milvus server's default (Bounded) lets a search
# or count miss rows upserted or deleted in the last few seconds, and a re-run chunk would see stale faces.
STRONG = "Strong"
BOUNDED = "Bounded"
# When the gallery was last written (unix seconds, the writer's clock), set after every write on a server.
WRITTEN_AT_PROPERTY = "facegate.written_at"
# A Strong read waits for the query node's next time tick (common.timeTickInterval, 200 ms: 182 of a
# single-probe call's 199 ms, milvus_querynode_sq_wait_tsafe_latency; bench/README.md). A Bounded read is
# served at once and sees every write older than the server's graceful time (common.gracefulTime, 5 s by
# default in Milvus 2.3-2.5): the same answer as Strong once the gallery's last write is older than that.
# Twice the default: room for clock skew between the writer, the reader and the server, and for racing
# writers whose markers land out of order by a few milliseconds. A server configured with a longer
# graceful time needs this raised.
BOUNDED_AFTER_S = 10.0
# pymilvus pings every 10 s, with or without calls in flight. Milvus Lite serves gRPC with the library's
# defaults, both as a file (pymilvus starts its server in this process and talks to it over loopback) and
# as `milvus-lite server`: one ping per 5 minutes without data, GOAWAY "too_many_pings" at the third early
# one, and the next call on that shared channel fails ("Fail connecting to server") after any idle spell of
# ~30 s. Ping no more often than that, and only while calls are in flight. A Milvus server accepts pings
# every 5 s (its proxy's keepalive policy), so the same options suit it; the URI alone does not tell a
# `milvus-lite server` from a Milvus server before the first call.
GRPC_KEEPALIVE = {"grpc.keepalive_time_ms": 330_000, "grpc.keepalive_permit_without_calls": 0}
# The caller's own id for an image (ExternalImageId), on collections created since it was added.
EXTERNAL_ID_FIELD = "external_id"
MAX_EXTERNAL_ID = 255
# How long a load waits for an index another process is building (a rebuild at 1M faces takes tens of
# minutes on 2 cores), and how often it asks. A search waits rather than reading part of the gallery.
INDEX_BUILD_WAIT_S = 3 * 3600.0
INDEX_BUILD_POLL_S = 1.0
# Set by a store about to rebuild the collection's index (unix seconds), cleared once it has loaded it
# again; meanwhile other stores do not load it (their searches wait).
BUILDING_PROPERTY = "facegate.index_build"
DROP_INDEX_TRIES = 5
# A Milvus server's answer to a load of a collection with no index (between a drop_index and a create_index).
INDEX_NOT_FOUND = 700
# A Milvus server's answer to a read of a released collection ("collection not loaded").
COLLECTION_NOT_LOADED = 101

T = TypeVar("T")


class InvalidGalleryName(ValueError):
    pass


class GalleryNotFound(LookupError):
    pass


class ModelVersionMismatch(ValueError):
    """A probe embedded by one model may not be compared with a gallery embedded by another."""


def face_id(gallery: str, image_sha256: str, face_no: int) -> str:
    """Primary key from gallery, image content and face number: re-running a chunk overwrites, never duplicates."""
    return hashlib.sha256(f"{gallery}\0{image_sha256}\0{face_no}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class FaceRecord:
    gallery: str
    image_path: str
    image_sha256: str
    face_no: int
    box: Sequence[float]
    probability: float
    landmarks: Sequence[Sequence[float]]
    model_version: str
    vector: np.ndarray
    # The caller's own id or label for the image (Rekognition's ExternalImageId); "" when none was given.
    external_id: str = ""

    @property
    def id(self) -> str:
        return face_id(self.gallery, self.image_sha256, self.face_no)


@dataclass(frozen=True)
class StoredMatch:
    face_id: str
    image_path: str
    image_sha256: str
    similarity: float
    box: list[float]
    external_id: str | None = None


@dataclass(frozen=True)
class StoredFace:
    """One face as the store holds it, without its vector."""

    face_id: str
    image_path: str
    image_sha256: str
    face_no: int
    box: list[float]
    probability: float
    external_id: str | None = None


@dataclass(frozen=True)
class GalleryInfo:
    name: str
    model_version: str
    faces: int
    images: int | None = None
    dimension: int | None = None
    # The vector index searched: {"type", "metric", "build_params", "search_params", "engine"}.
    index: dict | None = None
    extra: dict = field(default_factory=dict)


def validate_gallery_name(key: str) -> str:
    """A gallery name, or a gallery generation's key (`name__g<n>`)."""
    base, separator, generation = key.partition(GENERATION_SEPARATOR)
    try:
        check_gallery_name(base)
    except ValueError as exc:
        raise InvalidGalleryName(str(exc)) from None
    if separator and not generation.isdigit():
        raise InvalidGalleryName(f"gallery key {key!r} has a malformed generation")
    return key


def collection_name(gallery: str) -> str:
    return COLLECTION_PREFIX + validate_gallery_name(gallery)


def _quote(value: str) -> str:
    """A Milvus filter string literal that matches `value` exactly. Milvus's parser takes backslash escapes for
    the backslash, the quote and line breaks, and every other character as it is; JSON's \\uXXXX escapes (which
    json.dumps writes for non-ASCII names) it refuses: 'unknown escape sequence \\u'."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so that inner product is cosine similarity."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32, copy=False)


class GalleryStore:
    """All Milvus access FaceGate makes. A URI that is a file path opens Milvus Lite in this process.

    Milvus Lite allows one process per store: the embedded mode gives the store to the one worker
    process; several workers share a store through `milvus-lite server` or a Milvus server URI.
    """

    def __init__(self, uri: str, token: str | None = None, policy: IndexPolicy | None = None) -> None:
        self.uri = uri
        self.policy = policy or IndexPolicy()
        if "://" not in uri:
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._client = MilvusClient(uri=uri, token=token or "", grpc_options=GRPC_KEEPALIVE)
        # One MilvusClient is shared by the worker's threads; Milvus Lite is not documented as thread-safe.
        self._lock = threading.RLock()
        self._metrics: dict[str, str] = {}  # loaded collection -> its vector metric
        self._indexes: dict[str, IndexChoice] = {}  # loaded collection -> the index built on its vectors
        self._dims: dict[str, int] = {}  # collection -> its vector dimension
        self._fields: dict[str, set[str]] = {}  # collection -> its field names
        self._lite: bool | None = None
        self._unflushed: dict[str, int] = {}  # Milvus Lite: collection -> rows written since its last flush

    def _collection(self, gallery: str) -> str:
        """The gallery's collection, loaded for reads: a store opened by a new process starts released."""
        name = collection_name(gallery)
        if name not in self._metrics:
            if not self._client.has_collection(name):
                raise GalleryNotFound(f"gallery {gallery!r} does not exist in {self.uri}")
            try:
                described = self._load_whole(name)
            except MilvusException:
                # Dropped by another process between the two calls (a finished rebuild drops the old
                # generation): the same answer as if it had been gone before.
                if not self._client.has_collection(name):
                    raise GalleryNotFound(f"gallery {gallery!r} does not exist in {self.uri}") from None
                raise
            metric = str(described.get("metric_type", "")).upper()
            if metric not in SUPPORTED_METRICS:
                raise GalleryNotFound(f"collection {name!r} has a {metric or 'missing'} vector index: not a FaceGate gallery")
            self._metrics[name] = metric
            self._indexes[name] = self._built_index(described)
        return name

    def _built_vector_index(self, name: str) -> dict:
        """The collection's vector index as describe_index tells it, once built for every sealed row.

        A Milvus server loading a collection while another process builds its index (fit_index: release,
        drop, create, load) loads only the segments indexed so far, and its searches silently miss the
        other faces until the collection is loaded again (20k faces: a reader found 2 of 5 mates for the
        whole 300 s build, bench/README.md). So a load waits for the build to finish first.
        """
        deadline = time.monotonic() + INDEX_BUILD_WAIT_S
        while True:
            described = self._client.describe_index(name, "vector")
            if self.is_milvus_lite:
                return described or {}
            if described and described.get("state", "Finished") == "Finished" and not self._build_pending(name):
                return described
            if described and described.get("state") == "Failed":
                raise MilvusException(message=f"the vector index of {name!r} failed to build: "
                                              f"{described.get('index_state_fail_reason') or 'no reason given'}")
            if time.monotonic() > deadline:
                if described is None:
                    return {}  # no index at all, and none coming: the caller says it is not a gallery
                raise MilvusException(message=f"the vector index of {name!r} is still being built after "
                                              f"{INDEX_BUILD_WAIT_S:.0f} s")
            time.sleep(INDEX_BUILD_POLL_S)

    def _load_whole(self, name: str) -> dict:
        """Load the collection with all its faces, once its vector index is built; that index described."""
        deadline = time.monotonic() + INDEX_BUILD_WAIT_S
        while True:
            before = self._built_vector_index(name)
            try:
                self._client.load_collection(name)
            except MilvusException as exc:
                missing = exc.code == INDEX_NOT_FOUND or "index not found" in (exc.message or "")
                if not missing or time.monotonic() > deadline:
                    raise
                time.sleep(INDEX_BUILD_POLL_S)  # between another process's drop_index and create_index
                continue
            if self.is_milvus_lite:
                return before
            after = self._client.describe_index(name, "vector") or {}
            if (after.get("state") == "Finished" and after.get("index_type") == before.get("index_type")
                    and not self._build_pending(name)):
                return after
            # Another process began a build between the check and the load: what was loaded may be part of
            # the gallery. Loaded again once the build is done.
            self._built_vector_index(name)
            self._client.release_collection(name)

    def _wait_for_build(self, name: str) -> None:
        """Until every row has the new index. create_index's own wait can return while the server still
        reports the new index "Finished" with no build task begun; a load then serves part of the gallery."""
        deadline = time.monotonic() + INDEX_BUILD_WAIT_S
        while time.monotonic() < deadline:
            described = self._client.describe_index(name, "vector") or {}
            if described.get("state") == "Failed":
                raise MilvusException(message=f"the vector index of {name!r} failed to build: "
                                              f"{described.get('index_state_fail_reason') or 'no reason given'}")
            if (described.get("state") == "Finished" and not int(described.get("pending_index_rows", 0))
                    and int(described.get("indexed_rows", 0)) >= int(described.get("total_rows", 0))):
                return
            time.sleep(INDEX_BUILD_POLL_S)

    def _build_pending(self, name: str) -> bool:
        """Another store has marked the collection for an index build and not yet loaded it again. (Right
        after create_index a server may report the new index "Finished" before its build tasks exist, so the
        index's state alone does not tell.) A mark older than INDEX_BUILD_WAIT_S is a builder that died."""
        mark = (self._client.describe_collection(name).get("properties") or {}).get(BUILDING_PROPERTY)
        try:
            return time.time() - float(str(mark)) < INDEX_BUILD_WAIT_S
        except (TypeError, ValueError):
            return False

    def _built_index(self, described: dict) -> IndexChoice:
        """The index a collection has (as describe_index tells it), with this store's search parameters."""
        index_type = str(described.get("index_type", FLAT)).upper()
        if index_type != HNSW:
            return IndexChoice(index_type)
        nested = described.get("params")
        params: dict = nested if isinstance(nested, dict) else described  # flat in pymilvus 3's answer
        build = {k: int(params[k]) for k in ("M", "efConstruction") if k in params}
        return IndexChoice(HNSW, build, {"ef": self.policy.hnsw_ef})

    def _fit_index(self, name: str) -> None:
        """On a server, a FLAT gallery that has reached the policy's size is rebuilt with HNSW.

        Never the other way: a gallery that shrinks keeps its HNSW index (still right, and fast), and
        HNSW parameters changed in the settings apply to the next build (a rebuild into a new
        generation). The chunk whose writes pass the size waits for the build and the load.
        """
        if self.is_milvus_lite or self._indexes[name].index_type != FLAT:
            return
        rows = self._client.query(name, filter="", output_fields=["count(*)"], consistency_level=STRONG)
        choice = choose_index(int(rows[0]["count(*)"]) if rows else 0, lite=False, policy=self.policy)
        if choice.index_type == FLAT:
            return
        # Sealed segments get the index; rows left in a growing segment are searched exactly until sealed.
        self._client.flush(name)
        # Other processes' loads wait from here (see _built_vector_index): a load between the release and
        # the drop would make the drop fail, one during the build would serve part of the gallery.
        self._client.alter_collection_properties(name, {BUILDING_PROPERTY: f"{time.time():.3f}"})
        for attempt in range(DROP_INDEX_TRIES):
            self._client.release_collection(name)
            try:
                self._client.drop_index(name, "vector")
                break
            except MilvusException as exc:
                # A load that had begun before the mark was seen: released again; the next one waits.
                if "loaded" not in (exc.message or "") or attempt == DROP_INDEX_TRIES - 1:
                    raise
                time.sleep(INDEX_BUILD_POLL_S)
        index_params = self._client.prepare_index_params()
        index_params.add_index("vector", index_type=choice.index_type, metric_type=self._metrics[name],
                               params=choice.build_params)
        self._client.create_index(name, index_params)
        self._wait_for_build(name)
        if self._client.get_load_state(name)["state"] == LoadState.Loaded:
            # Another process loaded it during the build (before it waited for builds): only the segments
            # indexed then. Released, every process's next read loads it whole.
            self._client.release_collection(name)
        self._client.load_collection(name)
        self._client.alter_collection_properties(name, {BUILDING_PROPERTY: ""})
        self._indexes[name] = choice

    def fit_index(self, gallery: str) -> dict:
        """Give the gallery the index its size calls for now (what its next write would do); its index_info."""
        with self._lock:
            self._fit_index(self._collection(gallery))
        return self.index_info(gallery)

    def index_info(self, gallery: str) -> dict:
        """The vector index the gallery is searched with: type, metric, build and search parameters, engine."""
        with self._lock:
            name = self._collection(gallery)
            # Asked afresh: another process may have built an index since this one loaded the gallery.
            built = self._indexes[name] = self._built_index(self._client.describe_index(name, "vector"))
            return {**built.as_dict(), "metric": self._metrics[name],
                    "engine": "milvus-lite" if self.is_milvus_lite else "milvus-server"}

    @property
    def is_milvus_lite(self) -> bool:
        """A Milvus Lite file, or a `milvus-lite server` behind an http URI (it names itself in its version)."""
        if self._lite is None:
            with self._lock:
                self._lite = "://" not in self.uri or str(self._client.get_server_version()).startswith("milvus_lite")
        return self._lite

    def close(self) -> None:
        with self._lock:
            self._client.close()

    # Galleries ----------------------------------------------------------------------------------

    def _read_consistency(self, properties: dict, now: float | None = None) -> str:
        """The one rule for a search's consistency level (see BOUNDED_AFTER_S): Bounded where the gallery's
        last write, as its marker says, is old enough that Bounded sees it; Strong otherwise (a recent
        write, no marker yet: a gallery never written since this rule came, or Milvus Lite, which is
        consistent either way)."""
        return read_consistency(None if self.is_milvus_lite else properties.get(WRITTEN_AT_PROPERTY), now)

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Around a write: the collection's marker says it was written, once the write is done (or has
        failed, having perhaps written part: then only as far as the server still answers)."""
        try:
            yield
        except BaseException:
            if not self.is_milvus_lite:
                with suppress(MilvusException, grpc.RpcError):
                    self._mark_written(name)
            raise
        if not self.is_milvus_lite:
            self._mark_written(name)

    def _mark_written(self, name: str) -> None:
        # The time is taken as the marker is sent, after the write: a marker never predates its write.
        self._client.alter_collection_properties(name, {WRITTEN_AT_PROPERTY: f"{time.time():.3f}"})

    def has_gallery(self, gallery: str) -> bool:
        with self._lock:
            return self._client.has_collection(collection_name(gallery))

    def ensure_gallery(self, gallery: str, model_version: str, dimension: int = EMBEDDING_DIM) -> None:
        """Create the gallery's collection for this model version and vector dimension, or check that it
        has that version."""
        name = collection_name(gallery)
        with self._lock:
            if self._client.has_collection(name):
                existing = self.model_version(gallery)
                if existing != model_version:
                    raise ModelVersionMismatch(
                        f"gallery {gallery!r} holds vectors of model version {existing!r}; "
                        f"this worker embeds with {model_version!r}. Re-index the gallery into a new one "
                        f"(or run a worker with the gallery's weights)."
                    )
                return
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("image_path", DataType.VARCHAR, max_length=4096)
            schema.add_field("image_sha256", DataType.VARCHAR, max_length=64)
            schema.add_field("face_no", DataType.INT32)
            schema.add_field("box", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
            schema.add_field("landmarks", DataType.JSON)
            schema.add_field("probability", DataType.FLOAT)
            schema.add_field("model_version", DataType.VARCHAR, max_length=128)
            schema.add_field("indexed_at", DataType.INT64)
            schema.add_field(EXTERNAL_ID_FIELD, DataType.VARCHAR, max_length=MAX_EXTERNAL_ID)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dimension))
            index_params = self._client.prepare_index_params()
            index_params.add_index("vector", index_type="FLAT", metric_type=VECTOR_METRIC)
            self._client.create_collection(
                name,
                schema=schema,
                index_params=index_params,
                properties={MODEL_VERSION_PROPERTY: model_version},
                consistency_level=STRONG,
            )

    def model_version(self, gallery: str) -> str:
        return self._model_version(gallery, self._properties(gallery))

    def _properties(self, gallery: str) -> dict:
        """The collection's properties, asked afresh (another process may have written the gallery)."""
        with self._lock:
            name = collection_name(gallery)
            if not self._client.has_collection(name):
                raise GalleryNotFound(f"gallery {gallery!r} does not exist in {self.uri}")
            return dict(self._client.describe_collection(name).get("properties") or {})

    def _model_version(self, gallery: str, properties: dict) -> str:
        version = properties.get(MODEL_VERSION_PROPERTY)
        if not version:
            raise GalleryNotFound(f"collection {collection_name(gallery)!r} has no FaceGate model version: "
                                  "not a FaceGate gallery")
        return version

    def dimension(self, gallery: str) -> int:
        """The vector dimension the gallery's collection was created with."""
        name = collection_name(gallery)
        if name not in self._dims:
            with self._lock:
                if not self._client.has_collection(name):
                    raise GalleryNotFound(f"gallery {gallery!r} does not exist in {self.uri}")
                fields = self._client.describe_collection(name).get("fields") or []
            vector = next((f for f in fields if f.get("name") == "vector"), None)
            dim = (vector or {}).get("params", {}).get("dim")
            if dim is None:
                raise GalleryNotFound(f"collection {name!r} has no vector field: not a FaceGate gallery")
            self._dims[name] = int(dim)
        return self._dims[name]

    def has_external_ids(self, gallery: str) -> bool:
        """Whether the gallery's collection has the external id field (collections made before it do not:
        they are read and written as before, without labels)."""
        name = collection_name(gallery)
        if name not in self._fields:
            with self._lock:
                if not self._client.has_collection(name):
                    raise GalleryNotFound(f"gallery {gallery!r} does not exist in {self.uri}")
                fields = self._client.describe_collection(name).get("fields") or []
            self._fields[name] = {str(f.get("name")) for f in fields}
        return EXTERNAL_ID_FIELD in self._fields[name]

    def _face_fields(self, gallery: str) -> list[str]:
        return ["image_path", "image_sha256", "face_no", "box", "probability"] + (
            [EXTERNAL_ID_FIELD] if self.has_external_ids(gallery) else [])

    @staticmethod
    def _stored_face(row: dict) -> StoredFace:
        return StoredFace(face_id=str(row["id"]), image_path=row["image_path"], image_sha256=row["image_sha256"],
                          face_no=int(row["face_no"]), box=[float(v) for v in row["box"]],
                          probability=float(row["probability"]), external_id=row.get(EXTERNAL_ID_FIELD) or None)

    def list_faces(self, gallery: str, *, offset: int = 0, limit: int = 100) -> list[StoredFace]:
        """One page of the gallery's faces (no vectors), in the store's order (a Milvus server pages at most
        16384 rows deep: offset + limit)."""
        fields = self._face_fields(gallery)
        with self._lock:
            rows = self._reloading(gallery, lambda name: self._client.query(
                name, filter='id != ""', output_fields=fields, offset=offset, limit=limit, consistency_level=STRONG))
        return [self._stored_face(r) for r in rows]

    def get_faces(self, gallery: str, face_ids: Sequence[str], *, fields: list[str] | None = None) -> list[StoredFace]:
        """These faces, in the order asked (ids the gallery does not hold are left out)."""
        if not face_ids:
            return []
        fields = fields or self._face_fields(gallery)
        with self._lock:
            rows = self._reloading(gallery, lambda name: self._client.get(
                name, ids=list(face_ids), output_fields=fields, consistency_level=STRONG))
        found = {str(r["id"]): self._stored_face(r) for r in rows}
        return [found[i] for i in face_ids if i in found]

    def delete_faces(self, gallery: str, face_ids: Sequence[str]) -> list[StoredFace]:
        """Delete faces by id; the faces that were there (what was deleted)."""
        present = self.get_faces(gallery, face_ids)
        if present:
            with self._lock:
                name = self._collection(gallery)
                with self._writing(name):
                    self._client.delete(name, ids=[f.face_id for f in present])
        return present

    def info(self, gallery: str) -> GalleryInfo:
        version = self.model_version(gallery)
        return GalleryInfo(name=gallery, model_version=version, faces=self.count(gallery),
                           dimension=self.dimension(gallery), index=self.index_info(gallery))

    def drop_gallery(self, gallery: str) -> None:
        with self._lock:
            name = collection_name(gallery)
            if self._client.has_collection(name):
                self._client.drop_collection(name)
            self._metrics.pop(name, None)
            self._indexes.pop(name, None)
            self._dims.pop(name, None)
            self._fields.pop(name, None)

    def count(self, gallery: str, filter_expr: str = "") -> int:
        with self._lock:
            rows = self._reloading(gallery, lambda name: self._client.query(
                name, filter=filter_expr, output_fields=["count(*)"], consistency_level=STRONG))
        return int(rows[0]["count(*)"]) if rows else 0

    def _reloading(self, gallery: str, read: Callable[[str], T]) -> T:
        """A read of the gallery's collection; loaded again once if another process released it (a
        store building the gallery's HNSW index releases it for the build, then loads it again)."""
        name = self._collection(gallery)
        try:
            return read(name)
        except MilvusException as exc:
            message = exc.message or ""
            # Released under a call in flight: "delegator closed during wait tsafe: channel not available".
            if exc.code != COLLECTION_NOT_LOADED and "not loaded" not in message and "channel not available" not in message:
                raise
        self._metrics.pop(name, None)
        return read(self._collection(gallery))

    # Writes -------------------------------------------------------------------------------------

    def upsert_faces(self, records: Sequence[FaceRecord]) -> int:
        """Write faces in large batches; the same face written twice stays one row."""
        if not records:
            return 0
        now = int(time.time())
        by_gallery: dict[str, list[FaceRecord]] = {}
        for record in records:
            by_gallery.setdefault(record.gallery, []).append(record)
        written = 0
        for gallery, items in by_gallery.items():
            vectors = _unit_rows(np.stack([np.asarray(r.vector, dtype=np.float32) for r in items]))
            labelled = self.has_external_ids(gallery)
            if vectors.shape[1] != self.dimension(gallery):
                raise ValueError(f"gallery {gallery!r} holds {self.dimension(gallery)}-d vectors, not {vectors.shape[1]}-d")
            rows = [
                {
                    "id": r.id,
                    "image_path": r.image_path,
                    "image_sha256": r.image_sha256,
                    "face_no": int(r.face_no),
                    "box": [float(v) for v in r.box],
                    # A Milvus server takes a JSON object only (an array fails the whole call).
                    "landmarks": {"points": [[float(x), float(y)] for x, y in r.landmarks]},
                    "probability": float(r.probability),
                    "model_version": r.model_version,
                    "indexed_at": now,
                    "vector": vector,
                    **({EXTERNAL_ID_FIELD: r.external_id[:MAX_EXTERNAL_ID]} if labelled else {}),
                }
                for r, vector in zip(items, vectors)
            ]
            with self._lock:
                name = self._collection(gallery)
                with self._writing(name):
                    for batch in _batches_by_size(rows):
                        written += self._client.upsert(name, batch)["upsert_count"]
                if self.is_milvus_lite:
                    self._unflushed[name] = self._unflushed.get(name, 0) + len(rows)
                    if self._unflushed[name] >= LITE_FLUSH_ROWS:
                        self._flush(name)
                else:
                    self._fit_index(name)
        return written

    def _flush(self, name: str) -> None:
        self._client.flush(name)
        self._unflushed[name] = 0

    def delete_image(self, gallery: str, *, image_path: str | None = None, image_sha256: str | None = None) -> int:
        """Delete every face of one image, named by path, by content hash, or both."""
        clauses = []
        if image_path is not None:
            clauses.append(f"image_path == {_quote(image_path)}")
        if image_sha256 is not None:
            clauses.append(f"image_sha256 == {_quote(image_sha256)}")
        if not clauses:
            raise ValueError("delete_image needs an image_path or an image_sha256")
        return self._delete(gallery, " and ".join(clauses))

    def delete_stale_versions(self, gallery: str, current: dict[str, str]) -> int:
        """For each path -> sha256 given, delete that path's faces stored from other content.

        One `image_path in [...]` query per slice of paths, then one delete by primary key of the stale
        rows (usually none): Milvus Lite scans the collection once per filter, so a filtered delete per
        image cost a scan per image (bench/store_writes.py).
        """
        paths = list(current)
        stale: list[str] = []
        with self._lock:
            name = self._collection(gallery)
            for start in range(0, len(paths), STALE_QUERY_PATHS):
                listed = ", ".join(_quote(p) for p in paths[start : start + STALE_QUERY_PATHS])
                # Through _reloading: a server restarted since this process loaded the collection holds it
                # released, and a query of it fails until it is loaded again.
                rows = self._reloading(gallery, partial(
                    self._client.query, filter=f"image_path in [{listed}]",
                    output_fields=["image_path", "image_sha256"], consistency_level=STRONG))
                stale.extend(str(r["id"]) for r in rows if r["image_sha256"] != current[r["image_path"]])
            if not stale:
                return 0
            with self._writing(name):
                result = self._client.delete(name, ids=stale)
        return _deleted_count(result)

    def _delete(self, gallery: str, filter_expr: str) -> int:
        with self._lock, self._writing(self._collection(gallery)):
            result = self._reloading(gallery, lambda n: self._client.delete(n, filter=filter_expr))
        return _deleted_count(result)

    # Reads --------------------------------------------------------------------------------------

    def search(
        self,
        gallery: str,
        vectors: np.ndarray,
        *,
        model_version: str,
        top_k: int,
        threshold: float,
    ) -> list[list[StoredMatch]]:
        """Top-k gallery faces per probe vector, similarity >= threshold, best first; many probes per call."""
        properties = self._properties(gallery)
        gallery_version = self._model_version(gallery, properties)
        if gallery_version != model_version:
            raise ModelVersionMismatch(
                f"probe embedded by model version {model_version!r} cannot be compared with gallery "
                f"{gallery!r}, embedded by {gallery_version!r}"
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        dimension = self.dimension(gallery)
        if vectors.ndim != 2 or vectors.shape[1] != dimension:
            raise ValueError(f"probe vectors must have shape (n, {dimension}) for gallery {gallery!r}, got {vectors.shape}")
        if len(vectors) == 0:
            return []
        vectors = _unit_rows(vectors)
        output = ["image_path", "image_sha256", "box"] + ([EXTERNAL_ID_FIELD] if self.has_external_ids(gallery) else [])
        consistency = self._read_consistency(properties)
        with self._lock:
            return self._reloading(gallery, lambda name: self._search(name, vectors, top_k, threshold, output,
                                                                      consistency))

    def _search(self, name: str, vectors: np.ndarray, top_k: int, threshold: float,
                output: list[str], consistency: str = STRONG) -> list[list[StoredMatch]]:
        results: list[list[StoredMatch]] = []
        if self.is_milvus_lite:
            # Milvus Lite turns every unflushed row into a Python dict on every search call (604 ms
            # for one probe against 10k unflushed faces, 51 ms flushed); a flush with nothing
            # pending costs a few ms. A Milvus server seals segments itself.
            self._flush(name)
        # A plain top-k search; the threshold is applied here. A range search (radius) makes
        # Milvus Lite fetch several times top-k hits per probe and filter them afterwards.
        params = {"metric_type": self._metrics[name], "params": self._indexes[name].search_params_for(top_k)}
        per_call = max(1, min(SEARCH_BATCH_PROBES, SEARCH_RESULT_HITS // top_k))
        for start in range(0, len(vectors), per_call):
            for probe_hits in self._search_call(name, vectors[start : start + per_call], top_k, params, output,
                                                consistency):
                matches = [
                    StoredMatch(
                        face_id=str(h["id"]),
                        image_path=h["entity"]["image_path"],
                        image_sha256=h["entity"]["image_sha256"],
                        similarity=float(h["distance"]),
                        box=[float(v) for v in h["entity"]["box"]],
                        external_id=h["entity"].get(EXTERNAL_ID_FIELD) or None,
                    )
                    for h in probe_hits
                    if float(h["distance"]) >= threshold
                ]
                matches.sort(key=lambda m: m.similarity, reverse=True)
                results.append(matches)
        return results

    def _search_call(self, name: str, vectors: np.ndarray, top_k: int, params: dict, output: list[str],
                     consistency: str = STRONG) -> list:
        try:
            return list(self._client.search(
                name,
                data=vectors,
                limit=top_k,
                output_fields=output,
                search_params=params,
                anns_field="vector",
                consistency_level=consistency,
            ))
        except grpc.RpcError as exc:
            if len(vectors) < 2 or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        # The answer outgrew the message limit: the same probes in two calls (the hits do not change).
        half = len(vectors) // 2
        return (self._search_call(name, vectors[:half], top_k, params, output, consistency)
                + self._search_call(name, vectors[half:], top_k, params, output, consistency))


def read_consistency(written_at: object, now: float | None = None) -> str:
    """Bounded where `written_at` (the gallery's write marker) is at least BOUNDED_AFTER_S old; Strong where
    it is more recent, missing or unreadable."""
    try:
        age = (time.time() if now is None else now) - float(written_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return STRONG
    return BOUNDED if age >= BOUNDED_AFTER_S else STRONG


def _row_bytes(row: dict) -> int:
    """About what one row weighs in an upsert call: its vector and its strings."""
    return 4 * len(row["vector"]) + len(row["image_path"].encode()) + 256


def _batches_by_size(rows: list[dict]) -> list[list[dict]]:
    """Rows in calls of at most UPSERT_BATCH_ROWS rows and about CALL_BYTES bytes each."""
    batches: list[list[dict]] = []
    batch: list[dict] = []
    size = 0
    for row in rows:
        weight = _row_bytes(row)
        if batch and (len(batch) >= UPSERT_BATCH_ROWS or size + weight > CALL_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append(row)
        size += weight
    if batch:
        batches.append(batch)
    return batches


def gallery_index(uri: str, token: str | None, gallery: str, policy: IndexPolicy | None = None) -> dict | None:
    """The index a gallery is searched with, for a process that does not hold the store (the API, the CLI).

    A Milvus Lite file is not opened: it belongs to the one process holding it (the embedded worker), and
    Lite searches FLAT. None: the gallery has no collection yet (nothing indexed). Store failures read as
    {"error": sentence}.
    """
    from index.errors import StoreFailed, StoreUnavailable, store_errors

    if "://" not in uri:
        return {**choose_index(0, lite=True).as_dict(), "metric": None, "engine": "milvus-lite"}
    try:
        with store_errors(uri):
            store = GalleryStore(uri, token, policy)
            try:
                return store.index_info(gallery)
            finally:
                store.close()
    except GalleryNotFound:
        return None
    except (StoreUnavailable, StoreFailed) as exc:
        return {"error": str(exc)}


def _deleted_count(result: object) -> int:
    if isinstance(result, dict):
        return int(result.get("delete_count", 0))
    return len(result)  # type: ignore[arg-type]  # pymilvus returns a dict or a sized result; typed `object`
