"""Face crops over HTTP: cut at the stored box from the image file, decided by the access rule, every view
audited, a gone image a 410 problem. Results are recorded as a worker's fold would leave them (no worker)."""

from __future__ import annotations

import io
import shutil

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.vocabulary import AuditEvent, JobKind, JobState
from scheduler.api import create_app
from scheduler.audit import AuditLog
from scheduler.crops import MARGIN
from scheduler.models import Gallery, Job, ProbeResult
from tests.conftest import PHOTOS, make_settings, register
from tests.e2e import api_headers

LAB, OTHER = "university-lab-example", "photo-archive-example"
PROBE_BOX = [40.0, 30.0, 140.0, 150.0]  # 100 x 120
MATCH_BOX = [20.0, 10.0, 80.0, 90.0]  # 60 x 80


@pytest.fixture
def recorded(tmp_path):
    settings = make_settings(tmp_path)
    folder = tmp_path / "galleries" / "archive"
    folder.mkdir(parents=True)
    gallery_image = folder / PHOTOS[0].name
    shutil.copy(PHOTOS[0], gallery_image)
    probe_image = tmp_path / "galleries" / "probe.jpg"
    shutil.copy(PHOTOS[1], probe_image)
    tokens = {org: register(settings, org)[1] for org in (LAB, OTHER)}
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="archive", label="archive", owner=LAB, folder=str(folder), purpose="research",
                      model_version="untrained-seed0"))
        s.add(Job(id="job1", kind=JobKind.SEARCH, submitter=LAB, purpose="research", gallery="archive",
                  gallery_label="archive", state=JobState.DONE, params={}))
        s.flush()
        match = {"face_id": "face-1", "image_path": str(gallery_image), "image_sha256": sha256_file(gallery_image),
                 "similarity": 0.97, "box": MATCH_BOX, "review": "not_required"}
        probe = ProbeResult(job_id="job1", path=str(probe_image), face_no=0, box=PROBE_BOX, probability=0.99,
                            matches=[match])
        s.add(probe)
        s.flush()
        probe_id = probe.id
    app = create_app(settings, None, collect_every_s=None)
    with TestClient(app) as client:
        yield client, settings, tokens, probe_id, gallery_image


def _jpeg(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert "no-store" in response.headers["cache-control"]
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    return image


def test_probe_and_match_crops_are_cut_at_the_box_and_every_view_is_audited(recorded):
    client, settings, tokens, probe_id, gallery_image = recorded
    lab = api_headers(tokens[LAB])
    probe = _jpeg(client.get(f"/v1/jobs/job1/results/{probe_id}/crop", headers=lab))
    assert probe.size == (int(100 * (1 + 2 * MARGIN)) + 1, int(120 * (1 + 2 * MARGIN)) + 1)
    match = _jpeg(client.get(f"/v1/jobs/job1/results/{probe_id}/matches/face-1/crop", headers=lab))
    # The margin (12 px, 16 px) on each side, clipped at the image's top edge (the box starts 10 px down).
    assert match.size == (int(80 + 60 * MARGIN + 1) - int(20 - 60 * MARGIN), int(90 + 80 * MARGIN + 1) - 0)
    # The pixels are the gallery image's at that place, not the probe's.
    with Image.open(gallery_image) as original:
        expected = original.convert("RGB").crop((8, 0, 8 + match.width, match.height))
    diff = sum(abs(a - b) for a, b in zip(expected.getpixel((20, 20)), match.convert("RGB").getpixel((20, 20))))
    assert diff < 40

    views = AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)
    assert [(v.detail["face"], v.detail["face_id"]) for v in views] == [("probe", None), ("gallery", "face-1")]
    assert all(v.organisation_id == LAB and v.job_id == "job1" and v.api_key_id for v in views)
    assert views[1].detail["image_path"] == str(gallery_image)


def test_another_organisation_and_unknown_faces_are_not_found(recorded):
    client, settings, tokens, probe_id, _ = recorded
    other, lab = api_headers(tokens[OTHER]), api_headers(tokens[LAB])
    for url in (f"/v1/jobs/job1/results/{probe_id}/crop", f"/v1/jobs/job1/results/{probe_id}/matches/face-1/crop"):
        refused = client.get(url, headers=other)
        assert refused.status_code == 404 and refused.headers["content-type"] == "application/problem+json"
        assert client.get(url).status_code == 401
    assert client.get(f"/v1/jobs/job1/results/{probe_id + 1}/crop", headers=lab).status_code == 404
    assert client.get(f"/v1/jobs/job1/results/{probe_id}/matches/face-2/crop", headers=lab).status_code == 404
    # Nothing was shown, so no view was recorded.
    assert AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED) == []


def test_a_gallery_image_gone_or_changed_is_a_410_saying_so(recorded):
    client, settings, tokens, probe_id, gallery_image = recorded
    lab = api_headers(tokens[LAB])
    url = f"/v1/jobs/job1/results/{probe_id}/matches/face-1/crop"
    shutil.copy(PHOTOS[2], gallery_image)  # another photo at the same path: not the face that was indexed
    changed = client.get(url, headers=lab)
    assert changed.status_code == 410 and changed.headers["content-type"] == "application/problem+json"
    assert "gone" in changed.json()["detail"] and "changed since it was indexed" in changed.json()["detail"]
    gallery_image.unlink()
    gone = client.get(url, headers=lab)
    assert gone.status_code == 410 and gone.json()["title"] == "Gone"
    assert f"{gallery_image.name} is gone" in gone.json()["detail"]
    views = AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)
    assert len(views) == 2 and all("gone" in v.detail for v in views)
