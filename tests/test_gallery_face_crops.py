"""A gallery's face by its id, as a crop: the API's endpoint and the console's gallery page of thumbnails.
A real `milvus-lite server` holds the faces (the API process reads the store, as it does to list faces);
they are written as a worker's index chunk writes them (no worker)."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.vocabulary import AuditEvent
from index import FaceRecord, GalleryStore
from scheduler.api import create_app
from scheduler.audit import AuditLog
from scheduler.crops import MARGIN
from scheduler.models import Gallery
from tests.conftest import PHOTOS, add_user, make_settings, register
from tests.e2e import MilvusLiteServer, api_headers

pytestmark = pytest.mark.slow
LAB, OTHER = "university-lab-example", "photo-archive-example"
BOX = [20.0, 10.0, 80.0, 90.0]  # 60 x 80


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gallery-crops")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, milvus_uri=milvus.uri)
    folder = tmp / "galleries" / "archive"
    folder.mkdir(parents=True)
    images = [folder / p.name for p in PHOTOS[:2]]
    for photo, image in zip(PHOTOS, images):
        shutil.copy(photo, image)
    tokens = {org: register(settings, org)[1] for org in (LAB, OTHER)}
    add_user(settings, LAB, "ana", "reviewer")
    add_user(settings, OTHER, "olga", "reviewer", "submitter")
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="archive", label="archive", owner=LAB, folder=str(folder), purpose="research",
                      model_version="untrained-seed0"))
    store = GalleryStore(milvus.uri)
    store.ensure_gallery("archive", "untrained-seed0", dimension=8)
    rng = np.random.default_rng(0)
    store.upsert_faces([FaceRecord(gallery="archive", image_path=str(i), image_sha256=sha256_file(i), face_no=0,
                                   box=BOX, probability=0.99, landmarks=[], model_version="untrained-seed0",
                                   vector=rng.standard_normal(8).astype(np.float32), external_id="case-7")
                        for i in images])
    store.close()
    app = create_app(settings, None, collect_every_s=None)
    with TestClient(app) as client:
        yield client, app, settings, tokens, images
    milvus.stop()


def _faces(client, headers) -> dict[str, dict]:
    listed = client.get("/v1/galleries/archive/faces", headers=headers)
    assert listed.status_code == 200, listed.text
    return {f["image_path"]: f for f in listed.json()["items"]}


def test_a_gallery_face_is_cut_at_its_box_for_its_readers_only_and_every_view_is_audited(served):
    client, _, settings, tokens, images = served
    lab, other = api_headers(tokens[LAB]), api_headers(tokens[OTHER])
    face = _faces(client, lab)[str(images[0])]
    url = f"/v1/galleries/archive/faces/{face['face_id']}/crop"
    shown = client.get(url, headers=lab)
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg", shown.text
    assert "no-store" in shown.headers["cache-control"]
    crop = Image.open(io.BytesIO(shown.content))
    # The margin on each side, clipped at the image's top edge (the box starts 10 px down).
    assert crop.size == (int(80 + 60 * MARGIN + 1) - int(20 - 60 * MARGIN), int(90 + 80 * MARGIN + 1))
    views = AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)
    assert [(v.organisation_id, v.gallery, v.detail["face"], v.detail["face_id"], v.detail["image_path"])
            for v in views] == [(LAB, "archive", "gallery", face["face_id"], str(images[0]))]
    assert views[0].api_key_id

    # Another organisation: not found, as if the gallery did not exist; an unknown or malformed id too.
    for headers, face_url in ((other, url), (lab, f"/v1/galleries/archive/faces/{'0' * 32}/crop"),
                              (lab, "/v1/galleries/archive/faces/not-an-id/crop"),
                              (lab, f"/v1/galleries/nope/faces/{face['face_id']}/crop")):
        refused = client.get(face_url, headers=headers)
        assert refused.status_code == 404 and refused.headers["content-type"] == "application/problem+json"
    assert client.get(url).status_code == 401
    assert len(AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)) == 1


def test_a_gallery_face_whose_image_changed_is_gone(served):
    client, _, settings, tokens, images = served
    lab = api_headers(tokens[LAB])
    face = _faces(client, lab)[str(images[1])]
    with Image.open(images[1]) as original:
        original.rotate(180).save(images[1], "JPEG")
    gone = client.get(f"/v1/galleries/archive/faces/{face['face_id']}/crop", headers=lab)
    assert gone.status_code == 410 and "gone" in gone.json()["detail"] and "changed" in gone.json()["detail"]
    viewed = AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)[-1]
    assert viewed.detail["face_id"] == face["face_id"] and "changed" in viewed.detail["gone"]


def _signed_in(app, username: str) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/sign-in").text).group(1)
    answer = client.post("/sign-in", data={"username": username, "password": "correct horse battery staple",
                                           "csrf_token": token, "next": "/galleries"})
    assert answer.status_code == 303, answer.text
    return client


def test_the_consoles_gallery_page_shows_its_faces_as_thumbnails_by_page(served):
    _, app, settings, tokens, images = served
    ana = _signed_in(app, "ana")
    assert 'href="/galleries/archive"' in ana.get("/galleries").text
    page = ana.get("/galleries/archive?limit=1")
    assert page.status_code == 200 and "case-7" in page.text
    crops = re.findall(r'<img class="crop" src="([^"]+)"', page.text)
    assert len(crops) == 1 and crops[0].startswith("/v1/galleries/archive/faces/")
    assert 'rel="next" href="?offset=1&amp;limit=1"' in page.text
    second = re.findall(r'<img class="crop" src="([^"]+)"', ana.get("/galleries/archive?offset=1&limit=1").text)
    assert len(second) == 1 and second != crops
    # The session cookie signs the crop endpoint in; the view is audited with the user.
    for url in crops + second:
        answer = ana.get(url)
        assert answer.status_code in (200, 410), answer.text
    assert AuditLog(settings.resolved_database_url).rows(event=AuditEvent.FACE_VIEWED)[-1].detail["user"] == "ana"
    olga = _signed_in(app, "olga")
    assert olga.get("/galleries/archive").status_code == 404
    assert olga.get(crops[0]).status_code == 404
