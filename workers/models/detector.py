"""MTCNN face detection (facenet-pytorch): boxes, probabilities, five landmarks, and 160x160 crops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from facenet_pytorch.models.utils.detect_face import extract_face
from PIL import Image

from workers.models.base import InferenceModel

CROP_SIZE = 160


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    probability: float
    landmarks: tuple[tuple[float, float], ...]  # eyes, nose, mouth corners


class FaceDetector(InferenceModel):
    def __init__(self, device: torch.device, *, min_face_size: int, min_probability: float, max_side: int) -> None:
        super().__init__(device)
        self.min_face_size = min_face_size
        self.min_probability = min_probability
        self.max_side = max_side
        self._mtcnn: MTCNN | None = None

    def _load(self) -> None:
        # MTCNN's weights ship inside facenet-pytorch: nothing is downloaded.
        self._mtcnn = MTCNN(keep_all=True, min_face_size=self.min_face_size, image_size=CROP_SIZE, margin=0,
                            post_process=True, select_largest=False, device=self.device)

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face above the probability threshold, most probable first.

        Large images are detected on a copy whose longest side is `max_side`; boxes and landmarks
        are mapped back to the original, where the crops are taken.
        """
        self.ensure_loaded()
        assert self._mtcnn is not None
        scale = min(1.0, self.max_side / max(image.size))
        small = image
        if scale < 1.0:
            small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BILINEAR)
        with torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(small, landmarks=True)
        if boxes is None:
            return []
        faces = []
        for box, prob, pts in zip(boxes, probs, points):
            if prob is None or float(prob) < self.min_probability:
                continue
            x1, y1, x2, y2 = (float(v) / scale for v in box)
            x1, y1 = max(0.0, x1), max(0.0, y1)
            x2, y2 = min(float(image.width), x2), min(float(image.height), y2)
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            marks = tuple((float(x) / scale, float(y) / scale) for x, y in np.asarray(pts))
            faces.append(DetectedFace(box=(x1, y1, x2, y2), probability=float(prob), landmarks=marks))
        faces.sort(key=lambda f: f.probability, reverse=True)
        return faces

    @staticmethod
    def crop(image: Image.Image, faces: list[DetectedFace]) -> torch.Tensor:
        """160x160 standardised crops, exactly as facenet-pytorch's MTCNN prepares them (margin 0)."""
        if not faces:
            return torch.empty((0, 3, CROP_SIZE, CROP_SIZE))
        crops = [fixed_image_standardization(extract_face(image, np.asarray(f.box), CROP_SIZE, 0)) for f in faces]
        return torch.stack(crops)
