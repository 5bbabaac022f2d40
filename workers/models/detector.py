"""MTCNN face detection (facenet-pytorch): boxes, probabilities, five landmarks, and 160x160 crops.

Detection cost grows with pixels, so an image larger than `max_side` is detected on a downscaled
copy and the boxes and landmarks are mapped back to the original, where the crops are taken.

Two ways to run MTCNN:
- one image per call, on the (downscaled) image as it is: what the CPU wants (batching equal-size
  images gives no gain there, see /work/shared/design/stack-notes.md) and bit-for-bit what
  facenet-pytorch's `MTCNN.detect` does on that image;
- many images per call (`detect_prepared` with several inputs and `batch_images` > 1): each image is
  letterboxed (placed top-left, zero padding) on one of a few fixed canvases, and the images of one
  canvas go through MTCNN as one batch. That is what a GPU gains from (facenet-pytorch README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from facenet_pytorch import MTCNN
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from facenet_pytorch.models.utils.detect_face import detect_face, extract_face
from PIL import Image

from workers.imaging import ImageRejected
from workers.models.base import InferenceModel

CROP_SIZE = 160
# Canvases for batched detection: each side rounded up to a multiple of max_side / CANVAS_STEPS, so at
# most CANVAS_STEPS**2 canvas shapes, and at most max_side / CANVAS_STEPS pixels of padding per side.
CANVAS_STEPS = 4


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    probability: float
    landmarks: tuple[tuple[float, float], ...]  # eyes, nose, mouth corners


@dataclass(frozen=True)
class DetectionInput:
    """An image ready for MTCNN: uint8 HWC pixels at detection scale, and how to map back."""

    pixels: torch.Tensor  # (h, w, 3) uint8, the image downscaled so that its longest side <= max_side
    scale: float  # detection pixels per original pixel (<= 1)
    original_size: tuple[int, int]  # (width, height) of the original image

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def canvas_for(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The fixed canvas (width, height) a detection-scale image of this size is letterboxed onto."""
    step = max(32, math.ceil(max_side / CANVAS_STEPS))
    width, height = size
    return max(step, math.ceil(width / step) * step), max(step, math.ceil(height / step) * step)


class FaceDetector(InferenceModel):
    def __init__(self, device: torch.device, *, min_face_size: int, min_probability: float, max_side: int,
                 channels_last: bool = True) -> None:
        super().__init__(device)
        self.min_face_size = min_face_size
        self.min_probability = min_probability
        self.max_side = max_side
        self.channels_last = channels_last
        self._mtcnn: MTCNN | None = None

    def _load(self) -> None:
        # MTCNN's weights ship inside facenet-pytorch: nothing is downloaded.
        mtcnn = MTCNN(keep_all=True, min_face_size=self.min_face_size, image_size=CROP_SIZE, margin=0,
                      post_process=True, select_largest=False, device=self.device)
        mtcnn.eval()
        if self.channels_last:
            # About 1.3x faster on CPU (max-pool and the R/O-net batches); boxes move by < 1e-3 px.
            for net in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
                net.to(memory_format=torch.channels_last)
        self._mtcnn = mtcnn

    # Preparation (thread-safe, no model: runs in the pipeline's decode threads) -------------------

    def prepare(self, image: Image.Image) -> DetectionInput:
        """The detection-scale pixels of an RGB image: a copy no larger than `max_side` on its longest side."""
        scale = min(1.0, self.max_side / max(image.size))
        small = image
        if scale < 1.0:
            small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        if min(small.size) < self.min_face_size:
            # MTCNN's first scale maps min_face_size to its 12-px window: a shorter side leaves it no scale to
            # run at, and in a batch that failed every image of the chunk. One image, one outcome.
            raise ImageRejected(f"image is {image.width}x{image.height} pixels, too small to hold a face (the "
                                f"detector needs {self.min_face_size} px on the short side"
                                + (f" after scaling to {self.max_side} px on the long side)" if scale < 1.0 else ")"))
        pixels = torch.from_numpy(np.array(small.convert("RGB"), dtype=np.uint8))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        return DetectionInput(pixels=pixels, scale=scale, original_size=image.size)

    # Detection ------------------------------------------------------------------------------------

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face above the probability threshold, most probable first.

        Large images are detected on a copy whose longest side is `max_side`; boxes and landmarks
        are mapped back to the original, where the crops are taken.
        """
        return self.detect_prepared([self.prepare(image)])[0]

    def detect_prepared(self, inputs: Sequence[DetectionInput], *, batch_images: int = 1) -> list[list[DetectedFace]]:
        """Faces of each prepared image, in input order.

        `batch_images` 1: one MTCNN call per image, on the image as it is. More: images that share a
        canvas go through MTCNN together, up to `batch_images` per call.
        """
        self.ensure_loaded()
        results: list[list[DetectedFace] | None] = [None] * len(inputs)
        if batch_images <= 1:
            for i, item in enumerate(inputs):
                boxes, points = self._run([item.pixels])
                results[i] = self._faces(boxes[0], points[0], item)
            return results  # type: ignore[return-value]  # every slot was filled above: no None left

        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(inputs):
            groups.setdefault(canvas_for(item.size, self.max_side), []).append(i)
        for (cw, ch), members in groups.items():
            for start in range(0, len(members), batch_images):
                part = members[start : start + batch_images]
                canvas = torch.zeros((len(part), ch, cw, 3), dtype=torch.uint8,
                                     pin_memory=self.device.type == "cuda")
                for row, i in enumerate(part):
                    w, h = inputs[i].size
                    canvas[row, :h, :w] = inputs[i].pixels
                boxes, points = self._run(canvas)
                for row, i in enumerate(part):
                    results[i] = self._faces(boxes[row], points[row], inputs[i])
        return results  # type: ignore[return-value]  # every slot was filled above: no None left

    def _run(self, pixels: torch.Tensor | list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """facenet-pytorch's detect_face on a (n, h, w, 3) uint8 batch: per image (k, 5) boxes+score, (k, 5, 2) points."""
        assert self._mtcnn is not None
        m = self._mtcnn
        batch = torch.stack(pixels) if isinstance(pixels, list) else pixels
        batch = batch.to(self.device, non_blocking=True)
        with torch.inference_mode():
            boxes, points = detect_face(batch, m.min_face_size, m.pnet, m.rnet, m.onet, m.thresholds, m.factor,
                                        self.device)
        return list(boxes), list(points)

    def _faces(self, boxes: np.ndarray, points: np.ndarray, item: DetectionInput) -> list[DetectedFace]:
        ow, oh = item.original_size
        scale = item.scale
        faces = []
        for box, pts in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 5), np.asarray(points, dtype=np.float64)):
            prob = float(box[4])
            if prob < self.min_probability:
                continue
            # Clipped to the original image (a letterboxed image's boxes may reach into the padding).
            x1, y1, x2, y2 = (float(v) / scale for v in box[:4])
            x1, y1 = max(0.0, x1), max(0.0, y1)
            x2, y2 = min(float(ow), x2), min(float(oh), y2)
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            marks = tuple((float(x) / scale, float(y) / scale) for x, y in pts)
            faces.append(DetectedFace(box=(x1, y1, x2, y2), probability=prob, landmarks=marks))
        faces.sort(key=lambda f: f.probability, reverse=True)
        return faces

    @staticmethod
    def crop(image: Image.Image, faces: list[DetectedFace]) -> torch.Tensor:
        """160x160 standardised crops, exactly as facenet-pytorch's MTCNN prepares them (margin 0)."""
        if not faces:
            return torch.empty((0, 3, CROP_SIZE, CROP_SIZE))
        crops = [fixed_image_standardization(extract_face(image, np.asarray(f.box), CROP_SIZE, 0)) for f in faces]
        return torch.stack(crops)
