"""The pipeline's embeddings equal facenet-pytorch's own, and faces of many images share one forward pass."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from PIL import Image
from torchvision import transforms

from tests.conftest import ALIGNED, MULTIFACE, PHOTOS, make_settings
from workers.pipeline import FacePipeline


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A state dict the test writes: a seeded InceptionResnetV1 plus the classifier head the real file has."""
    torch.manual_seed(1234)
    net = InceptionResnetV1()
    state = net.state_dict()
    state["logits.weight"] = torch.randn(8631, 512)
    state["logits.bias"] = torch.randn(8631)
    path = tmp_path_factory.mktemp("weights") / "test-vggface2.pt"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_aligned_embeddings_equal_facenet_pytorch_reference(tmp_path, weights_file):
    path, sha = weights_file
    settings = make_settings(tmp_path, weights=str(path), weights_sha256=sha, embed_precision="fp32")
    pipeline = FacePipeline.from_settings(settings)
    images, outcomes = pipeline.analyse([str(p) for p in ALIGNED], aligned=True)
    assert all(o.ok for o in outcomes)
    ours = np.stack([img.embeddings[0] for img in images])
    # The default precision (bf16 on a CPU that runs it natively) stays within 0.01 cosine distance.
    default = FacePipeline.from_settings(make_settings(tmp_path, weights=str(path), weights_sha256=sha))
    images, _ = default.analyse([str(p) for p in ALIGNED], aligned=True)
    ours_default = np.stack([img.embeddings[0] for img in images])

    # facenet-pytorch's documented preparation of aligned crops (examples/finetune.ipynb), one at a time.
    reference = InceptionResnetV1()
    state = torch.load(path, weights_only=True)
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith("logits.")})
    reference.eval()
    prepare = transforms.Compose([np.float32, transforms.ToTensor(), fixed_image_standardization])
    with torch.inference_mode():
        theirs = np.stack([reference(prepare(Image.open(p).convert("RGB")).unsqueeze(0))[0].numpy() for p in ALIGNED])
    assert np.allclose(ours, theirs, atol=1e-5)
    theirs_unit = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    assert (1.0 - np.sum(ours_default * theirs_unit, axis=1)).max() < 0.01
    assert pipeline.model_version == default.model_version == f"facenet-vggface2:{sha[:16]}"
    assert not pipeline.untrained


def test_faces_of_many_images_share_one_forward_pass(pipeline, monkeypatch):
    calls: list[int] = []
    original = pipeline.embedder.embed

    def counting(crops):
        calls.append(len(crops))
        return original(crops)

    monkeypatch.setattr(pipeline.embedder, "embed", counting)
    images, _ = pipeline.analyse([str(p) for p in PHOTOS] + [str(MULTIFACE)])
    assert sum(len(i.faces) for i in images) == len(PHOTOS) + 6
    assert calls == [len(PHOTOS) + 6]  # one batch across five images, not one per image


def test_batch_policy_splits_large_batches(pipeline, monkeypatch):
    from workers.batching import BatchPolicy

    calls: list[int] = []
    original = pipeline.embedder.embed
    monkeypatch.setattr(pipeline.embedder, "embed", lambda crops: calls.append(len(crops)) or original(crops))
    monkeypatch.setattr(pipeline, "batch_policy", BatchPolicy(max_faces=4))
    images, _ = pipeline.analyse([str(MULTIFACE), str(PHOTOS[0])])
    assert calls == [4, 3]
    assert [len(i.embeddings) for i in images] == [6, 1]


def test_embeddings_are_unit_vectors_and_deterministic_across_instances(tmp_path, pipeline):
    other = FacePipeline.from_settings(make_settings(tmp_path))
    a, _ = pipeline.analyse([str(ALIGNED[0])], aligned=True)
    b, _ = other.analyse([str(ALIGNED[0])], aligned=True)
    assert np.isclose(np.linalg.norm(a[0].embeddings[0]), 1.0, atol=1e-5)
    # A seeded untrained network: every process builds the same one, so vectors compare across workers.
    assert np.allclose(a[0].embeddings, b[0].embeddings, atol=1e-6)
