"""Quality signals of one detected face, measured from the pixels and the detector's output.

What is measured, and how (each a plain number a purpose's floor in the registry can name; deciding
against the floor is `policy.quality.check_quality`):

- **Size** (`width_px`, `height_px`): the detected box in original-image pixels. The strongest signal
  that a face carries too little detail to identify anyone: a 38 px face has been upscaled ~4x into the
  160 px crop the embedder sees.
- **Sharpness**: the variance of the Laplacian (Pech-Pacheco et al., 2000) of the face's grey levels,
  resampled to the embedder's 160x160 input. Blur and upscaling remove high frequencies, and the
  Laplacian's variance falls with them. It also falls for faces with little texture (smooth skin, flat
  light) and rises with noise and JPEG blocking, so a floor must be set on images like the probes it
  will judge; it is a screen for gross blur, not a measure of identity information.
- **Exposure** (`brightness`): mean luminance (ITU-R 601 grey) of the face box, 0 to 1. Catches
  underexposed and blown-out faces; it does not see uneven light across the face.
- **Pose** (`yaw_deg`, `roll_deg`) from the five MTCNN landmarks (eyes, nose, mouth corners): roll is the
  angle of the line between the eyes; yaw is estimated from how far the nose sits from the midpoint of
  the eyes, as a fraction of half the eye distance, read as the sine of the turn. A geometric proxy, not a
  3D head-pose fit: it saturates near profile (where MTCNN's landmarks are themselves unreliable), and
  it reads pitch (looking up or down) as nothing. None when there are no landmarks (aligned crops).
- **Detection probability**: MTCNN's output-network score. High for almost every real face MTCNN keeps
  (it already drops faces below `min_face_probability`), so it separates little above that.

Cost: one crop, resample and 3x3 filter per face, on the decode threads (bench/quality.py measures it
against the pipeline without it, in the same run).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from policy.quality import FaceQuality
from workers.models.detector import DetectedFace

# The side the face is resampled to before the Laplacian: the embedder's input size.
SHARPNESS_SIDE = 160


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian of a 2-D grey image (levels 0-255)."""
    return float(ndimage.laplace(grey.astype(np.float32)).var())


def pose(landmarks: Sequence[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(yaw, roll) in degrees from MTCNN's five landmarks (left eye, right eye, nose, mouth left, mouth
    right); (None, None) without landmarks."""
    if len(landmarks) < 3:
        return None, None
    (lx, ly), (rx, ry), (nx, ny) = landmarks[0], landmarks[1], landmarks[2]
    dx, dy = rx - lx, ry - ly
    distance = math.hypot(dx, dy)
    if distance < 1e-6:
        return None, None
    roll = math.degrees(math.atan2(dy, dx))
    # The nose in the eyes' own frame: along the eye line, from the eyes' midpoint.
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    along = ((nx - mx) * dx + (ny - my) * dy) / distance
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, along / (distance / 2)))))
    return yaw, roll


def assess(image: Image.Image, face: DetectedFace) -> FaceQuality:
    """The quality signals of `face` in `image` (an RGB image in original pixels)."""
    x1, y1, x2, y2 = face.box
    box = (max(0, math.floor(x1)), max(0, math.floor(y1)), min(image.width, math.ceil(x2)),
           min(image.height, math.ceil(y2)))
    region = image.crop(box).convert("L")
    grey = np.asarray(region.resize((SHARPNESS_SIDE, SHARPNESS_SIDE), Image.Resampling.BILINEAR), dtype=np.float32)
    yaw, roll = pose(face.landmarks)
    return FaceQuality(width_px=round(x2 - x1, 1), height_px=round(y2 - y1, 1), sharpness=round(sharpness(grey), 2),
                       brightness=round(float(np.asarray(region, dtype=np.float32).mean()) / 255.0, 4),
                       yaw_deg=None if yaw is None else round(yaw, 1), roll_deg=None if roll is None else round(roll, 1),
                       probability=round(float(face.probability), 5))


def assess_faces(image: Image.Image, faces: Sequence[DetectedFace]) -> list[FaceQuality]:
    return [assess(image, face) for face in faces]
