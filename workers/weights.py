"""Where the embedding weights come from: facenet-pytorch's VGGFace2 download, a checked file, or `untrained`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VGGFACE2_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
UNTRAINED = "untrained"
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


def torch_checkpoint_dir() -> Path:
    """facenet-pytorch's download folder: $TORCH_HOME/checkpoints (default ~/.cache/torch/checkpoints)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "checkpoints"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_for_file(sha256: str) -> str:
    # The same bytes give the same version however they arrived (download or file setting).
    return f"inception-resnet-v1:{sha256[:16]}"


def how_to_get_weights() -> str:
    return (
        "FaceGate needs InceptionResnetV1 VGGFace2 weights. Either let facenet-pytorch download them "
        f"(needs internet: {VGGFACE2_URL} into {torch_checkpoint_dir()}), or download that file on a "
        "machine with internet, copy it here and set FACEGATE_WEIGHTS=/path/to/20180402-114759-vggface2.pt "
        "and FACEGATE_WEIGHTS_SHA256=<output of sha256sum on that file>. For tests and offline demos only, "
        "FACEGATE_WEIGHTS=untrained uses a random network: its matches mean nothing about identity."
    )


def _download(target: Path) -> None:
    from torch.hub import download_url_to_file

    target.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(VGGFACE2_URL, str(target), progress=False)


def resolve_weights(setting: str, expected_sha256: str | None = None, *, seed: int = 0,
                    allow_download: bool = True) -> ResolvedWeights:
    """Turn the `weights` setting into a checked file (or the explicit untrained network)."""
    if setting == UNTRAINED:
        return ResolvedWeights(model_version=f"untrained-seed{seed}", untrained=True, seed=seed)

    if setting == PRETRAINED_VGGFACE2:
        path = torch_checkpoint_dir() / Path(VGGFACE2_URL).name
        if not path.exists():
            if not allow_download:
                raise WeightsError(f"pretrained weights are not in {path}. " + how_to_get_weights())
            try:
                _download(path)
            except Exception as exc:  # urllib, socket and SSL errors alike: the fix is the same
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


def load_state_dict(weights: ResolvedWeights) -> dict[str, torch.Tensor]:
    """The embedding network's tensors from a checked file; a file that is not one says so."""
    import torch  # here, not at import: the CLI checks weights without paying for torch

    assert weights.path is not None
    try:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {weights.path} cannot be read as a torch state dict: {exc}") from None
    if not isinstance(state, dict) or "last_linear.weight" not in state:
        raise WeightsError(f"weights file {weights.path} is not an InceptionResnetV1 state dict")
    return {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIX)}
