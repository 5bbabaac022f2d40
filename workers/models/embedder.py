"""InceptionResnetV1 face embeddings (facenet-pytorch, VGGFace2 weights): 512-d, L2-normalised."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from PIL import Image
from torchvision.transforms import functional as TF

from workers.models.base import InferenceModel
from workers.models.detector import CROP_SIZE
from workers.weights import ResolvedWeights, load_state_dict


def aligned_crop_tensor(image: Image.Image) -> torch.Tensor:
    """An already aligned face crop, prepared the way facenet-pytorch documents (resized to 160 if needed)."""
    if image.size != (CROP_SIZE, CROP_SIZE):
        image = image.resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR)
    return fixed_image_standardization(TF.to_tensor(np.float32(image)))


def build_untrained_network(seed: int) -> InceptionResnetV1:
    """A random network for tests and offline demos. Seeded, so every process builds the same one.

    PyTorch's default init collapses every face onto one direction (cosine ~0.99999 between any two
    faces); Kaiming-normal init keeps enough variance that a crop is measurably closest to itself.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = InceptionResnetV1(pretrained=None, classify=False)
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


class FaceEmbedder(InferenceModel):
    def __init__(self, device: torch.device, weights: ResolvedWeights) -> None:
        super().__init__(device)
        self.weights = weights
        self._net: InceptionResnetV1 | None = None

    @property
    def model_version(self) -> str:
        return self.weights.model_version

    @property
    def untrained(self) -> bool:
        return self.weights.untrained

    def _load(self) -> None:
        if self.weights.untrained:
            net = build_untrained_network(self.weights.seed)
        else:
            net = InceptionResnetV1(pretrained=None, classify=False)
            net.load_state_dict(load_state_dict(self.weights))
        self._net = net.eval().to(self.device)

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """One forward pass for the whole batch of crops; returns float32 unit vectors (n, 512)."""
        self.ensure_loaded()
        assert self._net is not None
        if len(crops) == 0:
            return np.empty((0, 512), dtype=np.float32)
        with torch.inference_mode():
            out = self._net(crops.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()
