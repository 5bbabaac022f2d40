"""Embedding speed-ups keep the numbers: channels_last, folded batch norms, half precision (bf16 CPU, fp16 CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import ALIGNED, MULTIFACE, PHOTOS
from workers.imaging import load_image
from workers.models import FaceDetector, FaceEmbedder
from workers.models.base import cpu_has_native_bf16, resolve_precision
from workers.models.embedder import aligned_crop_tensor
from workers.weights import resolve_weights

CPU = torch.device("cpu")
WEIGHTS = resolve_weights("untrained", seed=0)  # asked for explicitly: these tests compare numbers, not identities


@pytest.fixture(scope="module")
def fixture_crops() -> torch.Tensor:
    """Every face of the fixtures, cut the way the pipeline cuts them, plus the aligned crops."""
    detector = FaceDetector(CPU, min_face_size=20, min_probability=0.9, max_side=1280)
    crops = [torch.stack([aligned_crop_tensor(load_image(p, max_bytes=10**8, max_pixels=10**8).image)
                          for p in ALIGNED])]
    for path in [*PHOTOS, MULTIFACE]:
        image = load_image(path, max_bytes=10**8, max_pixels=10**8).image
        crops.append(detector.crop(image, detector.detect(image)))
    out = torch.cat(crops)
    assert len(out) == len(ALIGNED) + len(PHOTOS) + 6
    return out


@pytest.fixture(scope="module")
def plain_fp32(fixture_crops) -> np.ndarray:
    """facenet-pytorch's network as it is: contiguous, batch norms unfolded, fp32."""
    return FaceEmbedder(CPU, WEIGHTS, precision="fp32", channels_last=False, fold_bn=False).embed(fixture_crops)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_channels_last_equals_contiguous(fixture_crops, plain_fp32):
    out = FaceEmbedder(CPU, WEIGHTS, precision="fp32", channels_last=True, fold_bn=False).embed(fixture_crops)
    assert np.allclose(out, plain_fp32, atol=1e-5)


def test_folded_batch_norms_equal_the_network(fixture_crops, plain_fp32):
    out = FaceEmbedder(CPU, WEIGHTS, precision="fp32", channels_last=False, fold_bn=True).embed(fixture_crops)
    assert np.allclose(out, plain_fp32, atol=1e-5)


def test_fp32_cpu_embedder_equals_the_network(fixture_crops, plain_fp32):
    out = FaceEmbedder(CPU, WEIGHTS, precision="fp32").embed(fixture_crops)
    assert np.allclose(out, plain_fp32, atol=1e-5)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_bf16_on_cpu_within_001_cosine_distance_of_fp32(fixture_crops, plain_fp32):
    out = FaceEmbedder(CPU, WEIGHTS, precision="bf16").embed(fixture_crops)
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert _cosine_distance(out, plain_fp32).max() < 0.01
    # Still its own nearest neighbour among the fixtures' faces.
    assert (np.argmax(out @ plain_fp32.T, axis=1) == np.arange(len(out))).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 embedding runs on CUDA only")
def test_fp16_on_cuda_within_001_cosine_distance_of_fp32(fixture_crops, plain_fp32):
    cuda = torch.device("cuda")
    out = FaceEmbedder(cuda, WEIGHTS, precision="auto").embed(fixture_crops)
    assert FaceEmbedder(cuda, WEIGHTS).dtype == torch.float16
    assert _cosine_distance(out, plain_fp32).max() < 0.01


def test_default_cpu_embedder_is_bf16_where_the_cpu_runs_it_natively(fixture_crops, plain_fp32):
    embedder = FaceEmbedder(CPU, WEIGHTS)
    assert embedder.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert _cosine_distance(embedder.embed(fixture_crops), plain_fp32).max() < 0.01


def test_precision_setting():
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_precision("fp32", CPU) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("int8", CPU)
    assert isinstance(cpu_has_native_bf16(), bool)
