"""Where the embedding weights come from: facenet-pytorch's VGGFace2 download or a checked file, dlib's
file inside the face-recognition-models package, or `untrained`; and the model version they give."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facegate.embedding_models import (
    DLIB_RESNET_V1,
    FACENET_VGGFACE2,
    MODELS,
    UNTRAINED,
    VGGFACE2_URL,
    ModelError,
    configured_family,
    dlib_file,
    file_sha256,
    sha256_file,
    torch_checkpoint_dir,
    untrained_version,
    version_for,
)

if TYPE_CHECKING:
    import torch

    from facegate.settings import Settings

__all__ = ["PRETRAINED_VGGFACE2", "UNTRAINED", "VGGFACE2_URL", "ResolvedWeights", "WeightsError", "how_to_get_weights",
           "load_state_dict", "resolve_model", "resolve_weights", "sha256_file", "torch_checkpoint_dir",
           "version_for_file"]
PRETRAINED_VGGFACE2 = "vggface2"
# The classifier head of the pretrained file is not part of the embedding network.
_HEAD_PREFIX = "logits."


class WeightsError(RuntimeError):
    """The configured weights cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ResolvedWeights:
    model_version: str
    untrained: bool
    path: Path | None = None
    sha256: str | None = None
    seed: int = 0
    family: str = FACENET_VGGFACE2

    @property
    def dimension(self) -> int:
        return MODELS[self.family].dimension


def version_for_file(sha256: str) -> str:
    # The same bytes give the same version however they arrived (download or file setting).
    return version_for(FACENET_VGGFACE2, sha256)


def how_to_get_weights() -> str:
    return (
        "FaceGate needs InceptionResnetV1 VGGFace2 weights. Either let facenet-pytorch download them "
        f"(needs internet: {VGGFACE2_URL} into {torch_checkpoint_dir()}), or download that file on a "
        "machine with internet, copy it here and set FACEGATE_WEIGHTS=/path/to/20180402-114759-vggface2.pt "
        "and FACEGATE_WEIGHTS_SHA256=<output of sha256sum on that file>. For tests and offline demos only, "
        "FACEGATE_WEIGHTS=untrained uses a random network: its matches mean nothing about identity. "
        "Or use the other real model, which installs with FaceGate and needs no download: "
        "FACEGATE_MODEL=dlib-resnet-v1 (dlib's public-domain ResNet; galleries of one model are never "
        "searched with the other)."
    )


def _download(target: Path) -> None:
    from torch.hub import download_url_to_file

    target.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(VGGFACE2_URL, str(target), progress=False)


def resolve_weights(setting: str, expected_sha256: str | None = None, *, seed: int = 0,
                    allow_download: bool = True) -> ResolvedWeights:
    """Turn the `weights` setting into a checked file (or the explicit untrained network)."""
    if setting == UNTRAINED:
        return ResolvedWeights(model_version=untrained_version(seed), untrained=True, seed=seed, family=UNTRAINED)

    if setting == PRETRAINED_VGGFACE2:
        path = torch_checkpoint_dir() / Path(VGGFACE2_URL).name
        if not path.exists():
            if not allow_download:
                raise WeightsError(f"pretrained weights are not in {path}. " + how_to_get_weights())
            try:
                _download(path)
            except Exception as exc:  # noqa: BLE001 -- urllib, socket and SSL errors alike: the fix is the same
                path.unlink(missing_ok=True)
                raise WeightsError(f"could not download the pretrained weights ({exc}). " + how_to_get_weights()) from None
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist. " + how_to_get_weights())
        if not expected_sha256:
            raise WeightsError(
                f"weights file {path} is given without FACEGATE_WEIGHTS_SHA256; set it to the file's sha256 "
                "(sha256sum FILE) so that a wrong or corrupted file is refused"
            )

    actual = sha256_file(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise WeightsError(
            f"weights file {path} has sha256 {actual}, but FACEGATE_WEIGHTS_SHA256 is {expected_sha256}: refused"
        )
    return ResolvedWeights(model_version=version_for_file(actual), untrained=False, path=path, sha256=actual)


def resolve_dlib() -> ResolvedWeights:
    """dlib's ResNet face descriptor, read in place from the installed face-recognition-models package."""
    try:
        path = dlib_file()
    except ModelError as exc:
        raise WeightsError(str(exc)) from None
    sha = file_sha256(path)
    return ResolvedWeights(model_version=version_for(DLIB_RESNET_V1, sha), untrained=False, path=path, sha256=sha,
                           family=DLIB_RESNET_V1)


def resolve_model(settings: "Settings", *, allow_download: bool = True) -> ResolvedWeights:
    """The weights of the model the settings choose (FACEGATE_MODEL; FACEGATE_WEIGHTS for VGGFace2)."""
    family = configured_family(settings)
    if family == DLIB_RESNET_V1:
        return resolve_dlib()
    setting = UNTRAINED if family == UNTRAINED else settings.weights
    return resolve_weights(setting, settings.weights_sha256, seed=settings.untrained_seed,
                           allow_download=allow_download)


def load_state_dict(weights: ResolvedWeights) -> dict[str, torch.Tensor]:
    """The embedding network's tensors from a checked file; a file that is not one says so."""
    import torch  # here, not at import: the CLI checks weights without paying for torch

    assert weights.path is not None
    try:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch.load raises anything a corrupt file makes its unpickler raise
        raise WeightsError(f"weights file {weights.path} cannot be read as a torch state dict: {exc}") from None
    if not isinstance(state, dict) or "last_linear.weight" not in state:
        raise WeightsError(f"weights file {weights.path} is not an InceptionResnetV1 state dict")
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX)}
