"""FacePipeline: images in, faces with embeddings out; embedding batched across images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from facegate.messages import ItemOutcome
from facegate.settings import Settings
from workers.batching import BatchPolicy
from workers.imaging import ImageRejected, load_image
from workers.models import DetectedFace, FaceDetector, FaceEmbedder, resolve_device
from workers.models.embedder import aligned_crop_tensor
from workers.weights import resolve_weights

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class AnalysedImage:
    path: str
    sha256: str
    faces: list[DetectedFace]
    embeddings: np.ndarray  # (len(faces), 512), unit vectors


class FacePipeline:
    """Decode and detect per image, then embed the faces of all images in device-sized batches."""

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, batch_policy: BatchPolicy, *,
                 max_image_bytes: int, max_image_pixels: int) -> None:
        self.detector = detector
        self.embedder = embedder
        self.batch_policy = batch_policy
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> "FacePipeline":
        device = resolve_device(settings.device)
        weights = resolve_weights(settings.weights, settings.weights_sha256, seed=settings.untrained_seed)
        detector = FaceDetector(device, min_face_size=settings.min_face_size,
                                min_probability=settings.min_face_probability, max_side=settings.max_detect_side)
        return cls(detector, FaceEmbedder(device, weights), BatchPolicy.for_device(device, settings.embed_batch_size),
                   max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels)

    @property
    def model_version(self) -> str:
        return self.embedder.model_version

    @property
    def untrained(self) -> bool:
        return self.embedder.untrained

    def warm_up(self) -> None:
        self.detector.ensure_loaded()
        self.embedder.ensure_loaded()

    def analyse(self, paths: Sequence[str], *, aligned: bool = False,
                on_progress: ProgressCallback | None = None) -> tuple[list[AnalysedImage], list[ItemOutcome]]:
        """Every image's faces and embeddings; a bad image becomes a failed outcome, never an exception."""
        prepared: list[tuple[str, str, list[DetectedFace], torch.Tensor]] = []
        outcomes: dict[str, ItemOutcome] = {}
        for done, path in enumerate(paths, start=1):
            try:
                decoded = load_image(path, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
                if aligned:
                    w, h = decoded.image.size
                    faces = [DetectedFace(box=(0.0, 0.0, float(w), float(h)), probability=1.0, landmarks=())]
                    crops = aligned_crop_tensor(decoded.image).unsqueeze(0)
                else:
                    faces = self.detector.detect(decoded.image)
                    crops = self.detector.crop(decoded.image, faces)
            except ImageRejected as exc:
                outcomes[path] = ItemOutcome(path=path, ok=False, reason=str(exc))
            else:
                prepared.append((path, decoded.sha256, faces, crops))
                outcomes[path] = ItemOutcome(path=path, ok=True, faces=len(faces), image_sha256=decoded.sha256)
            if on_progress:
                on_progress(done)

        embeddings = self._embed_all([crops for *_, crops in prepared])
        images: list[AnalysedImage] = []
        offset = 0
        for path, sha, faces, _ in prepared:
            images.append(AnalysedImage(path, sha, faces, embeddings[offset : offset + len(faces)]))
            offset += len(faces)
        return images, [outcomes[p] for p in paths]

    def _embed_all(self, per_image_crops: list[torch.Tensor]) -> np.ndarray:
        if not per_image_crops:
            return np.empty((0, 512), dtype=np.float32)
        crops = torch.cat(per_image_crops) if per_image_crops else torch.empty((0, 3, 160, 160))
        parts = [self.embedder.embed(crops[s]) for s in self.batch_policy.slices(len(crops))]
        return np.concatenate(parts) if parts else np.empty((0, 512), dtype=np.float32)
