"""evaluation.report: JSON and HTML evaluation reports, and the accountability report."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from facegate.calibration import Calibration, CalibrationStore
from evaluation.dataset import (
    gallery_probe_split,
    generate_pairs,
    pair_folds,
    pair_group_values,
    pair_labels,
    read_group_labels,
    scan_identity_folders,
)
from evaluation.report import (
    UNTRAINED_WARNING,
    DatasetSummary,
    EvaluationReport,
    GroupTable,
    IdentificationResults,
    NoFaceFound,
    NoFaceGroupRow,
    OperatingThreshold,
    VerificationResults,
    accountability_report,
)

SHA = "0123456789abcdef" * 4


def _pairs(seed: int = 0):
    rng = np.random.default_rng(seed)
    genuine = np.clip(rng.normal(0.7, 0.1, 600), -1, 1)
    impostor = np.clip(rng.normal(0.1, 0.1, 600), -1, 1)
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(600, int), np.zeros(600, int)]
    folds = np.r_[np.arange(600) % 10, np.arange(600) % 10]
    groups = [("A", "A") if i % 2 else ("B", "B") for i in range(600)]
    groups += [("A", "A"), ("B", "B"), ("A", "B")] * 200
    return scores, labels, folds, groups


def _report(untrained: bool) -> EvaluationReport:
    scores, labels, folds, groups = _pairs()
    gallery = np.eye(8)
    probes = np.eye(8)[:6] + 0.05
    return EvaluationReport(
        model_name="facenet-pytorch InceptionResnetV1",
        model_version="inception-resnet-v1:vggface2",
        weights_sha256=SHA,
        untrained=untrained,
        dataset=DatasetSummary(name="lfw-mini", root="/data/lfw-mini", identities=40, images=160, pairs=1200),
        verification=VerificationResults.from_scores(scores, labels, folds),
        identification=IdentificationResults.from_vectors(
            gallery, [f"g{i}" for i in range(8)], probes, [f"g{i}" for i in range(6)], np.eye(10)[:, :8][8:] + 0.3,
            thresholds=[0.5, 0.9],
        ),
        per_group=[GroupTable.from_scores("skin_tone", scores, labels, groups, threshold=0.4)],
        no_face_found=NoFaceFound(
            images=160,
            no_face=3,
            per_group=[NoFaceGroupRow(attribute="skin_tone", group="A", images=80, no_face=2)],
        ),
        operating_thresholds=[
            OperatingThreshold(name="missing-persons floor", threshold=0.4, fmr=0.001, source="policy")
        ],
        known_limitations=["Solid-colour test images; no real faces."],
    )


class _VisibleText(HTMLParser):
    """Text a browser would show in the page body, in order."""

    def __init__(self):
        super().__init__()
        self.in_body = False
        self.skipping = 0
        self.chunks: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.in_body = True
        if tag in ("style", "script"):
            self.skipping += 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self.skipping -= 1

    def handle_data(self, data):
        if self.in_body and not self.skipping and data.strip():
            self.chunks.append(data.strip())


def test_json_written_and_readable(tmp_path):
    report = _report(untrained=False)
    path = tmp_path / "out" / "report.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["model_version"] == "inception-resnet-v1:vggface2"
    assert data["weights_sha256"] == SHA
    assert not data["summary"].startswith("UNTRAINED")
    assert data["verification"]["accuracy_mean"] > 0.9
    assert {row["far"] for row in data["verification"]["tar_at_far"]} == {1e-2, 1e-3, 1e-4}
    # 600 impostor pairs cannot resolve 1e-3 or 1e-4.
    assert [row["tar"] is None for row in data["verification"]["tar_at_far"]] == [False, True, True]
    assert data["identification"]["rank1"] == 1.0
    assert EvaluationReport.model_validate_json(path.read_text()) == report


def test_untrained_flag_makes_the_first_line_say_so(tmp_path):
    report = _report(untrained=True)
    report.write_json(tmp_path / "report.json")
    report.write_html(tmp_path / "report.html")

    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary.splitlines()[0] == UNTRAINED_WARNING
    assert "untrained" in UNTRAINED_WARNING and "say nothing about the real model" in UNTRAINED_WARNING

    page = _VisibleText()
    page.feed((tmp_path / "report.html").read_text())
    assert page.chunks[0] == UNTRAINED_WARNING
    assert re.search(r"<title>UNTRAINED WEIGHTS", (tmp_path / "report.html").read_text())


def test_html_is_self_contained_with_two_plots(tmp_path):
    report = _report(untrained=False)
    path = tmp_path / "report.html"
    report.write_html(path)
    text = path.read_text()
    page = _VisibleText()
    page.feed(text)
    assert len(page.images) == 2
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not page.chunks[0].startswith("UNTRAINED")
    for expected in ("TAR at FAR", "Identification", "skin_tone", "cross-group", "not measurable"):
        assert expected in text
    assert "http://" not in text and "https://" not in text  # nothing fetched when opened


def test_group_ratio_inf_survives_json(tmp_path):
    scores = np.array([0.9, 0.8, 0.6, 0.1, 0.2, 0.3])
    labels = np.array([1, 1, 0, 0, 0, 0])
    groups = [("A", "A"), ("B", "B"), ("A", "A"), ("A", "A"), ("B", "B"), ("B", "B")]
    table = GroupTable.from_scores("gender", scores, labels, groups, threshold=0.5)
    assert table.worst_to_best_fmr_ratio == float("inf")
    assert GroupTable.model_validate_json(table.model_dump_json()) == table


def test_accountability_report(tmp_path):
    untrained = _report(untrained=True)
    _, labels, _, _ = _pairs()
    calibration = Calibration.from_impostor_scores(
        _pairs()[0][labels == 0], model_version=untrained.model_version, dataset="lfw-mini", n_genuine=600,
        weights_sha256=SHA,
    )
    markdown = accountability_report([untrained], [calibration])
    assert markdown.splitlines()[0].startswith("# UNTRAINED WEIGHTS")
    assert UNTRAINED_WARNING in markdown.splitlines()[2]
    for expected in (
        "facenet-pytorch InceptionResnetV1",
        "inception-resnet-v1:vggface2",
        SHA,
        "lfw-mini",
        "Error rates per group",
        "| A |",
        "cross-group",
        "missing-persons floor",
        "Operating thresholds",
        "Known limitations",
        "Solid-colour test images; no real faces.",
        "FMR 0.001 cannot be measured with 600 impostor pairs",
        "resolution limit",
        "To be completed by the operating agency",
    ):
        assert expected in markdown, expected


def test_accountability_report_without_calibration_says_so():
    markdown = accountability_report([_report(untrained=False)])
    assert "No calibration recorded" in markdown
    assert "UNTRAINED" not in markdown
    with pytest.raises(ValueError):
        accountability_report([])



def test_end_to_end_from_a_folder_without_the_pipeline(tmp_path):
    """The whole package on a tiny LFW-style folder, with made-up embeddings standing in for the model:
    how an integration is expected to chain the pieces."""
    root = tmp_path / "faces"
    for person in range(24):
        folder = root / f"P{person:02d}"
        folder.mkdir(parents=True)
        for number in range(1, 4):
            Image.new("RGB", (4, 4), (person * 10, number * 50, 0)).save(folder / f"{folder.name}_{number:04d}.png")
    labels_csv = tmp_path / "groups.csv"
    labels_csv.write_text("identity,gender\n" + "".join(f"P{p:02d},{'f' if p % 2 else 'm'}\n" for p in range(24)))

    dataset = scan_identity_folders(root)
    groups = read_group_labels(labels_csv, dataset)
    pairs = generate_pairs(dataset, n_folds=6, seed=0)

    # Stand-in for the model: one direction per person plus noise, as unit vectors.
    rng = np.random.default_rng(0)
    centre = {identity: rng.normal(size=512) for identity in dataset.identities}
    embedding = {}
    for identity, path in dataset.images:
        vector = centre[identity] + 0.8 * rng.normal(size=512)
        embedding[path] = vector / np.linalg.norm(vector)
    scores = np.array([embedding[p.first] @ embedding[p.second] for p in pairs])
    labels = pair_labels(pairs)

    store = CalibrationStore(tmp_path / "calibrations")
    store.put(
        Calibration.from_impostor_scores(
            scores[labels == 0], model_version="fake:1", dataset=dataset.name, n_genuine=int(labels.sum())
        )
    )
    calibration = store.get("fake:1")
    threshold = calibration.threshold_for_fmr(0.05)

    split = gallery_probe_split(dataset, seed=0)

    def vectors(images):
        return np.array([embedding[path] for _, path in images])

    report = EvaluationReport(
        model_name="fake",
        model_version="fake:1",
        untrained=True,
        dataset=DatasetSummary(
            name=dataset.name,
            root=str(dataset.root),
            identities=len(dataset.identities),
            images=len(dataset.images),
            pairs=len(pairs),
        ),
        verification=VerificationResults.from_scores(scores, labels, pair_folds(pairs), far_targets=(0.05, 1e-3)),
        identification=IdentificationResults.from_vectors(
            vectors(split.gallery),
            [identity for identity, _ in split.gallery],
            vectors(split.known_probes),
            [identity for identity, _ in split.known_probes],
            vectors(split.unknown_probes),
            thresholds=[threshold],
        ),
        per_group=[
            GroupTable.from_scores("gender", scores, labels, pair_group_values(pairs, groups, "gender"), threshold)
        ],
        operating_thresholds=[
            OperatingThreshold(name="FMR 5%", threshold=threshold, fmr=calibration.fmr_at(threshold).fmr)
        ],
    )
    assert report.verification.accuracy_mean > 0.9
    assert report.identification.rank1 > 0.9
    report.write_html(tmp_path / "report.html")
    markdown = accountability_report([report], [calibration])
    assert "fake:1" in markdown and "| gender |" in markdown
