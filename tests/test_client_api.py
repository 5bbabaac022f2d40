"""What a client developer expects of the API, end to end through a real worker, Redis and Milvus Lite
server: the no-face outcome, external ids on matches, idempotency keys, long-poll, signed webhooks,
listing and deleting faces, synchronous search and compare."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from facegate.queue import make_celery
from facegate.vocabulary import AuditEvent
from scheduler.api import create_app
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from scheduler.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import MULTIFACE, NOISE, PHOTOS, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, api_headers, wait_for_api_job
from tests.test_idempotency_webhooks import _Receiver

pytestmark = pytest.mark.slow
LAB, OTHER = "university-lab-example", "photo-archive-example"


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("clientapi")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/10", milvus_uri=milvus.uri,
                             webhook_allow_private=True, sync_timeout_s=240)
    redis_client(settings.broker_url).flushdb()
    folder = tmp / "galleries" / "people"
    folder.mkdir(parents=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    shutil.copy(MULTIFACE, folder / "group.jpg")
    worker = WorkerProcess(settings, tmp / "worker.log")
    app_celery = make_celery(settings)
    app = create_app(settings, CeleryTaskQueue(app_celery), collect_every_s=0.5)
    keys = {org: register(settings, org)[1] for org in (LAB, OTHER)}
    labels = {photo.name: f"person-{n}" for n, photo in enumerate(PHOTOS)}
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json={"kind": "index", "gallery": "people", "purpose": "research",
                                            "folder": str(folder), "external_ids": labels},
                          headers=api_headers(keys[LAB]))
        assert job.status_code == 202, job.text
        assert wait_for_api_job(client, keys[LAB], job.json()["id"])["state"] == "done"
        yield client, settings, keys, folder, labels
    worker.stop()
    app_celery.close()
    milvus.stop()


def _h(api, org=LAB):
    return api_headers(api[2][org])


def _upload(*paths):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_a_probe_without_a_face_is_said_so_and_matches_carry_external_ids(api):
    client, _, _, folder, labels = api
    search = client.post("/v1/jobs/uploads", data={"gallery": "people", "purpose": "research", "threshold": "0.5"},
                         files=_upload(NOISE, PHOTOS[1]), headers=_h(api))
    assert search.status_code == 202, search.text
    done = client.get(f"/v1/jobs/{search.json()['id']}?wait=60", headers=_h(api)).json()
    if done["state"] in ("queued", "running"):
        done = wait_for_api_job(client, api[2][LAB], done["id"])
    assert done["state"] == "done"
    assert [(e["path"].endswith(NOISE.name), e["reason"]) for e in done["no_face"]] == [(True, "no face found")]
    results = client.get(f"/v1/jobs/{done['id']}/results", headers=_h(api)).json()
    assert [e["reason"] for e in results["no_face"]] == ["no face found"]
    assert all(not p["path"].endswith(NOISE.name) for p in results["items"])  # no face: no item, never "no match"
    best = results["items"][0]["matches"][0]
    assert best["image_path"] == str(folder / PHOTOS[1].name) and best["external_id"] == labels[PHOTOS[1].name]


def test_the_same_idempotency_key_makes_one_job(api):
    client, _, _, _, _ = api
    key = str(uuid.uuid4())
    body = {"kind": "search", "gallery": "people", "purpose": "research", "probes": [str(PHOTOS[2])]}
    before = len(client.get("/v1/jobs?limit=500", headers=_h(api)).json())
    first = client.post("/v1/jobs", json=body, headers={**_h(api), "Idempotency-Key": key})
    again = client.post("/v1/jobs", json=body, headers={**_h(api), "Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(client.get("/v1/jobs?limit=500", headers=_h(api)).json()) == before + 1
    other = client.post("/v1/jobs", json={**body, "top_k": 2}, headers={**_h(api), "Idempotency-Key": key})
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    assert "different request" in other.json()["detail"]
    # Another organisation's same key is its own (and its search of a gallery it cannot see: not found).
    theirs = client.post("/v1/jobs", json=body, headers={**_h(api, OTHER), "Idempotency-Key": key})
    assert theirs.status_code == 404
    # The upload endpoint too: the same images and fields under one key make one job.
    upload_key = str(uuid.uuid4())
    up = [client.post("/v1/jobs/uploads", data={"gallery": "people", "purpose": "research"},
                      files=_upload(PHOTOS[3]), headers={**_h(api), "Idempotency-Key": upload_key})
          for _ in range(2)]
    assert [r.status_code for r in up] == [202, 200] and up[0].json()["id"] == up[1].json()["id"]
    wait_for_api_job(client, api[2][LAB], up[0].json()["id"])
    wait_for_api_job(client, api[2][LAB], first.json()["id"])


def test_long_poll_returns_when_the_job_ends(api):
    client, _, _, _, _ = api
    job = client.post("/v1/jobs", json={"kind": "search", "gallery": "people", "purpose": "research",
                                        "probes": [str(PHOTOS[0])]}, headers=_h(api)).json()
    polled = client.get(f"/v1/jobs/{job['id'][:10]}?wait=60", headers=_h(api))  # a unique prefix will do
    assert polled.status_code == 200 and polled.json()["id"] == job["id"]
    assert polled.json()["state"] == "done"
    assert client.get(f"/v1/jobs/{job['id']}?wait=-1", headers=_h(api)).status_code == 422


def test_a_finished_job_is_posted_to_its_callback_signed(api):
    client, settings, _, _, _ = api
    refused = client.post("/v1/jobs", json={"kind": "search", "gallery": "people", "purpose": "research",
                                            "probes": [str(PHOTOS[0])], "callback_url": "http://127.0.0.1:9/x"},
                          headers=_h(api))
    assert refused.status_code == 422 and "no webhook secret" in refused.json()["detail"]
    created = client.post("/v1/webhooks/secret", headers=_h(api))
    assert created.status_code == 201
    secret = created.json()["secret"]
    bad = client.post("/v1/jobs", json={"kind": "search", "gallery": "people", "purpose": "research",
                                        "probes": [str(PHOTOS[0])], "callback_url": "ftp://example.com/x"},
                      headers=_h(api))
    assert bad.status_code == 422 and "http(s)" in bad.json()["detail"]
    receiver = _Receiver([500])  # the first attempt fails: it is retried
    try:
        job = client.post("/v1/jobs", json={"kind": "search", "gallery": "people", "purpose": "research",
                                            "probes": [str(PHOTOS[0])], "callback_url": receiver.url},
                          headers=_h(api)).json()
        deadline = time.monotonic() + 120
        while len(receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(receiver.received) == 2
        for body, headers in receiver.received:
            assert verify(secret, body, headers[SIGNATURE_HEADER])
        import json

        view = json.loads(receiver.received[-1][0])
        assert view["id"] == job["id"] and view["state"] == "done"
        rows = JobService(settings).audit.rows(job_id=job["id"], event=AuditEvent.WEBHOOK_ATTEMPT)
        assert [(r.detail["attempt"], r.detail["delivered"]) for r in rows] == [(1, False), (2, True)]
    finally:
        receiver.stop()


def test_faces_are_listed_by_page_and_one_is_deleted_by_id(api):
    client, settings, _, folder, labels = api
    shown = client.get("/v1/galleries/people", headers=_h(api)).json()
    first = client.get("/v1/galleries/people/faces?limit=4", headers=_h(api)).json()
    assert first["total"] == shown["faces"] == len(PHOTOS) + 6 and len(first["items"]) == 4
    faces, offset = list(first["items"]), first["next_offset"]
    while offset is not None:
        page = client.get(f"/v1/galleries/people/faces?offset={offset}&limit=4", headers=_h(api)).json()
        faces += page["items"]
        offset = page["next_offset"]
    assert len({f["face_id"] for f in faces}) == first["total"]
    labelled = {f["image_path"]: f["external_id"] for f in faces}
    assert labelled[str(folder / PHOTOS[0].name)] == labels[PHOTOS[0].name]
    assert labelled[str(folder / "group.jpg")] is None  # indexed without a label
    target = next(f for f in faces if f["image_path"].endswith("group.jpg"))

    assert client.get("/v1/galleries/people/faces", headers=_h(api, OTHER)).status_code == 404
    assert client.delete(f"/v1/galleries/people/faces/{target['face_id']}", headers=_h(api, OTHER)).status_code == 404
    assert client.delete("/v1/galleries/people/faces/not-an-id", headers=_h(api)).status_code == 422
    job = client.delete(f"/v1/galleries/people/faces/{target['face_id']}", headers=_h(api))
    assert job.status_code == 202, job.text
    done = wait_for_api_job(client, api[2][LAB], job.json()["id"])
    assert done["state"] == "done" and done["kind"] == "erase"
    after = client.get("/v1/galleries/people/faces?limit=1000", headers=_h(api)).json()
    assert after["total"] == first["total"] - 1
    assert target["face_id"] not in {f["face_id"] for f in after["items"]}
    assert client.get("/v1/galleries/people", headers=_h(api)).json()["faces"] == shown["faces"] - 1
    rows = JobService(settings).audit.rows(job_id=done["id"], event=AuditEvent.ERASURE)
    assert len(rows) == 1 and rows[0].detail["faces_removed"] == 1 and rows[0].detail["scope"].startswith("face ")


def test_synchronous_search_answers_with_the_matches_through_the_gate(api):
    client, settings, _, folder, labels = api
    answer = client.post("/v1/search", data={"gallery": "people", "purpose": "research", "threshold": "0.5"},
                         files={"file": (PHOTOS[1].name, PHOTOS[1].read_bytes(), "image/jpeg")}, headers=_h(api))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["job"]["state"] == "done" and body["no_face"] == []
    best = body["matches"][0]["matches"][0]
    assert best["image_path"] == str(folder / PHOTOS[1].name) and best["external_id"] == labels[PHOTOS[1].name]
    events = [r.event for r in JobService(settings).audit.rows(job_id=body["job"]["id"])]
    assert AuditEvent.JOB_SUBMITTED in events and AuditEvent.JOB_FINISHED in events
    blank = client.post("/v1/search", data={"gallery": "people", "purpose": "research"},
                        files={"file": (NOISE.name, NOISE.read_bytes(), "image/jpeg")}, headers=_h(api)).json()
    assert blank["matches"] == [] and [e["reason"] for e in blank["no_face"]] == ["no face found"]
    other = client.post("/v1/search", data={"gallery": "people", "purpose": "research"},
                         files={"file": (NOISE.name, NOISE.read_bytes(), "image/jpeg")}, headers=_h(api, OTHER))
    assert other.status_code == 404  # another organisation's gallery: not found


def test_compare_gives_the_best_pair_similarity(api):
    client, settings, _, _, _ = api
    same = client.post("/v1/compare", data={"purpose": "research"},
                       files={"first": (PHOTOS[0].name, PHOTOS[0].read_bytes(), "image/jpeg"),
                              "second": ("copy.jpg", PHOTOS[0].read_bytes(), "image/jpeg")}, headers=_h(api))
    assert same.status_code == 200, same.text
    result = same.json()
    assert result["similarity"] == pytest.approx(1.0, abs=1e-4) and result["reason"] is None
    assert result["model_version"] and "false_match_rate" in result
    # The best pair across faces: one face of the group photo against the group photo itself.
    group = client.post("/v1/compare", data={"purpose": "research"},
                        files={"first": ("a.jpg", MULTIFACE.read_bytes(), "image/jpeg"),
                               "second": ("b.jpg", MULTIFACE.read_bytes(), "image/jpeg")}, headers=_h(api)).json()
    assert group["similarity"] == pytest.approx(1.0, abs=1e-4) and group["faces"][0] == group["faces"][1]
    none = client.post("/v1/compare", data={"purpose": "research"},
                       files={"first": (PHOTOS[0].name, PHOTOS[0].read_bytes(), "image/jpeg"),
                              "second": (NOISE.name, NOISE.read_bytes(), "image/jpeg")}, headers=_h(api)).json()
    assert none["similarity"] is None and "no face found in noise.jpg" in none["reason"]
    rows = JobService(settings).audit.rows(job_id=result["job_id"])
    assert [r.event for r in rows if r.event.startswith("job.")] == [AuditEvent.JOB_SUBMITTED, AuditEvent.JOB_FINISHED]
    assert all(r.capability == "compare" for r in rows if r.event.startswith("job."))
