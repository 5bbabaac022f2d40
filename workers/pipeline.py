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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

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


class _Inline:
    """An executor that runs each call at once, in the calling thread (embedding not overlapped)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, **_kwargs) -> None:
        pass


@dataclass
class _Prepared:
    """One decoded image on its way through the stages."""

    decoded: DecodedImage
    detect_input: DetectionInput | None = None  # None in aligned mode
    aligned_crop: torch.Tensor | None = None  # the embedder's input for the one face, in aligned mode


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

    def _crop(self, image, faces: list[DetectedFace], times: StageTimes) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return self.embedder.crop(image, faces)
        finally:
            times.add("crop_s", time.perf_counter() - started)

    def _assess(self, image, faces: list[DetectedFace], times: StageTimes) -> list[FaceQuality]:
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
        policy = self.batch_policy
        times = StageTimes()
        wall = time.perf_counter()
        paths = list(paths)
        outcomes: list[ItemOutcome | None] = [None] * len(paths)
        accepted: list[tuple[str, str, list[DetectedFace], Future | None]] = []

        # Crops waiting for a full batch, in image order, and the embedding batches in flight.
        pending_crops: deque[tuple[int, Future | torch.Tensor]] = deque()  # (faces, crops)
        pending_faces = 0
        embedded: list[Future] = []

        decoding: deque[Future] = deque()  # decoded (or decoding) images, in input order
        decode_pool = ThreadPoolExecutor(max_workers=policy.decode_threads, thread_name_prefix="fg-decode")
        embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fg-embed") if policy.embed_thread \
            else _Inline()
        torch_threads = torch.get_num_threads()
        if policy.detect_threads > 1:
            # CPU: MTCNN's many small ops use two cores better as two images at once, one core each,
            # than as one image on two cores (bench/README.md). Restored when the call ends.
            per_thread = max(1, torch_threads // policy.detect_threads)
            detect_pool = ThreadPoolExecutor(max_workers=policy.detect_threads, thread_name_prefix="fg-detect",
                                             initializer=torch.set_num_threads, initargs=(per_thread,))
        else:
            detect_pool = _Inline()
        try:
            if not aligned:
                self.detector.ensure_loaded()
            self.embedder.ensure_loaded()
            next_to_submit = 0

            def top_up() -> None:
                nonlocal next_to_submit
                while next_to_submit < len(paths) and len(decoding) < policy.prefetch:
                    decoding.append(decode_pool.submit(self._decode, paths[next_to_submit], aligned, times))
                    next_to_submit += 1

            def flush(final: bool) -> None:
                """Send full batches (or, at the end, the rest) of pending crops to the embedder."""
                nonlocal pending_faces
                size = policy.max_faces
                while pending_faces >= size or (final and pending_faces > 0):
                    take, parts = min(size, pending_faces), []
                    need = take
                    while need:
                        count, crops = pending_crops.popleft()
                        if isinstance(crops, Future):
                            crops = crops.result()
                        if count > need:  # split an image's faces across two batches
                            parts.append(crops[:need])
                            pending_crops.appendleft((count - need, crops[need:]))
                            need = 0
                        else:
                            parts.append(crops)
                            need -= count
                    pending_faces -= take
                    batch = parts[0] if len(parts) == 1 else torch.cat(parts)
                    embedded.append(embed_pool.submit(self._embed, batch, times))

            def detect(group: list[tuple[int, _Prepared | ImageRejected]]) -> list[list[DetectedFace]]:
                """Runs in a detection thread: the faces of the group's decoded images."""
                ok = [p for _, p in group if not isinstance(p, ImageRejected)]
                if aligned or not ok:
                    return [[DetectedFace(box=(0.0, 0.0, float(p.decoded.image.width),
                                               float(p.decoded.image.height)), probability=1.0, landmarks=())]
                            for p in ok] if aligned else []
                started = time.perf_counter()
                try:
                    return self.detector.detect_prepared([p.detect_input for p in ok],
                                                         batch_images=policy.detect_images)
                finally:
                    times.add("detect_s", time.perf_counter() - started)

            def collect(group: list[tuple[int, _Prepared | ImageRejected]], found: list[list[DetectedFace]]) -> None:
                """In input order: outcomes, crops for the embedder, progress."""
                nonlocal done, pending_faces
                faces_of = iter(found)
                for index, prepared in group:
                    if not isinstance(prepared, ImageRejected):
                        faces = next(faces_of)
                        decoded = prepared.decoded
                        outcomes[index] = ItemOutcome(path=paths[index], ok=True, faces=len(faces),
                                                      image_sha256=decoded.sha256)
                        quality = decode_pool.submit(self._assess, decoded.image, faces, times) \
                            if faces and self.assess_quality else None
                        accepted.append((paths[index], decoded.sha256, faces, quality))
                        if faces:
                            crops = prepared.aligned_crop if aligned else \
                                decode_pool.submit(self._crop, decoded.image, faces, times)
                            pending_crops.append((len(faces), crops))
                            pending_faces += len(faces)
                    else:
                        outcomes[index] = ItemOutcome(path=paths[index], ok=False, reason=str(prepared))
                    done += 1
                    if on_progress:
                        on_progress(done)
                flush(final=False)

            top_up()
            done = 0
            grouped = 0  # images taken into detection groups so far
            detecting: deque[tuple[list, Future]] = deque()
            while grouped < len(paths):
                # One detection group: the next image, or up to `detect_images` of them on a GPU.
                group: list[tuple[int, _Prepared | ImageRejected]] = []
                while decoding and len(group) < policy.detect_images:
                    if group and not decoding[0].done():
                        break  # do not hold back a ready group for an image still decoding
                    started = time.perf_counter()
                    item = decoding.popleft().result()
                    times.add("wait_s", time.perf_counter() - started)
                    top_up()
                    group.append((grouped, item))
                    grouped += 1
                detecting.append((group, detect_pool.submit(detect, group)))
                # Several groups in detection at once (threads), their results taken in input order.
                while len(detecting) >= policy.detect_threads or (detecting and detecting[0][1].done()):
                    finished, future = detecting.popleft()
                    collect(finished, future.result())
            while detecting:
                finished, future = detecting.popleft()
                collect(finished, future.result())
            flush(final=True)
            vectors = [f.result() for f in embedded]
            qualities = [q.result() if q is not None else [] for *_, q in accepted]
        finally:
            decode_pool.shutdown(wait=True, cancel_futures=True)
            embed_pool.shutdown(wait=True, cancel_futures=True)
            detect_pool.shutdown(wait=True, cancel_futures=True)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
            decoding.clear()
            pending_crops.clear()
            release_freed_memory()

        embeddings = np.concatenate(vectors) if vectors else np.empty((0, self.dimension), dtype=np.float32)
        images: list[AnalysedImage] = []
        offset = 0
        for (path, sha, faces, _), quality in zip(accepted, qualities):
            images.append(AnalysedImage(path, sha, faces, embeddings[offset : offset + len(faces)], quality))
            offset += len(faces)
        times.images, times.faces = len(paths), offset
        times.wall_s = time.perf_counter() - wall
        times.close()
        self.last_times = times
        log.info("analysed %s", times.summary())
        return images, [o for o in outcomes if o is not None]
