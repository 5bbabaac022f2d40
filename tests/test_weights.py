"""Weights: the download path, a file checked against its sha256, `untrained`, and clear errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from facenet_pytorch import InceptionResnetV1

from workers import weights as weights_module
from workers.models import FaceEmbedder
from workers.weights import WeightsError, resolve_weights


@pytest.fixture
def state_dict_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(InceptionResnetV1().state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_dict_written_by_test_loads(state_dict_file):
    path, sha = state_dict_file
    resolved = resolve_weights(str(path), sha)
    assert resolved.sha256 == sha and not resolved.untrained
    embedder = FaceEmbedder(torch.device("cpu"), resolved)
    out = embedder.embed(torch.zeros(2, 3, 160, 160))
    assert out.shape == (2, 512)


def test_wrong_sha256_is_refused(state_dict_file):
    path, sha = state_dict_file
    with pytest.raises(WeightsError, match="sha256.*refused"):
        resolve_weights(str(path), "0" * 64)


def test_file_without_sha256_is_refused(state_dict_file):
    path, _ = state_dict_file
    with pytest.raises(WeightsError, match="FACEGATE_WEIGHTS_SHA256"):
        resolve_weights(str(path), None)


def test_missing_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*FACEGATE_WEIGHTS="):
        resolve_weights(str(tmp_path / "nope.pt"), "0" * 64)


def test_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"hello": torch.zeros(1)}, path)
    resolved = resolve_weights(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(WeightsError, match="not an InceptionResnetV1 state dict"):
        FaceEmbedder(torch.device("cpu"), resolved).ensure_loaded()


def test_no_weights_and_no_download_gives_the_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(target):
        raise OSError("Network is unreachable")

    # Only the network is replaced; the cache folder, the checks and the message are the real ones.
    monkeypatch.setattr(weights_module, "_download", offline)
    with pytest.raises(WeightsError) as info:
        resolve_weights("vggface2")
    message = str(info.value)
    assert "could not download" in message and "Network is unreachable" in message
    assert "FACEGATE_WEIGHTS=" in message and "FACEGATE_WEIGHTS_SHA256" in message and "untrained" in message
    assert not (tmp_path / "torch" / "checkpoints" / "20180402-114759-vggface2.pt").exists()


def test_pretrained_weights_found_in_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "checkpoints" / "20180402-114759-vggface2.pt"
    cached.parent.mkdir(parents=True)
    torch.save(InceptionResnetV1().state_dict(), cached)
    monkeypatch.setattr(weights_module, "_download", lambda target: pytest.fail("must not download"))
    resolved = resolve_weights("vggface2")
    assert resolved.path == cached
    assert resolved.model_version.startswith("facenet-vggface2:")


def test_untrained_is_explicit_and_named_in_the_model_version():
    resolved = resolve_weights("untrained", seed=3)
    assert resolved.untrained and resolved.model_version == "untrained-seed3"
