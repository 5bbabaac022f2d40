"""A reader of dlib's serialisation of a DNN, enough for `dlib_face_recognition_resnet_model_v1.dat`.

dlib writes a network (`serialize(file) << net`) from the loss layer inwards: each layer wrapper writes
its version, then the network below it, then its own details, so the file holds a chain of versions
(2 for a layer, 1 for a tag or skip layer, 3 for the layer on the input) followed by the layers'
details from the input up. The formats (dlib/serialize.h, dlib/dnn/{core,layers,input,loss}.h):

- an integer: one control byte (low nibble: how many bytes follow; bit 7: negative), then that many
  little-endian bytes of the magnitude;
- a string: its length as an integer, then the bytes; a bool: the character '1' or '0';
- a float or double: mantissa and exponent as two integers (value = mantissa * 2**exponent);
- a tensor (version 2): num_samples, k, nr, nc as integers, then the values as raw little-endian float32;
  an alias tensor (a view into a layer's parameter tensor): version 1 and its four dimensions.

Tag and skip layers hold no data: which output an `add_prev` adds, or where a `skip` goes back to, is the
network definition's (dlib's dnn_face_recognition_ex.cpp), not the file's. `workers.models.dlib_resnet`
holds that definition and checks it against the chain of versions read here.

No dlib code runs here: this is FaceGate's own reader, so the network runs in PyTorch (batched, on a GPU)
from the file that the `face-recognition-models` package installs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegate.embedding_models import DLIB_RESNET_FILE, DLIB_SHAPE_PREDICTOR_FILE, ModelError, dlib_file

RESNET_FILE = DLIB_RESNET_FILE
SHAPE_PREDICTOR_FILE = DLIB_SHAPE_PREDICTOR_FILE

# Versions in the chain of layer wrappers.
LAYER_VERSION = 2  # add_layer over another layer
INPUT_LAYER_VERSION = 3  # add_layer directly over the input layer
TAG_OR_SKIP_VERSION = 1  # add_tag_layer, add_skip_layer


class DlibFormatError(ValueError):
    """The file is not a dlib network of the kind expected; the message names the file and the byte."""


def packaged_file(name: str) -> Path:
    """A file of the installed face-recognition-models package (facegate.embedding_models finds it)."""
    try:
        return dlib_file(name)
    except ModelError as exc:
        raise DlibFormatError(str(exc)) from None


@dataclass(frozen=True)
class Layer:
    """One layer's details as dlib stored them."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    name: str  # dlib's serialised name, e.g. con_4, affine_, avg_pool_2
    offset: int  # byte where its details start, for messages
    # con: kernel (kh, kw), stride (sy, sx), padding (py, px); pools too (kernel 0 = whole image).
    kernel: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    # con: weight (O, I, kh, kw) and bias (O); affine: weight = gamma (C), bias = beta (C);
    # fc: weight (outputs, inputs) as torch's Linear has it, bias None (dlib's fc_no_bias).
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DlibNetwork:
    """A parsed network: its loss, its input and its layers from the input to the output."""

    path: Path
    loss: str
    margin: float
    distance_threshold: float  # dlib's own "same person" rule: L2 distance below this
    input_size: tuple[int, int]  # (rows, columns) of the chip
    input_mean: tuple[float, float, float]  # subtracted from R, G, B before dividing by 256
    wrappers: tuple[int, ...]  # the chain of versions, from the output inwards
    layers: tuple[Layer, ...]

    @property
    def parameters(self) -> int:
        return sum(int(a.size) for layer in self.layers for a in (layer.weight, layer.bias) if a is not None)


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data = memoryview(data)
        self.path = path
        self.pos = 0

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.path}: not a valid dlib {RESNET_FILE} network: {what} (at byte {self.pos})")

    def _take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(
                f"{self.path}: truncated: the file ends at byte {len(self.data)} while reading {what} "
                f"({n} bytes needed at byte {self.pos}); re-install face-recognition-models"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, what: str) -> int:
        control = self._take(1, what)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            self.pos -= 1
            raise self.fail(f"{what}: byte 0x{control:02x} is no integer's control byte")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def string(self, what: str, limit: int = 256) -> str:
        n = self.integer(what)
        if not 0 <= n <= limit:
            raise self.fail(f"{what}: a string of {n} bytes")
        raw = bytes(self._take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: {raw[:40]!r} is no layer name") from None

    def float(self, what: str) -> float:
        mantissa, exponent = self.integer(what), self.integer(what)
        if abs(exponent) > 2000:
            raise self.fail(f"{what}: exponent {exponent}")
        return float(mantissa) * 2.0**exponent

    def bool(self, what: str) -> bool:
        raw = bytes(self._take(1, what))
        if raw not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"{what}: {raw!r} is no bool")
        return raw == b"1"

    def expect(self, expected: int, what: str) -> None:
        start = self.pos
        got = self.integer(what)
        if got != expected:
            self.pos = start
            raise self.fail(f"{what}: version {got}, expected {expected}")

    def tensor(self, what: str) -> np.ndarray:
        self.expect(2, f"{what} version")
        dims = [self.integer(f"{what} dimensions") for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.fail(f"{what}: dimensions {dims}")
        count = int(np.prod(dims, dtype=np.int64))
        if count > 64 * 1024 * 1024:
            raise self.fail(f"{what}: {count} values")
        raw = self._take(4 * count, f"{what} ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        self.expect(1, f"{what} version")
        rows, columns, channels, samples = (self.integer(f"{what} dimensions") for _ in range(4))
        return rows, columns, channels, samples


def _split(params: np.ndarray, shapes: list[tuple[int, ...]], reader: _Reader, name: str) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into its alias tensors, in order."""
    flat = params.reshape(-1)
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if sum(sizes) != flat.size:
        raise reader.fail(f"{name}: parameters hold {flat.size} values, its parts {shapes} need {sum(sizes)}")
    parts, start = [], 0
    for shape, size in zip(shapes, sizes):
        parts.append(flat[start : start + size].reshape(shape))
        start += size
    return parts


def _layer(reader: _Reader) -> Layer:
    offset = reader.pos
    name = reader.string("layer name")
    if name == "con_4":
        params = reader.tensor("con_4 parameters")
        filters = reader.integer("con_4 filters")
        kernel = (reader.integer("con_4 rows"), reader.integer("con_4 columns"))
        stride = (reader.integer("con_4 stride"), reader.integer("con_4 stride"))
        padding = (reader.integer("con_4 padding"), reader.integer("con_4 padding"))
        w_shape, b_shape = reader.alias("con_4 filters"), reader.alias("con_4 biases")
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.float("con_4 multipliers")
        weight, bias = _split(params, [w_shape, (int(np.prod(b_shape)),)], reader, name)
        if w_shape[0] != filters or w_shape[2:] != kernel:
            raise reader.fail(f"con_4: filters {w_shape} disagree with {filters} filters of {kernel}")
        return Layer("con", name, offset, kernel, stride, padding, weight, bias)
    if name == "affine_":
        params = reader.tensor("affine_ parameters")
        g_shape, b_shape = reader.alias("affine_ gamma"), reader.alias("affine_ beta")
        mode = reader.integer("affine_ mode")
        if mode != 0:
            raise reader.fail(f"affine_: mode {mode}; only the per-channel (convolutional) mode is known")
        gamma, beta = _split(params, [(int(np.prod(g_shape)),), (int(np.prod(b_shape)),)], reader, name)
        return Layer("affine", name, offset, weight=gamma, bias=beta)
    if name == "relu_":
        return Layer("relu", name, offset)
    if name in ("max_pool_2", "avg_pool_2"):
        kernel = (reader.integer(f"{name} rows"), reader.integer(f"{name} columns"))
        stride = (reader.integer(f"{name} stride"), reader.integer(f"{name} stride"))
        padding = (reader.integer(f"{name} padding"), reader.integer(f"{name} padding"))
        return Layer(name[:8], name, offset, kernel, stride, padding)
    if name == "add_prev_":
        return Layer("add_prev", name, offset)
    if name == "fc_2":
        outputs, inputs = reader.integer("fc_2 outputs"), reader.integer("fc_2 inputs")
        params = reader.tensor("fc_2 parameters")
        w_shape, b_shape = reader.alias("fc_2 weights"), reader.alias("fc_2 biases")
        bias_mode = reader.integer("fc_2 bias mode")
        for _ in range(4):
            reader.float("fc_2 multipliers")
        if bias_mode != 1 or any(b_shape):
            raise reader.fail("fc_2 with a bias; dlib's face descriptor has none (fc_no_bias)")
        if w_shape[:2] != (inputs, outputs):
            raise reader.fail(f"fc_2: weights {w_shape} disagree with {inputs} inputs and {outputs} outputs")
        (weight,) = _split(params, [(inputs, outputs)], reader, name)
        return Layer("fc", name, offset, weight=np.ascontiguousarray(weight.T))
    raise reader.fail(f"unknown layer {name!r}")


def _layer_state(reader: _Reader, on_input: bool) -> None:
    """What each layer wrapper writes after its layer: three flags, three (empty) tensors, and, for the
    layer on the input, the sample expansion factor."""
    for _ in range(3):
        reader.bool("layer flags")
    for _ in range(3):
        reader.tensor("layer state tensor")
    if on_input:
        reader.integer("sample expansion factor")


def read_network(path: str | Path | None = None) -> DlibNetwork:
    """Parse a dlib metric-loss network file (default: the installed package's ResNet face descriptor).

    Raises DlibFormatError naming the file for anything else: another kind of file, a truncated one,
    unknown layers, trailing bytes.
    """
    path = Path(path) if path is not None else packaged_file(RESNET_FILE)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DlibFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    reader = _Reader(data, path)
    try:
        reader.expect(1, "loss layer version")
        loss = reader.string("loss name")
    except DlibFormatError as exc:
        raise DlibFormatError(f"{path}: not a dlib network file (it does not start with a loss layer: {exc})") from None
    if loss != "loss_metric_2":
        raise reader.fail(f"loss {loss!r}; the face descriptor's is loss_metric_2")
    margin = reader.float("loss margin")
    threshold = reader.float("loss distance threshold")

    wrappers: list[int] = []
    while True:
        version = reader.integer("layer wrapper version")
        wrappers.append(version)
        if version == INPUT_LAYER_VERSION:
            break
        if version not in (LAYER_VERSION, TAG_OR_SKIP_VERSION) or len(wrappers) > 10_000:
            raise reader.fail(f"layer wrapper version {version}")
    name = reader.string("input layer name")
    if name != "input_rgb_image_sized":
        raise reader.fail(f"input layer {name!r}; expected input_rgb_image_sized")
    mean = (reader.float("mean red"), reader.float("mean green"), reader.float("mean blue"))
    size = (reader.integer("input rows"), reader.integer("input columns"))

    layers: list[Layer] = []
    for index, version in enumerate(reversed(wrappers)):
        if version == TAG_OR_SKIP_VERSION:
            continue
        layers.append(_layer(reader))
        _layer_state(reader, on_input=index == 0)
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} bytes after the last layer")
    return DlibNetwork(path=path, loss=loss, margin=margin, distance_threshold=threshold, input_size=size,
                       input_mean=mean, wrappers=tuple(wrappers), layers=tuple(layers))
