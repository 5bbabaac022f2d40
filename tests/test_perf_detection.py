"""Detection cost controls: the max-side downscale and the batched (letterboxed) MTCNN map boxes back correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facenet_pytorch import MTCNN
from PIL import Image

from tests.conftest import ALIGNED, MULTIFACE, NOISE, PHOTOS, make_settings
from workers.imaging import load_image
from workers.models import FaceDetector
from workers.models.detector import CANVAS_STEPS, canvas_for
from workers.pipeline import FacePipeline


def _image(path) -> Image.Image:
    return load_image(path, max_bytes=10**8, max_pixels=10**8).image


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(torch.device("cpu"), min_face_size=20, min_probability=0.9, max_side=640)


def test_canvases_are_few_and_hold_the_image():
    shapes = set()
    for w in range(1, 1281, 37):
        for h in range(1, 1281, 41):
            cw, ch = canvas_for((w, h), 1280)
            assert cw >= w and ch >= h and cw - w < 1280 / CANVAS_STEPS + 32 and ch - h < 1280 / CANVAS_STEPS + 32
            shapes.add((cw, ch))
    assert len(shapes) <= CANVAS_STEPS**2


def test_prepare_downscales_to_max_side_and_keeps_small_images(detector):
    big = _image(PHOTOS[0])
    prepared = detector.prepare(big)
    assert max(prepared.size) == 640 and prepared.original_size == big.size
    assert prepared.scale == pytest.approx(640 / max(big.size))
    small = _image(ALIGNED[0])
    assert detector.prepare(small).scale == 1.0 and detector.prepare(small).size == small.size


def test_downscaled_boxes_map_back_onto_full_resolution_detection(detector):
    """Detected at 640 px, the boxes land where MTCNN on the full-size image puts them."""
    reference = MTCNN(keep_all=True, device="cpu")
    for path in [*PHOTOS, MULTIFACE]:
        image = _image(path)
        ours = detector.detect(image)
        with torch.inference_mode():
            boxes, probs = reference.detect(image)
        theirs = [b for b, p in zip(boxes, probs) if p >= 0.9]
        assert len(ours) == len(theirs), path.name
        for box in theirs:
            assert max(_iou(f.box, box) for f in ours) > 0.8, path.name
        for face in ours:
            x1, y1, x2, y2 = face.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height


def test_batched_letterboxed_detection_matches_one_image_at_a_time(detector):
    images = [_image(p) for p in [*PHOTOS, MULTIFACE, NOISE, *ALIGNED, MULTIFACE]]
    prepared = [detector.prepare(im) for im in images]
    single = detector.detect_prepared(prepared, batch_images=1)
    batched = detector.detect_prepared(prepared, batch_images=4)
    assert [len(f) for f in batched] == [len(f) for f in single]
    for image, a, b in zip(images, single, batched):
        for face in a:
            best = max(b, key=lambda g: _iou(face.box, g.box))
            # The canvas shifts the pyramid's sampling grid: the same face, a few pixels apart.
            assert _iou(face.box, best.box) > 0.7
            assert abs(face.probability - best.probability) < 0.05
            x1, y1, x2, y2 = face.box
            if x1 > 0 and y1 > 0 and x2 < image.width and y2 < image.height:
                # (A face cut by the image border is refined on zero padding in a canvas, on a squeezed
                # crop without one: its landmarks may differ; its clipped box does not.)
                assert np.allclose(face.landmarks, best.landmarks, atol=0.1 * (x2 - x1))
        for face in b:
            x1, y1, x2, y2 = face.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height


def test_batched_detection_puts_images_of_a_canvas_in_one_call(detector, monkeypatch):
    calls: list[int] = []
    run = detector._run
    monkeypatch.setattr(detector, "_run", lambda pixels: calls.append(len(pixels)) or run(pixels))
    group = _image(MULTIFACE)
    detector.detect_prepared([detector.prepare(group)] * 5, batch_images=4)
    assert calls == [4, 1]  # equal canvases, at most batch_images per call


def test_letterbox_offset_free_mapping_on_a_known_layout(detector):
    """A face pasted at a known place in a larger blank image is found there, batched or not."""
    crop = _image(PHOTOS[3])
    face = detector.detect(crop)[0]
    canvas = Image.new("RGB", (crop.width + 700, crop.height + 300), (90, 90, 90))
    canvas.paste(crop, (500, 200))
    for batch in (1, 3):
        prepared = detector.prepare(canvas)
        [faces] = detector.detect_prepared([prepared], batch_images=batch)
        expected = (face.box[0] + 500, face.box[1] + 200, face.box[2] + 500, face.box[3] + 200)
        assert _iou(faces[0].box, expected) > 0.85


def test_pipeline_with_batched_detection_finds_the_same_faces(tmp_path, pipeline):
    paths = [str(p) for p in [*PHOTOS, MULTIFACE, NOISE, *ALIGNED]]
    batched = FacePipeline.from_settings(make_settings(tmp_path).model_copy(update={"detect_batch_size": 4}))
    assert batched.batch_policy.detect_images == 4
    _, ours = batched.analyse(paths)
    _, theirs = pipeline.analyse(paths)
    assert [o.faces for o in ours] == [o.faces for o in theirs]
