"""InceptionResnetV1 face embeddings (facenet-pytorch, VGGFace2 weights): 512-d, L2-normalised.

Inference form of the network: batch norms folded into the convolutions before them, channels_last
memory format, and a compute dtype per device (fp16 on CUDA, fp32 on CPU unless bf16 is asked for).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torchvision.transforms import functional as TF

from workers.models.base import InferenceModel, resolve_precision
from workers.models.detector import CROP_SIZE
from workers.weights import ResolvedWeights, load_state_dict


def aligned_crop_tensor(image: Image.Image) -> torch.Tensor:
    """An already aligned face crop, prepared the way facenet-pytorch documents (resized to 160 if needed)."""
    if image.size != (CROP_SIZE, CROP_SIZE):
        image = image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR)
    return fixed_image_standardization(TF.to_tensor(np.asarray(image, dtype=np.float32)))


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


def fold_batch_norms(net: InceptionResnetV1) -> InceptionResnetV1:
    """Fold every eval-mode batch norm into the convolution (or linear layer) before it.

    Same function to float rounding (max difference ~1e-7 on unit vectors); one op fewer per layer.
    """
    net.eval()
    for module in net.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv, bn)
            module.bn = nn.Identity()
    if isinstance(net.last_bn, nn.BatchNorm1d):
        net.last_linear = fuse_linear_bn_eval(net.last_linear, net.last_bn)
        net.last_bn = nn.Identity()
    return net


class FaceEmbedder(InferenceModel):
    """InceptionResnetV1 (facenet-vggface2, or untrained): 512-d unit vectors of 160x160 MTCNN crops."""

    dimension = 512

    def __init__(self, device: torch.device, weights: ResolvedWeights, *, precision: str = "auto",
                 channels_last: bool = True, fold_bn: bool = True) -> None:
        super().__init__(device)
        self.weights = weights
        self.dtype = resolve_precision(precision, device)
        self.channels_last = channels_last
        self.fold_bn = fold_bn
        self._net: InceptionResnetV1 | None = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def model_version(self) -> str:
        return self.weights.model_version

    @property
    def untrained(self) -> bool:
        return self.weights.untrained

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @staticmethod
    def crop(image: Image.Image, faces) -> torch.Tensor:
        """The network's input for these faces of an image: MTCNN's standardised 160x160 crops."""
        from workers.models.detector import FaceDetector

        return FaceDetector.crop(image, faces)

    @staticmethod
    def aligned_input(image: Image.Image) -> torch.Tensor:
        """The network's input for an image that is one aligned face crop: (1, 3, 160, 160)."""
        return aligned_crop_tensor(image).unsqueeze(0)

    def _load(self) -> None:
        if self.weights.untrained:
            net = build_untrained_network(self.weights.seed)
        else:
            net = InceptionResnetV1(pretrained=None, classify=False)
            net.load_state_dict(load_state_dict(self.weights))
        net = net.eval()
        if self.fold_bn:
            net = fold_batch_norms(net)
        net = net.to(self.device, dtype=self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        # A stream of its own on CUDA: embedding kernels overlap the detector's (pipeline's embed thread).
        # (cudnn.benchmark stays off: it is process-wide, and MTCNN's shapes change with every image.)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._net = net

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """One forward pass for the whole batch of crops; returns float32 unit vectors (n, 512)."""
        self.ensure_loaded()
        assert self._net is not None
        if len(crops) == 0:
            return np.empty((0, 512), dtype=np.float32)
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream:
            x = crops
            if self.device.type == "cuda" and not x.is_cuda:
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last if self.channels_last
                     else torch.contiguous_format)
            out = self._net(x)
            # Re-normalised in fp32: a half-precision norm is not exactly 1.
            out = F.normalize(out.float(), p=2, dim=1).cpu()
        return out.numpy()
