"""dlib's ResNet face descriptor in PyTorch: the parser of dlib's file, and the network against dlib's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MULTIFACE, PHOTOS, ROOT
from workers.dlib_format import RESNET_FILE, SHAPE_PREDICTOR_FILE, DlibFormatError, packaged_file, read_network
from workers.models.dlib_resnet import DlibDescriptorNet, build_network

dlib = pytest.importorskip("dlib", reason="dlib-bin (a dev dependency) is dlib's own reference")

IDENTITIES = sorted((ROOT.parent / "shared" / "fixtures" / "identities").glob("*/*.jpg"))


@pytest.fixture(scope="module")
def parsed():
    return read_network()


@pytest.fixture(scope="module")
def dlib_chips():
    """dlib's own chips: its frontal detector, 5-point predictor and get_face_chip, on every fixture photo."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(packaged_file(SHAPE_PREDICTOR_FILE)))
    chips = []
    for path in [*IDENTITIES, *PHOTOS, MULTIFACE]:
        image = np.asarray(Image.open(path).convert("RGB"))
        for rect in detector(image, 0):
            chips.append(dlib.get_face_chip(image, predictor(image, rect), size=150, padding=0.25))
    assert len(chips) >= 10
    return np.stack(chips)


@pytest.fixture(scope="module")
def dlib_descriptors(dlib_chips):
    model = dlib.face_recognition_model_v1(str(packaged_file(RESNET_FILE)))
    return np.array([np.asarray(model.compute_face_descriptor(chip)) for chip in dlib_chips])


def test_parser_reads_the_packaged_network(parsed):
    kinds = [layer.kind for layer in parsed.layers]
    assert parsed.loss == "loss_metric_2" and parsed.input_size == (150, 150)
    assert parsed.distance_threshold == pytest.approx(0.6) and parsed.margin == pytest.approx(0.04)
    assert parsed.input_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    assert kinds.count("avg_pool") == 5 and kinds.count("max_pool") == 1 and kinds[-1] == "fc"
    assert 5_500_000 < parsed.parameters < 5_700_000
    convs = [layer for layer in parsed.layers if layer.kind == "con"]
    assert convs[0].weight.shape == (32, 3, 7, 7) and convs[0].stride == (2, 2) and convs[0].padding == (0, 0)
    # The stride-2 3x3 convolutions of the down blocks have no padding; stride-1 ones pad by 1.
    assert [c.padding for c in convs if c.stride == (2, 2)][1:] == [(0, 0)] * 4
    assert all(c.padding == (1, 1) for c in convs if c.stride == (1, 1))
    assert parsed.layers[-1].weight.shape == (128, 256)


def test_parser_refuses_a_truncated_file(parsed, tmp_path):
    data = parsed.path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 40):
        path = tmp_path / f"cut{cut}.dat"
        path.write_bytes(data[:cut])
        with pytest.raises(DlibFormatError, match="truncated") as error:
            read_network(path)
        assert str(path) in str(error.value) and f"ends at byte {cut}" in str(error.value)


def test_parser_refuses_other_files(parsed, tmp_path):
    cases = {
        "predictor.dat": packaged_file(SHAPE_PREDICTOR_FILE).read_bytes(),  # another dlib file
        "photo.jpg": PHOTOS[0].read_bytes(),
        "empty.dat": b"",
        "zeros.dat": bytes(4096),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DlibFormatError) as error:
            read_network(path)
        assert str(path) in str(error.value), name
    trailing = tmp_path / "trailing.dat"
    trailing.write_bytes(parsed.path.read_bytes() + b"\x00" * 8)
    with pytest.raises(DlibFormatError, match="8 bytes after the last layer"):
        read_network(trailing)
    with pytest.raises(DlibFormatError, match="cannot read"):
        read_network(tmp_path / "missing.dat")


def test_network_check_refuses_other_topologies(parsed):
    # The same layers with another chain of tag/skip layers is another network: refused, not mis-run.
    wrappers = list(parsed.wrappers)
    first_tag = wrappers.index(1)
    wrappers[first_tag], wrappers[first_tag - 1] = wrappers[first_tag - 1], wrappers[first_tag]
    import dataclasses

    with pytest.raises(DlibFormatError, match="tag and skip"):
        build_network(dataclasses.replace(parsed, wrappers=tuple(wrappers)))
    with pytest.raises(DlibFormatError, match="layer"):
        build_network(dataclasses.replace(parsed, layers=parsed.layers[:-1]))


def test_torch_descriptors_equal_dlibs_on_the_same_chips(dlib_chips, dlib_descriptors):
    net = DlibDescriptorNet(torch.device("cpu"), precision="fp32")
    ours = net.descriptors(dlib_chips)
    assert ours.shape == dlib_descriptors.shape == (len(dlib_chips), 128)
    assert np.linalg.norm(ours - dlib_descriptors, axis=1).max() < 1e-4
    # One batch or one chip at a time: the same descriptors.
    single = np.concatenate([net.descriptors(dlib_chips[i : i + 1]) for i in range(3)])
    assert np.abs(single - ours[:3]).max() < 1e-5
    # Unit vectors for the store; cosine of the unit vectors is 1 - L2^2 / 2 between them.
    unit = net.embed(dlib_chips)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_half_precision_stays_close_to_fp32(dlib_chips):
    fp32 = DlibDescriptorNet(torch.device("cpu"), precision="fp32").embed(dlib_chips)
    bf16 = DlibDescriptorNet(torch.device("cpu"), precision="bf16").embed(dlib_chips)
    # Same-person cosines are 0.95-0.97 and different people's at most 0.92 with this model: the
    # half-precision error must be far below that gap.
    assert (1.0 - np.sum(fp32 * bf16, axis=1)).max() < 0.005
