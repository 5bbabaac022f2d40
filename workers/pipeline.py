"""FacePipeline: images in, faces with embeddings out.

The stages overlap instead of running one after another per image:

    decode threads ──> detection thread(s) ──> crop threads ──> embedding thread (device-sized batches)

- A small thread pool reads, hashes and decodes the images ahead of the detector and prepares the
  detection-scale copy (PIL releases the GIL while decoding and resizing). At most
  `batch_policy.prefetch` images are decoded ahead, so memory does not grow with the number of paths.
- Detection: on CPU, `detect_threads` images at once, one MTCNN per thread on its share of the cores
  (MTCNN's small ops do not spread one image over cores well); on a GPU, one thread sends letterboxed
  batches of `detect_images` images. Results are taken in input order.
- Crops are cut from the original images in the decode pool, and faces of many images go to the
  embedder in batches of `batch_policy.max_faces`, on a thread of its own, so detection of the next
  images proceeds while a batch is embedded.
- Each call logs, and keeps in `last_times`, the seconds spent per stage (bench/queue.py reads them).

`analyse` loads the models, then `_analyse` runs one `_Analysis`: a method per stage (decode ahead, group
and detect, collect each image's outcome, crops and quality, embed in `BatchPolicy.slices`, assemble).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, ParamSpec, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from facegate.embedding_models import DLIB_RESNET_V1
from facegate.messages import ItemOutcome
from facegate.settings import Settings
from workers.batching import BatchPolicy
from workers.imaging import DecodedImage, ImageRejected, load_image
from workers.models import DetectedFace, FaceDetector, FaceEmbedder, resolve_device
from workers.models.dlib_resnet import DlibFaceEmbedder
from workers.models.detector import DetectionInput
from workers.quality import FaceQuality, assess_faces
from workers.weights import resolve_model

ProgressCallback = Callable[[int], None]
_P = ParamSpec("_P")
_T = TypeVar("_T")
log = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim, or a no-op elsewhere.

    Images of every size make MTCNN allocate tensors of every size, from several threads; glibc keeps
    the freed memory in its arenas and the RSS of a worker climbs with the number of images indexed
    (bench/README.md, Memory). Trimming after each call returns it to the OS and keeps the RSS flat,
    for ~90 ms per chunk of 16 images.
    """
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_freed_memory = _load_malloc_trim()


@dataclass(frozen=True)
class AnalysedImage:
    path: str
    sha256: str
    faces: list[DetectedFace]
    embeddings: np.ndarray  # (len(faces), the model's dimension), unit vectors
    # One per face (workers/quality.py), empty when the pipeline does not assess quality.
    qualities: list[FaceQuality] = field(default_factory=list)


@dataclass
class StageTimes:
    """Seconds spent per stage in one `analyse` call. Decode and crop are summed over their threads."""

    images: int = 0
    faces: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0
    detect_s: float = 0.0
    crop_s: float = 0.0
    embed_s: float = 0.0
    quality_s: float = 0.0  # quality signals per face, summed over the decode threads
    wait_s: float = 0.0  # the detection thread waiting for decoded images (the decoder is the bottleneck)
    models_s: float = 0.0  # time during which detection or embedding (or both) ran: their union
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _busy: list[tuple[float, float]] = field(default_factory=list, repr=False, compare=False)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)
            if name in ("detect_s", "embed_s"):
                end = time.perf_counter()
                self._busy.append((end - seconds, end))

    def close(self) -> None:
        """Sum the union of the model intervals (detection and embedding may overlap in time)."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self._busy):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        self.models_s = total

    def summary(self) -> str:
        return (f"{self.images} images, {self.faces} faces in {self.wall_s:.3f} s: detect {self.detect_s:.3f} s, "
                f"embed {self.embed_s:.3f} s, detect or embed {self.models_s:.3f} s, decode {self.decode_s:.3f} s (threads), crop {self.crop_s:.3f} s "
                f"(threads), quality {self.quality_s:.3f} s (threads), waiting for decode {self.wait_s:.3f} s")


class _Inline(Executor):
    """An executor that runs each call at once, in the calling thread (embedding not overlapped)."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


@dataclass
class _Prepared:
    """One decoded image on its way through the stages."""

    decoded: DecodedImage
    detect_input: DetectionInput | None = None  # None in aligned mode
    aligned_crop: torch.Tensor | None = None  # the embedder's input for the one face, in aligned mode


# An image's place in the input and what decoding made of it.
_Decoded = tuple[int, "_Prepared | ImageRejected"]


@dataclass(frozen=True)
class _Accepted:
    """An image that decoded: its faces, and its faces' quality signals still being measured."""

    path: str
    sha256: str
    faces: list[DetectedFace]
    quality: "Future[list[FaceQuality]] | None"


@dataclass
class _Pools:
    """The threads of one `analyse` call, sized by its batch policy."""

    decode: ThreadPoolExecutor
    detect: Executor
    embed: Executor
    torch_threads: int  # torch's own thread count when the call began, restored when it ends

    @classmethod
    def open(cls, policy: BatchPolicy) -> "_Pools":
        torch_threads = torch.get_num_threads()
        decode = ThreadPoolExecutor(max_workers=policy.decode_threads, thread_name_prefix="fg-decode")
        embed: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fg-embed") if policy.embed_thread \
            else _Inline()
        detect: Executor = _Inline()
        if policy.detect_threads > 1:
            # CPU: MTCNN's many small ops use two cores better as two images at once, one core each,
            # than as one image on two cores (bench/README.md).
            per_thread = max(1, torch_threads // policy.detect_threads)
            detect = ThreadPoolExecutor(max_workers=policy.detect_threads, thread_name_prefix="fg-detect",
                                        initializer=torch.set_num_threads, initargs=(per_thread,))
        return cls(decode, detect, embed, torch_threads)

    def close(self) -> None:
        for pool in (self.decode, self.embed, self.detect):
            pool.shutdown(wait=True, cancel_futures=True)
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)


class _Analysis:
    """One `analyse` call, stage by stage: decode ahead, detect in groups, crop and assess each image's
    faces, embed full batches, assemble. Each stage is a method; what they share is the call's state."""

    def __init__(self, pipeline: "FacePipeline", paths: list[str], aligned: bool,
                 on_progress: ProgressCallback | None, pools: _Pools) -> None:
        self.pipeline = pipeline
        self.policy = pipeline.batch_policy
        self.paths = paths
        self.aligned = aligned
        self.on_progress = on_progress
        self.pools = pools
        self.times = StageTimes()
        self.decoding: deque[Future[_Prepared | ImageRejected]] = deque()  # in input order
        self.submitted = 0  # images sent to decoding so far
        self.grouped = 0  # images taken into detection groups so far
        self.done = 0  # images with an outcome
        self.outcomes: list[ItemOutcome | None] = [None] * len(paths)
        self.accepted: list[_Accepted] = []
        # Crops waiting for a full batch, in image order (a crop still being cut is its future), and the
        # embedding batches sent, in the same order.
        self.waiting: list[torch.Tensor | Future[torch.Tensor]] = []
        self.waiting_faces = 0
        self.embedded: list[Future[np.ndarray]] = []

    def run(self) -> tuple[list[AnalysedImage], list[ItemOutcome]]:
        self._decode_ahead()
        detecting: deque[tuple[list[_Decoded], Future[list[list[DetectedFace]]]]] = deque()
        while self.grouped < len(self.paths):
            group = self._next_group()
            detecting.append((group, self.pools.detect.submit(self._detect, group)))
            # Several groups in detection at once (threads), their results taken in input order.
            while len(detecting) >= self.policy.detect_threads or (detecting and detecting[0][1].done()):
                finished, found = detecting.popleft()
                self._collect(finished, found.result())
        while detecting:
            finished, found = detecting.popleft()
            self._collect(finished, found.result())
        self._embed_waiting(final=True)
        return self._assemble()

    # Decode ---------------------------------------------------------------------------------------

    def _decode_ahead(self) -> None:
        """Keep up to `prefetch` images decoding ahead of detection, so memory does not grow with the paths."""
        while self.submitted < len(self.paths) and len(self.decoding) < self.policy.prefetch:
            self.decoding.append(self.pools.decode.submit(self.pipeline._decode, self.paths[self.submitted],
                                                          self.aligned, self.times))
            self.submitted += 1

    # Detect ---------------------------------------------------------------------------------------

    def _next_group(self) -> list[_Decoded]:
        """The next detection group: the next image, or up to `detect_images` of them (GPU)."""
        group: list[_Decoded] = []
        while self.decoding and len(group) < self.policy.detect_images:
            if group and not self.decoding[0].done():
                break  # do not hold back a ready group for an image still decoding
            started = time.perf_counter()
            item = self.decoding.popleft().result()
            self.times.add("wait_s", time.perf_counter() - started)
            self._decode_ahead()
            group.append((self.grouped, item))
            self.grouped += 1
        return group

    def _detect(self, group: list[_Decoded]) -> list[list[DetectedFace]]:
        """Runs in a detection thread: the faces of each of the group's decoded images."""
        ok = [p for _, p in group if not isinstance(p, ImageRejected)]
        if self.aligned:
            # An aligned image is the face: its one box is the whole image.
            return [[DetectedFace(box=(0.0, 0.0, float(p.decoded.image.width), float(p.decoded.image.height)),
                                  probability=1.0, landmarks=())] for p in ok]
        if not ok:
            return []
        inputs = [p.detect_input for p in ok if p.detect_input is not None]  # all of them outside aligned mode
        started = time.perf_counter()
        try:
            return self.pipeline.detector.detect_prepared(inputs, batch_images=self.policy.detect_images)
        finally:
            self.times.add("detect_s", time.perf_counter() - started)

    # Crop and assess ------------------------------------------------------------------------------

    def _collect(self, group: list[_Decoded], found: list[list[DetectedFace]]) -> None:
        """In input order: each image's outcome, its crops and quality queued, progress; then full batches
        go to the embedder."""
        faces_of = iter(found)
        for index, prepared in group:
            if isinstance(prepared, ImageRejected):
                self.outcomes[index] = ItemOutcome(path=self.paths[index], ok=False, reason=str(prepared))
            else:
                self._accept(index, prepared, next(faces_of))
            self.done += 1
            if self.on_progress:
                self.on_progress(self.done)
        self._embed_waiting(final=False)

    def _accept(self, index: int, prepared: _Prepared, faces: list[DetectedFace]) -> None:
        decoded = prepared.decoded
        self.outcomes[index] = ItemOutcome(path=self.paths[index], ok=True, faces=len(faces),
                                           image_sha256=decoded.sha256)
        quality = self.pools.decode.submit(self.pipeline._assess, decoded.image, faces, self.times) \
            if faces and self.pipeline.assess_quality else None
        self.accepted.append(_Accepted(self.paths[index], decoded.sha256, faces, quality))
        if faces:
            # Aligned: the crop was made while decoding. Else cut from the original image, in the decode pool.
            self.waiting.append(prepared.aligned_crop if prepared.aligned_crop is not None
                                else self.pools.decode.submit(self.pipeline._crop, decoded.image, faces, self.times))
            self.waiting_faces += len(faces)

    # Embed ----------------------------------------------------------------------------------------

    def _embed_waiting(self, final: bool) -> None:
        """Send the waiting crops to the embedder in the policy's batches: full batches only, the rest too
        when `final`. Faces of one image may be split across two batches."""
        if self.waiting_faces < self.policy.max_faces and not (final and self.waiting_faces):
            return
        parts = [c.result() if isinstance(c, Future) else c for c in self.waiting]
        crops = parts[0] if len(parts) == 1 else torch.cat(parts)
        sent = 0
        for batch in self.policy.slices(len(crops), partial=final):
            self.embedded.append(self.pools.embed.submit(self.pipeline._embed, crops[batch], self.times))
            sent = batch.stop
        # What is left waits for the next batch, copied so that it holds none of the batches sent.
        self.waiting = [crops[sent:].clone()] if sent < len(crops) else []
        self.waiting_faces = len(crops) - sent

    # Assemble -------------------------------------------------------------------------------------

    def _assemble(self) -> tuple[list[AnalysedImage], list[ItemOutcome]]:
        """Each accepted image with its rows of the embeddings, in input order; every image's outcome."""
        vectors = [f.result() for f in self.embedded]
        embeddings = np.concatenate(vectors) if vectors else \
            np.empty((0, self.pipeline.dimension), dtype=np.float32)
        images: list[AnalysedImage] = []
        offset = 0
        for item in self.accepted:
            quality = item.quality.result() if item.quality is not None else []
            images.append(AnalysedImage(item.path, item.sha256, item.faces,
                                        embeddings[offset : offset + len(item.faces)], quality))
            offset += len(item.faces)
        return images, [o for o in self.outcomes if o is not None]


class FacePipeline:
    """Decode, detect, crop and embed with the stages overlapped; embedding batched across images."""

    def __init__(self, detector: FaceDetector, embedder: "FaceEmbedder | DlibFaceEmbedder", batch_policy: BatchPolicy, *,
                 max_image_bytes: int, max_image_pixels: int, assess_quality: bool = True) -> None:
        self.detector = detector
        # Measure each face's quality signals (size, sharpness, exposure, pose, probability): what probe
        # quality floors and enrolment filters decide on. Off only to measure its cost (bench/quality.py).
        self.assess_quality = assess_quality
        self.embedder = embedder
        self.batch_policy = batch_policy
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.last_times = StageTimes()

    @classmethod
    def from_settings(cls, settings: Settings) -> "FacePipeline":
        device = resolve_device(settings.device)
        weights = resolve_model(settings)
        detector = FaceDetector(device, min_face_size=settings.min_face_size,
                                min_probability=settings.min_face_probability, max_side=settings.max_detect_side,
                                channels_last=settings.channels_last)
        embedder: FaceEmbedder | DlibFaceEmbedder
        if weights.family == DLIB_RESNET_V1:
            embedder = DlibFaceEmbedder(device, weights, precision=settings.embed_precision,
                                        channels_last=settings.channels_last)
        else:
            embedder = FaceEmbedder(device, weights, precision=settings.embed_precision,
                                    channels_last=settings.channels_last)
        policy = BatchPolicy.for_device(device, settings.embed_batch_size,
                                        detect_images=settings.detect_batch_size,
                                        decode_threads=settings.decode_threads,
                                        embed_thread=settings.embed_thread,
                                        detect_threads=settings.detect_threads)
        return cls(detector, embedder, policy, max_image_bytes=settings.max_image_bytes,
                   max_image_pixels=settings.max_image_pixels)

    @property
    def model_version(self) -> str:
        return self.embedder.model_version

    @property
    def untrained(self) -> bool:
        return self.embedder.untrained

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    def warm_up(self) -> None:
        self.detector.ensure_loaded()
        self.embedder.ensure_loaded()

    # Stages -----------------------------------------------------------------------------------------

    def _decode(self, path: str, aligned: bool, times: StageTimes) -> _Prepared | ImageRejected:
        """Runs in a decode thread. A bad image is returned as its rejection, never raised."""
        started = time.perf_counter()
        try:
            decoded = load_image(path, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
            if aligned:
                return _Prepared(decoded, aligned_crop=self.embedder.aligned_input(decoded.image))
            return _Prepared(decoded, detect_input=self.detector.prepare(decoded.image))
        except ImageRejected as exc:
            return exc
        finally:
            times.add("decode_s", time.perf_counter() - started)

    def _crop(self, image: Image.Image, faces: list[DetectedFace], times: StageTimes) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self.embedder.crop(image, faces)
        finally:
            times.add("crop_s", time.perf_counter() - started)

    def _assess(self, image: Image.Image, faces: list[DetectedFace], times: StageTimes) -> list[FaceQuality]:
        started = time.perf_counter()
        try:
            return assess_faces(image, faces)
        finally:
            times.add("quality_s", time.perf_counter() - started)

    def _embed(self, crops: torch.Tensor, times: StageTimes) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.embedder.embed(crops)
        finally:
            times.add("embed_s", time.perf_counter() - started)

    # The pipeline -----------------------------------------------------------------------------------

    def analyse(self, paths: Sequence[str], *, aligned: bool = False,
                on_progress: ProgressCallback | None = None) -> tuple[list[AnalysedImage], list[ItemOutcome]]:
        """Every image's faces and embeddings; a bad image becomes a failed outcome, never an exception.

        Outcomes come back in input order; images (those that decoded) too, each with its faces in the
        detector's order (most probable first) and one unit vector per face.
        """
        self._load(aligned)
        return self._analyse(list(paths), aligned, on_progress)

    def _load(self, aligned: bool) -> None:
        if not aligned:  # aligned images skip detection
            self.detector.ensure_loaded()
        self.embedder.ensure_loaded()

    def _analyse(self, paths: list[str], aligned: bool,
                 on_progress: ProgressCallback | None) -> tuple[list[AnalysedImage], list[ItemOutcome]]:
        wall = time.perf_counter()
        pools = _Pools.open(self.batch_policy)
        run = _Analysis(self, paths, aligned, on_progress, pools)
        try:
            images, outcomes = run.run()
        finally:
            pools.close()
            run.waiting.clear()
            release_freed_memory()
        times = run.times
        times.images, times.faces = len(paths), sum(len(i.faces) for i in images)
        times.wall_s = time.perf_counter() - wall
        times.close()
        self.last_times = times
        log.info("analysed %s", times.summary())
        return images, outcomes
