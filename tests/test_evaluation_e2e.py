"""`facegate evaluate` end to end: a dataset built at test time from the face fixtures, the real pipeline in a
real worker process through a real Redis, the report, the calibration and the policy that reads it."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from facegate.calibration import Calibration, CalibrationStore
from evaluation.dataset import IdentificationSplit, scan_identity_folders
from evaluation.report import UNTRAINED_WARNING, IdentificationResults
from evaluation.runner import (
    EvaluationRefused,
    _identification,
    _key,
    calibrated_threshold_lookup,
    calibration_dir,
    plan_evaluation,
    run_evaluation,
)
from facegate.messages import COMPARE_PAIRS_TASK, CompareChunk
from facegate.queue import make_celery
from policy import check_threshold, effective_floor, registry_from_dict
from scheduler.audit import AuditLog
from tests.conftest import ALIGNED, NOISE, PHOTOS, make_settings, redis_client, register
from tests.e2e import ROOT, WorkerProcess, env_for

DEFAULT_REGISTRY = yaml.safe_load(open(__import__("policy").__path__[0] + "/default_registry.yaml"))
UNTRAINED_VERSION = "untrained-seed0"


def _require_cli() -> None:
    from cli.app import app

    commands = {c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")
                for c in app.registered_commands}
    commands |= {name.removesuffix("-command") for name in commands}
    groups = {group.name for group in app.registered_groups}
    if "evaluate" not in commands or "report" not in groups:
        pytest.fail("`facegate evaluate` / `facegate report` are not registered in cli/app.py: add\n"
                    "    from cli.evaluate import evaluate_command, report_app\n"
                    "    app.command(\"evaluate\")(evaluate_command)\n"
                    "    app.add_typer(report_app, name=\"report\")")


def _cli(args: list[str], env: dict[str, str], timeout: int = 280) -> subprocess.CompletedProcess:
    _require_cli()
    return subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A dataset built from the fixtures -----------------------------------------------------------------


def _augmentations(path: Path) -> dict[str, Image.Image]:
    """Four images of one person: the photo (or the aligned crop on a plain background, so MTCNN sees a
    face with some context), its mirror, a small crop, a smaller copy re-encoded as a poor JPEG."""
    image = Image.open(path).convert("RGB")
    if image.size == (160, 160):
        base = Image.new("RGB", (240, 240), (120, 120, 120))
        base.paste(image, (40, 40))
    else:
        scale = 360 / max(image.size)
        base = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    w, h = base.size
    buffer = io.BytesIO()
    base.resize((round(w * 0.85), round(h * 0.85)), Image.BILINEAR).save(buffer, "JPEG", quality=35)
    return {
        "a": base,
        "b": ImageOps.mirror(base),
        "c": base.crop((round(w * 0.04), round(h * 0.04), round(w * 0.97), round(h * 0.96))),
        "d": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
    }


def build_dataset(root: Path, *, with_noise: bool = True) -> Path:
    """Nine identities (the four photos and the five aligned crops), four images each; the first identity
    also holds a noise image, in which no face is found."""
    for source in [*PHOTOS, *ALIGNED]:
        identity = f"{'photo' if source.suffix == '.jpg' else 'aligned'}_{source.stem}"
        folder = root / identity
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in _augmentations(source).items():
            image.save(folder / f"{identity}_{name}.jpg", quality=92)
    if with_noise:
        first = sorted(p for p in root.iterdir() if p.is_dir())[0]
        Image.open(NOISE).convert("RGB").resize((360, 222)).save(first / f"{first.name}_z_noise.jpg")
    return root


def write_groups(path: Path, identities: list[str], extra: list[str] = ()) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identity", "source", "batch"])
        for n, identity in enumerate([*identities, *extra]):
            writer.writerow([identity, identity.split("_", 1)[0], "odd" if n % 2 else "even"])
    return path


# Unit-level: the plan and identification from scores -----------------------------------------------


def test_plan_compares_every_pair_once(tmp_path):
    root = tmp_path / "ds"
    for identity in ("ann", "bob", "cat", "dan", "eve"):
        (root / identity).mkdir(parents=True)
        for n in range(3):
            (root / identity / f"{identity}_{n + 1:04d}.jpg").write_bytes(b"not read by the planner")
    plan = plan_evaluation(root, chunk_pairs=4)
    sent = [c for chunk in plan.chunks for c in chunk]
    assert len(sent) == len(set(sent)) == plan.comparisons
    assert all(len(chunk) <= 64 for chunk in plan.chunks)
    wanted = {_key(p.first, p.second) for p in plan.pairs}
    probes = plan.split.known_probes + plan.split.unknown_probes
    wanted |= {_key(g, p) for _, g in plan.split.gallery for _, p in probes}
    assert set(sent) == wanted
    assert all(a <= b for a, b in sent)
    assert any("folds" in note for note in plan.notes)  # 5 identities cannot make 10 identity-disjoint folds


def test_plan_reads_an_lfw_pairs_file_with_its_folds(tmp_path):
    root = tmp_path / "lfw"
    for identity, count in (("Ann_Lee", 3), ("Bob_Roe", 2), ("Cat_Poe", 1)):
        (root / identity).mkdir(parents=True)
        for n in range(count):
            (root / identity / f"{identity}_{n + 1:04d}.jpg").write_bytes(b"x")
    pairs = root.parent / "pairs.txt"
    pairs.write_text("1\nAnn_Lee\t1\t1000\nAnn_Lee\t1\tCat_Poe\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"image 1000 of 'Ann_Lee'"):
        plan_evaluation(root, pairs_file=pairs)
    pairs.write_text("2\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tCat_Poe\t1\nBob_Roe\t1\t2\nBob_Roe\t2\tAnn_Lee\t3\n",
                     encoding="utf-8")
    plan = plan_evaluation(root, pairs_file=pairs)
    assert [p.fold for p in plan.pairs] == [0, 0, 1, 1]
    assert "pairs file" in plan.pairs_source and "2 folds" in plan.pairs_source
    sent = {c for chunk in plan.chunks for c in chunk}
    assert {_key(p.first, p.second) for p in plan.pairs} <= sent


def test_identification_from_scores_agrees_with_the_vector_metrics():
    rng = np.random.default_rng(3)
    identities = [f"id{n}" for n in range(12)]
    centres = {i: rng.normal(size=16) for i in identities}
    vectors: dict[str, np.ndarray] = {}

    def image(identity: str, n: int) -> tuple[str, Path]:
        path = Path(f"/d/{identity}/{n}.jpg")
        v = centres[identity] + rng.normal(scale=1.2, size=16)
        vectors[str(path)] = v / np.linalg.norm(v)
        return identity, path

    gallery = [image(i, 0) for i in identities[:9]]
    known = [image(i, n) for i in identities[:9] for n in (1, 2)]
    unknown = [image(i, n) for i in identities[9:] for n in (0, 1)]
    split = IdentificationSplit(gallery=gallery, known_probes=known, unknown_probes=unknown)
    thresholds = [0.1, 0.3, 0.5]

    def score(a: str, b: str) -> float:
        return float(vectors[a] @ vectors[b])

    ours = _identification(split, score, lambda _: True, thresholds, [])
    reference = IdentificationResults.from_vectors(
        np.stack([vectors[str(p)] for _, p in gallery]), [i for i, _ in gallery],
        np.stack([vectors[str(p)] for _, p in known]), [i for i, _ in known],
        np.stack([vectors[str(p)] for _, p in unknown]), thresholds,
    )
    assert ours.rank1 == pytest.approx(reference.rank1) and ours.rank5 == pytest.approx(reference.rank5)
    assert 0 < ours.rank1 < 1
    for mine, theirs in zip(ours.open_set, reference.open_set):
        assert mine.threshold == pytest.approx(theirs.threshold)
        assert mine.fpir == pytest.approx(theirs.fpir) and mine.fnir == pytest.approx(theirs.fnir)


def test_compare_chunk_scores_pairs_and_says_why_one_has_none(tmp_path, pipeline):
    from workers.compare import run_compare_chunk

    folder = tmp_path / "galleries"
    folder.mkdir()
    views = _augmentations(PHOTOS[0])
    views["a"].save(folder / "a.jpg")
    views["b"].save(folder / "b.jpg")
    Image.open(NOISE).convert("RGB").resize((360, 222)).save(folder / "noise.jpg")
    outside = tmp_path / "elsewhere.jpg"
    views["c"].save(outside)
    a, b, noise = (str(folder / n) for n in ("a.jpg", "b.jpg", "noise.jpg"))
    message = CompareChunk(job_id="j", chunk_no=3, pairs=[(a, b), (a, noise), (b, str(outside)), (b, a)])
    result = run_compare_chunk(message, pipeline, [folder])
    assert result.kind == "compare" and result.chunk_no == 3
    assert result.model_version == UNTRAINED_VERSION and result.untrained
    first, no_face, refused, swapped = result.scores
    assert 0.9 < first.similarity <= 1.0 and first.reason is None
    assert swapped.similarity == pytest.approx(first.similarity)
    assert no_face.similarity is None and f"no face found in {noise}" in no_face.reason
    assert refused.similarity is None and "outside the gallery roots" in refused.reason
    # One outcome per distinct image, each embedded once.
    assert [item.path for item in result.items] == [a, b, noise, str(outside)]
    assert [item.faces for item in result.items[:3]] == [1, 1, 0]


# The calibration round trip through the policy ------------------------------------------------------


def _registry_with_fmr_floor(max_fmr: float, similarity_floor: float | None = None):
    data = yaml.safe_load(yaml.safe_dump(DEFAULT_REGISTRY))
    purpose = {"id": "calibrated-search", "description": "A floor stated as a false-match rate.",
               "human_review_required": True, "max_false_match_rate": max_fmr}
    if similarity_floor is not None:
        purpose["default_min_similarity"] = similarity_floor
    data["purposes"].append(purpose)
    return registry_from_dict(data)


def test_calibration_round_trip_a_floor_stated_as_fmr_becomes_the_calibrated_threshold(tmp_path):
    store = CalibrationStore(tmp_path / "calibration")
    impostors = np.arange(1000) / 1000  # 0.000 .. 0.999: ten of them >= 0.99
    store.put(Calibration.from_impostor_scores(impostors, model_version=UNTRAINED_VERSION, dataset="fixture"))
    lookup = calibrated_threshold_lookup(store.directory)
    registry = _registry_with_fmr_floor(1e-2)

    assert effective_floor("calibrated-search", UNTRAINED_VERSION, registry, lookup) == 0.99
    allowed = check_threshold("calibrated-search", 0.99, UNTRAINED_VERSION, registry, lookup)
    assert allowed.allowed, allowed.reason
    assert "0.99" in allowed.reason and "0.01" in allowed.reason
    below = check_threshold("calibrated-search", 0.985, UNTRAINED_VERSION, registry, lookup)
    assert not below.allowed and below.rule_ids == ["deny.threshold-below-floor"]
    assert "0.985" in below.reason and "0.99" in below.reason and "false-match rate of at most 0.01" in below.reason

    # A stricter similarity floor stays in force: the higher of the two is the floor.
    strict = _registry_with_fmr_floor(1e-2, similarity_floor=0.995)
    assert effective_floor("calibrated-search", UNTRAINED_VERSION, strict, lookup) == 0.995
    assert not check_threshold("calibrated-search", 0.99, UNTRAINED_VERSION, strict, lookup).allowed

    # A rate the calibration cannot resolve (1000 impostor pairs, 1e-5 asked) is refused, saying why.
    unresolvable = check_threshold("calibrated-search", 0.999, UNTRAINED_VERSION, _registry_with_fmr_floor(1e-5),
                                   lookup)
    assert not unresolvable.allowed and unresolvable.rule_ids == ["deny.no-calibration"]
    assert "resolution limit" in unresolvable.reason and "100000 impostor pairs" in unresolvable.reason


def test_a_model_version_without_calibration_refuses_a_purpose_stated_as_fmr(tmp_path):
    lookup = calibrated_threshold_lookup(tmp_path / "calibration")  # empty: nothing calibrated
    registry = _registry_with_fmr_floor(1e-5, similarity_floor=0.5)
    decision = check_threshold("calibrated-search", 0.99, "inception-resnet-v1:0123456789abcdef", registry, lookup)
    assert not decision.allowed
    assert decision.rule_ids == ["deny.no-calibration"]
    assert "inception-resnet-v1:0123456789abcdef" in decision.reason and "1e-05" in decision.reason
    assert "no calibration" in decision.reason and "facegate evaluate" in decision.reason
    # Without a lookup at all (a caller that reads no calibrations) the answer is the same.
    assert check_threshold("calibrated-search", 0.99, UNTRAINED_VERSION, registry).rule_ids == ["deny.no-calibration"]


# Clear errors through the CLI, before anything starts ------------------------------------------------


def test_group_labels_naming_unknown_identities_are_a_clear_error(tmp_path):
    settings = make_settings(tmp_path)
    dataset = build_dataset(tmp_path / "galleries" / "faces", with_noise=False)
    identities = scan_identity_folders(dataset).identities
    groups = write_groups(tmp_path / "groups.csv", identities, extra=["nobody_known", "also_unknown"])
    _, token = register(settings)
    result = _cli(["evaluate", str(dataset), "--groups", str(groups)], env_for(settings, FACEGATE_API_KEY=token))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "2 identities are not in the dataset" in message
    assert "nobody_known" in message and "also_unknown" in message and "groups.csv" in message
    assert not (settings.data_dir / "run").exists()  # no embedded broker or worker was started


def test_a_dataset_with_one_identity_is_a_clear_error(tmp_path):
    settings = make_settings(tmp_path)
    dataset = tmp_path / "galleries" / "single"
    (dataset / "only_person").mkdir(parents=True)
    for name, image in _augmentations(PHOTOS[0]).items():
        image.save(dataset / "only_person" / f"only_person_{name}.jpg")
    _, token = register(settings)
    result = _cli(["evaluate", str(dataset)], env_for(settings, FACEGATE_API_KEY=token))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "1 identity folder(s)" in message and "at least 2 are needed" in message
    assert "cannot measure false matches" in message


def test_a_denied_evaluation_queues_nothing_and_says_why(tmp_path, redis_url):
    settings = make_settings(tmp_path, broker_url=redis_url)
    dataset = tmp_path / "galleries" / "tiny"
    for identity in ("ann", "bob"):
        (dataset / identity).mkdir(parents=True)
        for n in range(2):
            (dataset / identity / f"{identity}_{n + 1:04d}.jpg").write_bytes(b"never read")
    police, _ = register(settings, "city-police-example")
    with pytest.raises(EvaluationRefused) as refused:
        run_evaluation(settings, dataset, police, purpose="criminal-investigation", out_dir=tmp_path / "out")
    assert "rekognition-police-moratorium" in str(refused.value)
    assert redis_client(redis_url).llen("facegate") == 0
    assert not (tmp_path / "out").exists()
    decisions = AuditLog(settings.resolved_database_url).rows(event="policy.decision")
    assert decisions and decisions[-1].capability == "compare" and decisions[-1].allowed is False


# End to end through a real worker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, redis_server_url):
    """One `facegate evaluate` run, through a real Redis (database 10) and a real worker process."""
    _require_cli()
    tmp = tmp_path_factory.mktemp("evaluate")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/10")
    redis_client(settings.broker_url).flushdb()
    dataset = build_dataset(tmp / "galleries" / "fixture_faces")
    groups = write_groups(tmp / "groups.csv", scan_identity_folders(dataset).identities)
    _, token = register(settings)
    env = env_for(settings, FACEGATE_API_KEY=token)
    worker = WorkerProcess(settings, tmp / "worker.log")
    try:
        out = tmp / "report"
        result = _cli(["evaluate", str(dataset), "--groups", str(groups), "--out", str(out), "--timeout", "250"], env)
        in_force = CalibrationStore(calibration_dir(settings)).get(UNTRAINED_VERSION)
        # Then a small run (three identities, no identification): less evidence must not replace more.
        small = tmp / "galleries" / "small"
        for folder in sorted(p for p in dataset.iterdir() if p.is_dir())[1:4]:
            shutil.copytree(folder, small / folder.name)
        smaller = _cli(["evaluate", str(small), "--no-identification", "--out", str(tmp / "small-report"),
                        "--timeout", "250"], env)
        # A compare task pushed straight into the broker, with no ticket from the scheduler.
        image = str(sorted(dataset.glob("*/*.jpg"))[0])
        pushed = CompareChunk(job_id="pushed", chunk_no=0, pairs=[(image, image)])
        app = make_celery(settings)
        rejected = app.send_task(COMPARE_PAIRS_TASK, args=[pushed.model_dump(mode="json")]).get(timeout=60)
        app.close()
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr + (tmp / "worker.log").read_text()[-3000:]
    return dict(settings=settings, env=env, dataset=dataset, out=out, result=result, rejected=rejected,
                in_force=in_force, smaller=smaller)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.body, self.skip, self.chunks, self.images = False, 0, [], []

    def handle_starttag(self, tag, attrs):
        self.body |= tag == "body"
        self.skip += tag in ("style", "script")
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self.skip -= tag in ("style", "script")

    def handle_data(self, data):
        if self.body and not self.skip and data.strip():
            self.chunks.append(data.strip())


@pytest.mark.slow
def test_evaluate_runs_the_pipeline_end_to_end_and_the_report_is_complete(evaluated):
    out, dataset = evaluated["out"], evaluated["dataset"]
    report = json.loads((out / "report.json").read_text())
    # Untrained weights: the very first line says so, in the JSON, the HTML and the command's output.
    assert report["summary"].splitlines()[0] == UNTRAINED_WARNING
    assert evaluated["result"].stdout.splitlines()[0] == UNTRAINED_WARNING
    assert report["untrained"] is True and report["model_version"] == UNTRAINED_VERSION

    assert report["dataset"]["identities"] == 9 and report["dataset"]["images"] == 37
    assert report["dataset"]["root"] == str(dataset.resolve())
    v = report["verification"]
    assert v["n_genuine"] > 0 and v["n_impostor"] > 0 and 0.0 <= v["auc"] <= 1.0
    assert v["accuracy_mean"] is not None and len(v["fold_thresholds"]) >= 2
    assert [row["far"] for row in v["tar_at_far"]] == [1e-2, 1e-3, 1e-4]
    assert len(v["roc"]["fpr"]) == len(v["roc"]["tpr"]) > 2

    i = report["identification"]
    assert i["n_gallery"] >= 2 and i["n_known_probes"] > 0 and i["n_unknown_probes"] > 0
    assert 0.0 <= i["rank1"] <= i["rank5"] <= 1.0
    assert i["open_set"] and all(row["fpir"] is not None for row in i["open_set"])

    # The noise image: no face found, counted overall and in its groups.
    assert report["no_face_found"]["images"] == 37 and report["no_face_found"]["no_face"] == 1
    per_group_no_face = {(r["attribute"], r["group"]): r for r in report["no_face_found"]["per_group"]}
    assert sum(r["no_face"] for (attribute, _), r in per_group_no_face.items() if attribute == "source") == 1
    assert {g for a, g in per_group_no_face if a == "source"} == {"aligned", "photo"}

    # FMR/FNMR per group at the operating thresholds, and the worst/best FMR ratio.
    names = [t["name"] for t in report["operating_thresholds"]]
    assert "FMR 0.01" in names  # enough impostor comparisons to state 1e-2
    assert any(name.startswith("purpose 'missing-children'") for name in names)
    fmr_1e2 = next(t for t in report["operating_thresholds"] if t["name"] == "FMR 0.01")
    assert fmr_1e2["fmr"] <= 0.01 and fmr_1e2["fnmr"] is not None
    tables = {(t["attribute"], t["threshold"]) for t in report["per_group"]}
    assert ("source", fmr_1e2["threshold"]) in tables and ("batch", fmr_1e2["threshold"]) in tables
    for table in report["per_group"]:
        groups = {row["group"] for row in table["rows"]}
        assert groups >= ({"aligned", "photo"} if table["attribute"] == "source" else {"odd", "even"})
        assert table["ratio_explanation"]
    assert report["known_limitations"]

    page = _Text()
    page.feed((out / "report.html").read_text())
    assert page.chunks[0] == UNTRAINED_WARNING
    assert len(page.images) == 2  # ROC and DET
    text = " ".join(page.chunks)
    for heading in ("Verification", "Identification", "Error rates per group", "Images with no face found",
                    "Operating thresholds", "Known limitations"):
        assert heading in text


@pytest.mark.slow
def test_evaluate_writes_the_calibration_and_audits_the_run(evaluated):
    settings = evaluated["settings"]
    calibration = CalibrationStore(calibration_dir(settings)).get(UNTRAINED_VERSION)
    assert calibration is not None and calibration.model_version == UNTRAINED_VERSION
    report = json.loads((evaluated["out"] / "report.json").read_text())
    assert calibration.n_impostor >= report["verification"]["n_impostor"]
    assert calibration.n_impostor >= 100  # identification pairs add impostor comparisons
    fmr_1e2 = next(t for t in report["operating_thresholds"] if t["name"] == "FMR 0.01")
    assert calibration.threshold_for_fmr(1e-2) == pytest.approx(fmr_1e2["threshold"])

    # Who ran it, when, and on what data.
    assert calibration.run_by.startswith("university-lab-example (key ")
    assert len(calibration.dataset_fingerprint) == 64 and calibration.created_at

    audit = AuditLog(settings.resolved_database_url)
    finished = audit.rows(event="evaluation.finished")
    assert len(finished) == 2  # the large run, then the small one (see below)
    detail = finished[0].detail
    assert detail["model_version"] == UNTRAINED_VERSION and detail["untrained"] is True
    assert detail["no_face"] == 1 and detail["images"] == 37 and detail["calibration"]
    assert finished[0].capability == "compare" and finished[0].gallery == "evaluation:fixture_faces"
    assert [r.event for r in audit.rows(job_id=finished[0].job_id)] == [
        "policy.decision", "evaluation.started", "evaluation.finished"]


@pytest.mark.slow
def test_a_smaller_evaluation_does_not_replace_the_calibration_and_says_why(evaluated):
    settings, smaller, in_force = evaluated["settings"], evaluated["smaller"], evaluated["in_force"]
    assert smaller.returncode == 0, smaller.stdout + smaller.stderr
    said = " ".join(smaller.stdout.split())
    assert f"the calibration in force for {UNTRAINED_VERSION} was kept: it rests on {in_force.n_impostor} " \
           f"impostor pairs" in said and "pass --replace-calibration" in said
    assert CalibrationStore(calibration_dir(settings)).get(UNTRAINED_VERSION) == in_force
    kept = AuditLog(settings.resolved_database_url).rows(event="evaluation.finished")[-1].detail
    assert kept["calibration"] is None and "was kept" in kept["calibration_kept"]
    assert kept["dataset_fingerprint"] != in_force.dataset_fingerprint


@pytest.mark.slow
def test_a_compare_task_without_a_ticket_is_refused_by_the_worker(evaluated):
    rejected = evaluated["rejected"]
    assert rejected["refused"] and "no ticket" in rejected["refused"]
    assert rejected["scores"] == [] and rejected["items"] == []


@pytest.mark.slow
def test_report_accountability_assembles_the_evaluations(evaluated):
    out_file = evaluated["out"].parent / "accountability.md"
    # The default location (DATA_DIR/evaluations) holds no report, since this run wrote to --out.
    result = _cli(["report", "accountability", "--out", str(out_file)], evaluated["env"], timeout=120)
    assert result.returncode == 2 and "no evaluation reports found" in " ".join(result.stderr.split())
    result = _cli(["report", "accountability", str(evaluated["out"]), "--out", str(out_file)], evaluated["env"],
                  timeout=120)
    assert result.returncode == 0, result.stderr
    markdown = out_file.read_text()
    assert markdown.splitlines()[0].startswith("# UNTRAINED WEIGHTS")
    for expected in (UNTRAINED_VERSION, "fixture_faces", "Error rates per group", "source", "Calibration",
                     "Operating thresholds", "Known limitations", "FMR 0.01"):
        assert expected in markdown, expected
