"""The overlapped pipeline computes what the plain per-image path computes: same faces, same vectors, same order."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.conftest import ALIGNED, MULTIFACE, NOISE, PHOTOS, make_settings
from workers.batching import BatchPolicy
from workers.imaging import load_image
from workers.models.base import cpu_has_native_bf16
from workers.pipeline import FacePipeline

ALL = [str(p) for p in [*PHOTOS, MULTIFACE, NOISE, *ALIGNED]]


def sequential(pipeline: FacePipeline, paths, aligned: bool = False):
    """The reference: decode, detect, crop and embed one image at a time, nothing overlapped."""
    from workers.models.embedder import aligned_crop_tensor

    out = []
    for path in paths:
        image = load_image(path, max_bytes=10**8, max_pixels=10**8).image
        if aligned:
            crops = aligned_crop_tensor(image).unsqueeze(0)
            out.append((path, None, pipeline.embedder.embed(crops)))
            continue
        faces = pipeline.detector.detect(image)
        out.append((path, faces, pipeline.embedder.embed(pipeline.detector.crop(image, faces))))
    return out


@pytest.fixture(scope="module")
def reference(pipeline):
    return sequential(pipeline, ALL)


def _assert_same(images, reference):
    assert [i.path for i in images] == [p for p, _, _ in reference]
    for img, (_, faces, vectors) in zip(images, reference):
        # Detection threads run MTCNN on one core each: float sums in another order, boxes equal to ~1e-4 px.
        assert len(img.faces) == len(faces)
        assert np.allclose([f.box for f in img.faces], [f.box for f in faces], atol=1e-2)
        assert np.allclose([f.probability for f in img.faces], [f.probability for f in faces], atol=1e-5)
        assert img.embeddings.shape == vectors.shape
        assert np.allclose(img.embeddings, vectors, atol=1e-4)


def test_overlapped_pipeline_equals_sequential_path(pipeline, reference):
    images, outcomes = pipeline.analyse(ALL)
    assert [o.path for o in outcomes] == ALL and all(o.ok for o in outcomes)
    assert [o.faces for o in outcomes] == [len(f) for _, f, _ in reference]
    _assert_same(images, reference)


def test_batch_slices_hold_back_a_partial_batch_until_the_end():
    policy = BatchPolicy(max_faces=4)
    assert list(policy.slices(10)) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(policy.slices(10, partial=False)) == [slice(0, 4), slice(4, 8)]
    assert list(policy.slices(3, partial=False)) == [] and list(policy.slices(0)) == []


@pytest.mark.parametrize("policy", [BatchPolicy(max_faces=4, decode_threads=3),
                                    BatchPolicy(max_faces=4, decode_threads=2, embed_thread=False),
                                    BatchPolicy(max_faces=1, decode_threads=1),
                                    BatchPolicy(max_faces=5, decode_threads=2, detect_threads=3),
                                    BatchPolicy(max_faces=64, decode_threads=4)], ids=str)
def test_any_batching_and_thread_count_gives_the_same_result(pipeline, reference, monkeypatch, policy):
    monkeypatch.setattr(pipeline, "batch_policy", policy)
    images, _ = pipeline.analyse(ALL)
    _assert_same(images, reference)


def test_bad_images_fail_in_place_and_progress_counts_every_image(pipeline, reference, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(PHOTOS[1].read_bytes()[:2000])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    paths = [str(text), ALL[0], str(tmp_path / "missing.jpg"), str(MULTIFACE), str(corrupt), str(NOISE), str(text)]
    seen: list[int] = []
    images, outcomes = pipeline.analyse(paths, on_progress=seen.append)
    assert [o.path for o in outcomes] == paths
    assert [o.ok for o in outcomes] == [False, True, False, True, False, True, False]
    assert outcomes[2].reason == "file not found" and "corrupt" in outcomes[4].reason
    assert seen == list(range(1, len(paths) + 1))
    by_path = {p: (f, v) for p, f, v in reference}
    assert [i.path for i in images] == [ALL[0], str(MULTIFACE), str(NOISE)]
    for img in images:
        faces, vectors = by_path[img.path]
        assert np.allclose([f.box for f in img.faces], [f.box for f in faces], atol=1e-2)
        assert np.allclose(img.embeddings, vectors, atol=1e-4)


def test_aligned_mode_equals_sequential(pipeline):
    paths = [str(p) for p in ALIGNED]
    images, outcomes = pipeline.analyse(paths, aligned=True)
    assert all(o.ok and o.faces == 1 for o in outcomes)
    for img, (_, _, vectors) in zip(images, sequential(pipeline, paths, aligned=True)):
        assert img.faces[0].box == (0.0, 0.0, 160.0, 160.0)
        assert np.allclose(img.embeddings, vectors, atol=1e-5)


def test_detection_threads_leave_the_torch_thread_count_as_it_was(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline, "batch_policy", BatchPolicy(max_faces=32, detect_threads=2))
    before = torch.get_num_threads()
    images, outcomes = pipeline.analyse([str(MULTIFACE), str(NOISE), str(PHOTOS[0])])
    assert [o.faces for o in outcomes] == [6, 0, 1]
    assert torch.get_num_threads() == before


def test_empty_input(pipeline):
    assert pipeline.analyse([]) == ([], [])


def test_decoding_runs_ahead_by_a_bounded_number_of_images(pipeline, monkeypatch):
    """Memory does not grow with the number of paths: at most `prefetch` images are decoded ahead."""
    policy = BatchPolicy(max_faces=32, decode_threads=2)
    monkeypatch.setattr(pipeline, "batch_policy", policy)
    lock = threading.Lock()
    state = {"decoded": 0, "detected": 0, "ahead": 0}
    decode, detect = pipeline._decode, pipeline.detector.detect_prepared

    def counting_decode(*args):
        result = decode(*args)
        with lock:
            state["decoded"] += 1
            state["ahead"] = max(state["ahead"], state["decoded"] - state["detected"])
        return result

    def counting_detect(inputs, **kwargs):
        with lock:
            state["detected"] += len(inputs)
        return detect(inputs, **kwargs)

    monkeypatch.setattr(pipeline, "_decode", counting_decode)
    monkeypatch.setattr(pipeline.detector, "detect_prepared", counting_detect)
    paths = [str(p) for p in ALIGNED] * 6
    images, _ = pipeline.analyse(paths)
    assert len(images) == len(paths) and state["detected"] == len(paths)
    assert state["ahead"] <= policy.prefetch


def test_stage_times_are_recorded(pipeline):
    pipeline.analyse([str(MULTIFACE), str(PHOTOS[0])])
    times = pipeline.last_times
    assert times.images == 2 and times.faces == 7
    assert times.detect_s > 0 and times.embed_s > 0 and times.decode_s > 0 and times.wall_s > 0


def test_settings_reach_the_pipeline(tmp_path, monkeypatch):
    for name, value in {"DECODE_THREADS": "3", "DETECT_BATCH_SIZE": "5", "EMBED_PRECISION": "bf16",
                        "CHANNELS_LAST": "false", "EMBED_THREAD": "false", "DETECT_THREADS": "1"}.items():
        monkeypatch.setenv(f"FACEGATE_{name}", value)
    pipe = FacePipeline.from_settings(make_settings(tmp_path))
    assert pipe.batch_policy.detect_threads == 1
    assert pipe.batch_policy.decode_threads == 3 and pipe.batch_policy.detect_images == 5
    assert not pipe.batch_policy.embed_thread
    assert pipe.embedder.dtype == torch.bfloat16 and not pipe.embedder.channels_last
    assert not pipe.detector.channels_last
    for name in ("DECODE_THREADS", "DETECT_BATCH_SIZE", "EMBED_PRECISION", "CHANNELS_LAST", "EMBED_THREAD",
                 "DETECT_THREADS"):
        monkeypatch.delenv(f"FACEGATE_{name}")
    default = FacePipeline.from_settings(make_settings(tmp_path))
    # CPU default: bf16 where the CPU runs it natively (within 0.01 cosine of fp32), else fp32.
    assert default.embedder.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert default.detector.channels_last
    assert default.batch_policy.detect_images == 1 and default.batch_policy.max_faces == 32
    assert default.batch_policy.embed_thread
    assert default.batch_policy.detect_threads == min(4, torch.get_num_threads())
