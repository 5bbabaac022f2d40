"""MTCNN through the pipeline's detector: the real photos, real detection weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN
from PIL import Image

from tests.conftest import ALIGNED, MULTIFACE, NOISE, PHOTOS
from workers.imaging import load_image
from workers.models import FaceDetector


def _detect(pipeline, path):
    image = load_image(path, max_bytes=10**8, max_pixels=10**8).image
    return image, pipeline.detector.detect(image)


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_one_face_in_each_single_person_photo(pipeline, photo):
    image, faces = _detect(pipeline, photo)
    assert len(faces) == 1
    face = faces[0]
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
    assert face.probability >= 0.9
    assert len(face.landmarks) == 5
    # Landmarks lie inside the box, mapped back to original pixels like the box.
    for x, y in face.landmarks:
        assert x1 <= x <= x2 and y1 <= y <= y2


def test_six_faces_in_group_photo(pipeline):
    _, faces = _detect(pipeline, MULTIFACE)
    assert len(faces) == 6
    probabilities = [f.probability for f in faces]
    assert probabilities == sorted(probabilities, reverse=True)


def test_no_face_in_noise(pipeline):
    _, faces = _detect(pipeline, NOISE)
    assert faces == []


@pytest.mark.parametrize("crop", ALIGNED, ids=lambda p: p.name)
def test_face_found_in_aligned_crop(pipeline, crop):
    _, faces = _detect(pipeline, crop)
    assert len(faces) == 1


def test_large_photo_detected_on_downscaled_copy_box_in_original_pixels(pipeline):
    big = max(PHOTOS, key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    image, faces = _detect(pipeline, big)
    assert max(image.size) > pipeline.detector.max_side
    reference = MTCNN(keep_all=True, device="cpu")
    with torch.inference_mode():
        boxes, probs = reference.detect(image)
    best = np.asarray(boxes[int(np.argmax(np.asarray(probs, dtype=float)))], dtype=float)
    # Same face as full-resolution MTCNN, within a few percent of the face size.
    tolerance = 0.08 * (best[2] - best[0])
    assert np.allclose(faces[0].box, best, atol=tolerance)


def test_crops_are_exactly_facenet_pytorch_crops():
    """Below the max side, the pipeline's crops equal MTCNN.forward's standardised 160x160 crops."""
    image = Image.open(MULTIFACE).convert("RGB")
    detector = FaceDetector(torch.device("cpu"), min_face_size=20, min_probability=0.9, max_side=max(image.size))
    faces = detector.detect(image)
    ours = detector.crop(image, faces)
    reference = MTCNN(keep_all=True, device="cpu", select_largest=False)
    with torch.inference_mode():
        theirs = reference(image)
    assert ours.shape == theirs.shape == (6, 3, 160, 160)
    assert torch.allclose(ours, theirs, atol=1e-6)
