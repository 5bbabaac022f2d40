"""The embedding models FaceGate knows: one table for the workers, the scheduler, the policy and the CLI.

A model has a family (what `FACEGATE_MODEL` names), a dimension, where its weights come from, and a
model version for every vector it writes: `<family>:<first 16 hex of the weights' sha256>` (the same bytes
give the same version however they arrived), or `untrained-seed<N>` for the seeded random network of tests.
The registry states its similarity floors per family or per exact version; a similarity means nothing
across families, so a probe of one model is never compared with another model's gallery.

No torch here: the CLI and the scheduler read this table without loading a network.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from facegate.files import sha256_file

if TYPE_CHECKING:
    from facegate.settings import Settings

FACENET_VGGFACE2 = "facenet-vggface2"
DLIB_RESNET_V1 = "dlib-resnet-v1"
UNTRAINED = "untrained"
MODEL_NAMES = (FACENET_VGGFACE2, DLIB_RESNET_V1, UNTRAINED)

VGGFACE2_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
DLIB_PACKAGE = "face_recognition_models"
DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"


@dataclass(frozen=True)
class EmbeddingModel:
    family: str
    dimension: int
    network: str
    weights_source: str
    licence: str
    lfw_accuracy: str  # as published by the model's authors
    # The threshold of a search that names none, where the purpose's floor is lower: a similarity that
    # means "probably the same person" for this model. Cosines of different people's unit vectors
    # reach 0.92 with dlib's model, so its default is its own.
    default_threshold: float
    trained: bool = True


MODELS: dict[str, EmbeddingModel] = {
    FACENET_VGGFACE2: EmbeddingModel(
        FACENET_VGGFACE2, 512, "InceptionResnetV1 (facenet-pytorch), 160x160 MTCNN crop",
        "facenet-pytorch's 20180402-114759-vggface2.pt: downloaded into the torch cache at first use, or "
        "FACEGATE_WEIGHTS=<file> with FACEGATE_WEIGHTS_SHA256",
        "MIT (facenet-pytorch); weights trained on VGGFace2", "99.65%", 0.5),
    DLIB_RESNET_V1: EmbeddingModel(
        DLIB_RESNET_V1, 128, "dlib's ResNet face descriptor (29 convolutions) in PyTorch, 150x150 dlib chip",
        f"{DLIB_RESNET_FILE} inside the face-recognition-models package (PyPI), read in place",
        "public domain (CC0)", "99.38%", 0.93),
    UNTRAINED: EmbeddingModel(
        UNTRAINED, 512, "InceptionResnetV1 with seeded random weights (tests and plumbing only)",
        "none: built from FACEGATE_UNTRAINED_SEED", "-", "none: matches mean nothing", 0.5, trained=False),
}


class ModelError(RuntimeError):
    """The configured model cannot be used; the message says how to fix it."""


def version_for(family: str, sha256: str) -> str:
    return f"{family}:{sha256[:16].lower()}"


def untrained_version(seed: int) -> str:
    return f"untrained-seed{seed}"


def family_of(version: str | None) -> str | None:
    """The family of a model version (`dlib-resnet-v1:0123...` -> `dlib-resnet-v1`); None if unknown."""
    if not version:
        return None
    if version.startswith("untrained-seed"):
        return UNTRAINED
    family, separator, _ = version.partition(":")
    return family if separator and family in MODELS else None


def model_of(version: str | None) -> EmbeddingModel | None:
    family = family_of(version)
    return MODELS.get(family) if family else None


def dimension_of(version: str) -> int:
    model = model_of(version)
    if model is None:
        raise ModelError(f"model version {version!r} is of no model FaceGate knows ({', '.join(MODEL_NAMES)})")
    return model.dimension


@lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, hashed once per process while its size and mtime stay the same."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def dlib_models_dir() -> Path:
    """`face_recognition_models/models/` of the installed package, found without importing it (its
    `__init__` imports `pkg_resources`, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec(DLIB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the Python package {DLIB_PACKAGE!r} (PyPI: face-recognition-models) is not installed; "
                         f"it holds dlib's public-domain {DLIB_RESNET_FILE}. Install FaceGate's dependencies.")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib_file(name: str = DLIB_RESNET_FILE) -> Path:
    path = dlib_models_dir() / name
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed face-recognition-models package; reinstall it")
    return path


def dlib_version() -> str:
    """The model version of the installed dlib ResNet file."""
    return version_for(DLIB_RESNET_V1, file_sha256(dlib_file()))


def torch_checkpoint_dir() -> Path:
    """facenet-pytorch's download folder: $TORCH_HOME/checkpoints (default ~/.cache/torch/checkpoints)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "checkpoints"


def vggface2_cache_file() -> Path:
    return torch_checkpoint_dir() / Path(VGGFACE2_URL).name


def configured_family(settings: "Settings") -> str:
    """The family the settings choose: FACEGATE_MODEL; for facenet-vggface2, FACEGATE_WEIGHTS=untrained
    (the older way to ask for the untrained network) gives `untrained`."""
    if settings.model == FACENET_VGGFACE2 and settings.weights == UNTRAINED:
        return UNTRAINED
    return settings.model


def known_model_versions(settings: "Settings | None" = None) -> frozenset[str]:
    """Every family name, and every exact model version whose weights are known here: the installed dlib
    file's, the untrained network's (default seed and the configured one), and VGGFace2's where its file
    is in the torch cache or configured with its sha256. The policy registry's floors are checked
    against this set: a floor for anything else never applies."""
    known = set(MODELS) | {untrained_version(0)}
    try:
        known.add(dlib_version())
    except (ModelError, OSError):
        pass
    cached = vggface2_cache_file()
    if cached.is_file():
        known.add(version_for(FACENET_VGGFACE2, file_sha256(cached)))
    if settings is not None:
        known.add(untrained_version(settings.untrained_seed))
        if settings.weights_sha256:
            known.add(version_for(FACENET_VGGFACE2, settings.weights_sha256))
    return frozenset(known)
