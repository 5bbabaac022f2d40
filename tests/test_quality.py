"""Probe quality floors and enrolment filters: measured on the real fixture photos, and on the same photos
shrunk, blurred and darkened here with Pillow (into tmp_path, never into the repository)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageFilter

from facegate.messages import SEARCH_CHUNK_TASK, IndexChunk, SearchChunk, work_binding
from index import GalleryStore
from policy import load_registry, registry_from_dict, sign_ticket, TicketClaims, RegistryError, verify_ticket
from policy.quality import FaceQuality, QualityFloor, check_quality, floor_from_claim, floor_to_claim, stricter
from tests.conftest import ALIGNED, FIXTURES, PHOTOS, make_settings, register

KATE = next(p for p in PHOTOS if p.stem == "kate_siegel")  # one face, 226 px wide at full size
SHEA = next(p for p in PHOTOS if p.stem == "shea_whigham")
REGISTRY = load_registry()
FLOOR = REGISTRY.purpose("missing-children").min_quality


def degraded(src: Path, folder: Path) -> dict[str, Path]:
    """The photo shrunk (face ~38 px wide), blurred and darkened, written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.open(src).convert("RGB")
    scale = 38 / 226
    variants = {
        "shrunk": image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS),
        "blurred": image.filter(ImageFilter.GaussianBlur(image.width / 150)),
        "darkened": ImageEnhance.Brightness(image).enhance(0.15),
    }
    paths = {}
    for name, variant in variants.items():
        paths[name] = folder / f"{src.stem}_{name}.jpg"
        variant.save(paths[name], quality=92)
    return paths


# --- the pure decision -----------------------------------------------------------------------------

GOOD = FaceQuality(width_px=226, height_px=307, sharpness=74, brightness=0.48, yaw_deg=-5, roll_deg=1,
                   probability=0.9999)


def test_a_good_face_passes_and_each_limit_fails_with_its_own_reason():
    assert check_quality(GOOD, FLOOR, "purpose missing-children").passed
    assert check_quality(GOOD, None, "x").passed
    cases = {
        "width_px": (38, "face 38 px wide; purpose missing-children needs 80"),
        "sharpness": (3.2, "face sharpness 3.2 (variance of Laplacian); purpose missing-children needs 40"),
        "brightness": (0.07, "face too dark (brightness 0.07); purpose missing-children needs at least 0.15"),
        "yaw_deg": (-60, "face turned 60 deg (yaw); purpose missing-children allows at most 45"),
        "probability": (0.93, "detection probability 0.930; purpose missing-children needs 0.95"),
    }
    for field, (value, reason) in cases.items():
        verdict = check_quality(GOOD.model_copy(update={field: value}), FLOOR, "purpose missing-children")
        assert not verdict.passed and verdict.reasons == [reason], field
    bright = check_quality(GOOD.model_copy(update={"brightness": 0.97}), FLOOR, "p")
    assert bright.reasons == ["face too bright (brightness 0.97); p allows at most 0.9"]
    # No landmarks (an aligned crop): pose is unknown and is not held against the face.
    assert check_quality(GOOD.model_copy(update={"yaw_deg": None, "roll_deg": None}), FLOOR, "p").passed


def test_stricter_takes_the_strictest_limit_of_each_kind_and_claims_round_trip():
    a = QualityFloor(min_face_px=80, max_yaw_deg=45)
    b = QualityFloor(min_face_px=60, min_sharpness=10, max_yaw_deg=30)
    merged = stricter(a, None, b)
    assert merged == QualityFloor(min_face_px=80, min_sharpness=10, max_yaw_deg=30)
    assert stricter(None, None) is None
    assert floor_from_claim(floor_to_claim(merged)) == merged
    assert floor_to_claim(None) == "" and floor_to_claim(QualityFloor()) == "" and floor_from_claim("") is None


def test_the_registry_states_floors_and_filters_and_refuses_bad_ones():
    assert FLOOR is not None and FLOOR.min_face_px == 80
    assert REGISTRY.purpose("research").min_quality is None
    assert set(REGISTRY.quality_filters) == {"low", "medium", "high"}
    data = REGISTRY.model_dump(mode="json")
    data["purposes"][0]["min_quality"] = {"min_face_px": 80, "min_sharpnes": 3}
    with pytest.raises(RegistryError, match="min_sharpnes"):
        registry_from_dict(data)
    data = REGISTRY.model_dump(mode="json")
    data["quality_filters"]["bad"] = {"min_brightness": 0.8, "max_brightness": 0.2}
    with pytest.raises(RegistryError, match="min_brightness"):
        registry_from_dict(data)


# --- measured on real photos, in the worker's chunk function ------------------------------------------

@pytest.fixture(scope="module")
def crops_gallery(tmp_path_factory, pipeline):
    from workers.chunks import run_index_chunk

    store = GalleryStore(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
    run_index_chunk(IndexChunk(job_id="i", chunk_no=0, gallery="crops", paths=[str(p) for p in ALIGNED]),
                    pipeline, store, [FIXTURES])
    yield store
    store.close()


def test_fixtures_at_their_size_are_searched_and_degraded_copies_are_not(crops_gallery, pipeline, tmp_path):
    from workers.chunks import run_search_chunk

    bad = degraded(KATE, tmp_path / "probes")
    probes = [str(KATE), str(SHEA), *(str(p) for p in bad.values())]
    message = SearchChunk(job_id="s", chunk_no=0, gallery="crops", paths=probes, top_k=2, threshold=-1.0)
    result = run_search_chunk(message, pipeline, crops_gallery, [FIXTURES, tmp_path], quality_floor=FLOOR,
                              floor_owner="purpose missing-children")
    by_path = {p.path: p for p in result.probes}
    items = {i.path: i for i in result.items}
    for good in (KATE, SHEA):
        probe = by_path[str(good)]
        assert probe.not_searched is None and len(probe.matches) == 2, good.name
        assert probe.quality["width_px"] >= 200 and probe.quality["sharpness"] >= 40
        assert items[str(good)].ok and items[str(good)].reason is None
    expected = {"shrunk": r"face \d+ px wide; purpose missing-children needs 80",
                "blurred": r"face sharpness [\d.]+ \(variance of Laplacian\); purpose missing-children needs 40",
                "darkened": r"face too dark \(brightness 0\.\d+\); purpose missing-children needs at least 0\.15"}
    for name, pattern in expected.items():
        probe = by_path[str(bad[name])]
        assert probe.matches == [] and re.search(pattern, probe.not_searched), (name, probe.not_searched)
        item = items[str(bad[name])]
        assert not item.ok and item.reason.startswith("face 0 not searched: ") and re.search(pattern, item.reason)
    shrunk = by_path[str(bad["shrunk"])].quality["width_px"]
    assert 30 <= shrunk <= 46, shrunk  # the shrink made the face about 38 px wide
    # The same probes with no floor: every face is searched.
    unfloored = run_search_chunk(message, pipeline, crops_gallery, [FIXTURES, tmp_path])
    assert all(p.not_searched is None and p.matches for p in unfloored.probes)


def test_enrolment_filter_leaves_out_faces_below_it(pipeline, tmp_path):
    from workers.chunks import run_index_chunk

    bad = degraded(KATE, tmp_path / "gallery")
    store = GalleryStore(str(tmp_path / "milvus.db"))
    try:
        message = IndexChunk(job_id="i", chunk_no=0, gallery="filtered", paths=[str(KATE), str(bad["shrunk"])],
                             quality_filter="medium")
        result = run_index_chunk(message, pipeline, store, [FIXTURES, tmp_path],
                                 quality_filter=REGISTRY.quality_filters["medium"])
        items = {i.path: i for i in result.items}
        assert items[str(KATE)].ok and items[str(KATE)].faces == 1
        shrunk = items[str(bad["shrunk"])]
        assert not shrunk.ok and shrunk.faces == 0
        assert re.search(r"face 0 not enrolled: face \d+ px wide; gallery filter 'medium' needs 64", shrunk.reason)
        assert store.count("filtered") == 1  # exactly the one face at or above the filter
    finally:
        store.close()


# --- at the gate: the floor is bound into the ticket --------------------------------------------------

def test_the_gate_binds_the_purposes_floor_into_each_search_ticket(tmp_path):
    from scheduler.audit import AuditLog
    from scheduler.gate import SubmissionGate

    settings = make_settings(tmp_path)
    thorn, _ = register(settings, "thorn")
    lab, _ = register(settings)
    gate = SubmissionGate(settings, AuditLog(settings.resolved_database_url))
    from facegate.db import session_scope
    from scheduler.models import Gallery

    with session_scope(settings.resolved_database_url) as s:
        s.add_all([Gallery(name="cases", owner="thorn"), Gallery(name="labg", owner=lab.organisation_id)])
    message = SearchChunk(job_id="j", chunk_no=0, gallery="cases", paths=["/x.jpg"], top_k=1, threshold=0.99)
    admission = gate.admit(thorn, "search", "missing-children", job_id="j", gallery="cases")
    assert admission.allowed
    claims = verify_ticket(admission.ticket_for(message), settings.resolved_ticket_secret(),
                           datetime.now(timezone.utc))
    assert floor_from_claim(claims.min_quality) == FLOOR
    # A purpose with no floor states none; indexing states none.
    research = gate.admit(lab, "search", "research", job_id="k", gallery="labg")
    assert research.allowed and research._claims["min_quality"] == ""
    indexing = gate.admit(thorn, "index", "missing-children", job_id="l", gallery="cases")
    assert indexing._claims["min_quality"] == ""


# --- end to end: a real worker process enforces the floor ---------------------------------------------

@pytest.mark.slow
def test_worker_enforces_the_floor_of_the_ticket_and_of_the_registry(tmp_path, redis_url):
    from facegate.queue import make_celery
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.service import JobService
    from tests.e2e import WorkerProcess

    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=str(tmp_path / "milvus.db"))
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    thorn, _ = register(settings, "thorn")
    bad = degraded(KATE, tmp_path / "galleries" / "probes")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        indexed = service.wait(service.submit_index(FIXTURES / "aligned", "cases", thorn, "missing-children").id,
                               timeout_s=300)
        assert indexed.state == "done"
        job = service.wait(service.submit_search([str(KATE), str(bad["shrunk"])], "cases", thorn,
                                                 "missing-children", threshold=0.95).id, timeout_s=300)
        assert job.state == "partly_failed", job
        assert [e["path"] for e in job.errors] == [str(bad["shrunk"].resolve())]
        assert re.search(r"face \d+ px wide; purpose missing-children needs 80", job.errors[0]["reason"])
        results = {r["path"]: r for r in service.probe_results(job.id)}
        shrunk, kate = results[str(bad["shrunk"].resolve())], results[str(KATE)]
        assert shrunk["not_searched"] and shrunk["matches"] == [] and shrunk["quality"]["width_px"] < 80
        assert kate["not_searched"] is None and kate["quality"]["width_px"] > 200
        assert kate["matches"] and all(m["probe_quality"] == kate["quality"] for m in kate["matches"])
        finished = service.audit.rows(job_id=job.id, event="job.finished")[0].detail
        assert finished["probe_faces_below_quality_floor"] == 1 and finished["probe_faces"] == 1

        def sent(min_quality: str) -> dict:
            """A search chunk sent straight to the worker, its ticket stating `min_quality`."""
            message = SearchChunk(job_id=f"direct-{time.monotonic_ns()}", chunk_no=0, gallery=indexed.gallery,
                                  paths=[str(KATE), str(bad["shrunk"])], top_k=2, threshold=0.95)
            claims = TicketClaims(organisation_id="thorn", capability="search", purpose="missing-children",
                                  registry_hash="r", expires_at=int(time.time()) + 600, min_quality=min_quality,
                                  **work_binding(message))
            message.ticket = sign_ticket(claims, settings.resolved_ticket_secret())
            result = app.send_task(SEARCH_CHUNK_TASK, args=[message.model_dump(mode="json")]).get(timeout=300)
            return {p["path"]: p for p in result["probes"]}

        # A ticket stating no floor: the worker applies the registry's floor all the same.
        unstated = sent("")
        assert unstated[str(bad["shrunk"])]["not_searched"] and unstated[str(KATE)]["not_searched"] is None
        # A ticket stating a stricter floor than the registry's: the worker enforces the ticket's.
        strict = sent(floor_to_claim(QualityFloor(min_face_px=500)))
        assert strict[str(KATE)]["not_searched"].startswith("face 2") and "needs 500" in strict[str(KATE)]["not_searched"]
    finally:
        worker.stop()
        app.close()
