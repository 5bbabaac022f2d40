"""The HTTP API end to end: a real worker, real Redis, a real Milvus Lite store, through HTTP requests."""

from __future__ import annotations

import shutil
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from facegate.queue import make_celery
from index import GalleryNotFound, GalleryStore
from scheduler.api import create_app
from scheduler.dispatch import CeleryTaskQueue
from scheduler.galleries import GalleryService
from scheduler.service import JobService
from scheduler.tasks import run_nightly_reindex
from tests.conftest import MULTIFACE, PHOTOS, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, api_headers, wait_for_api_job

pytestmark = pytest.mark.slow
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("api")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/9", milvus_uri=milvus.uri,
                             max_request_bytes=4 * 1024 * 1024)
    redis_client(settings.broker_url).flushdb()
    folder = tmp / "galleries" / "archive"
    folder.mkdir(parents=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    shutil.copy(MULTIFACE, folder / "group.jpg")
    worker = WorkerProcess(settings, tmp / "worker.log")
    app_celery = make_celery(settings)
    app = create_app(settings, CeleryTaskQueue(app_celery), collect_every_s=0.5)
    keys = {org: register(settings, org)[1] for org in
            ("university-lab-example", "photo-archive-example", "city-police-example")}
    with TestClient(app) as client:
        yield client, settings, keys, folder, app_celery, tmp
    worker.stop()
    app_celery.close()
    milvus.stop()


_h = api_headers
_wait = wait_for_api_job


def _faces_in_store(settings, key):
    store = GalleryStore(settings.milvus_uri)
    try:
        return store.count(key) if store.has_gallery(key) else None
    except GalleryNotFound:  # dropped between the two calls by the worker finishing a rebuild
        return None
    finally:
        store.close()


def test_register_index_upload_search_and_page(api):
    client, settings, keys, folder, _, _ = api
    lab = keys["university-lab-example"]
    created = client.post("/v1/galleries", json={"name": "archive", "folder": str(folder), "nightly": True,
                                                    "purpose": "research"},
                          headers=_h(lab))
    assert created.status_code == 201, created.text
    job = client.post("/v1/jobs", json={"kind": "index", "gallery": "archive", "purpose": "research"},
                      headers=_h(lab))
    assert job.status_code == 202 and job.json()["state"] == "queued"
    done = _wait(client, lab, job.json()["id"])
    assert done["state"] == "done" and done["progress"] == {"done": 5, "total": 5, "failed": 0}
    assert done["untrained"] and "UNTRAINED" in done["warning"]
    shown = client.get("/v1/galleries/archive", headers=_h(lab)).json()
    assert shown["images"] == 5 and shown["faces"] == len(PHOTOS) + 6
    assert shown["model_version"] == "untrained-seed0"

    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in (PHOTOS[1], MULTIFACE)]
    search = client.post("/v1/jobs/uploads", data={"gallery": "archive", "purpose": "research", "threshold": "0",
                                                   "top_k": "3"}, files=files, headers=_h(lab))
    assert search.status_code == 202, search.text
    finished = _wait(client, lab, search.json()["id"])
    assert finished["state"] == "done"
    first = client.get(f"/v1/jobs/{finished['id']}/results?limit=3", headers=_h(lab)).json()
    assert first["total"] == 7 and len(first["items"]) == 3 and first["next_offset"] == 3
    rest = client.get(f"/v1/jobs/{finished['id']}/results?offset=3&limit=10", headers=_h(lab)).json()
    assert len(rest["items"]) == 4 and rest["next_offset"] is None
    probes = first["items"] + rest["items"]
    single = next(p for p in probes if p["path"].endswith(PHOTOS[1].name))
    assert single["matches"][0]["image_path"] == str(folder / PHOTOS[1].name)
    assert single["matches"][0]["similarity"] > 0.99 and single["matches"][0]["review"] == "not_required"


def test_error_paths_are_problem_details(api):
    client, _, keys, _, _, _ = api
    lab = keys["university-lab-example"]
    unauth = client.get("/v1/jobs")
    assert unauth.status_code == 401 and unauth.headers["content-type"] == PROBLEM
    assert "X-API-Key" in unauth.json()["detail"]
    assert client.get("/v1/jobs", headers=_h("fg_0123456789ab_" + "x" * 43)).status_code == 401
    # The same key as a bearer token; another scheme is no key at all.
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {lab}"}).status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": f"Basic {lab}"}).status_code == 401
    # Both ways are security schemes in the OpenAPI document, required by the job routes.
    document = client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "API key: fg_<id>_<secret>"}
    assert schemes["bearer"]["scheme"] == "bearer"
    assert {"apiKey": []} in document["paths"]["/v1/jobs"]["get"]["security"]

    police = client.post("/v1/jobs", json={"kind": "index", "gallery": "pol", "purpose": "criminal-investigation",
                                           "folder": "/galleries/none"}, headers=_h(keys["city-police-example"]))
    # The path is refused first if it is outside the roots; inside the roots, the gate speaks.
    assert police.status_code in (403, 422)
    inside = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive",
                                           "purpose": "criminal-investigation", "probes": [str(PHOTOS[0])]},
                         headers=_h(keys["city-police-example"]))
    assert inside.status_code in (403, 404)

    missing = client.get("/v1/jobs/does-not-exist", headers=_h(lab))
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM

    invalid = client.post("/v1/jobs", json={"kind": "bogus", "gallery": "archive", "purpose": "research"},
                          headers=_h(lab))
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["where"].endswith("kind")

    big = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]  # > 4 MiB in all
    too_large = client.post("/v1/jobs/uploads", data={"gallery": "archive", "purpose": "research"}, files=big,
                            headers=_h(lab))
    assert too_large.status_code == 413 and too_large.headers["content-type"] == PROBLEM


def test_policy_denial_is_403_with_the_reason(api, tmp_path):
    client, settings, keys, folder, _, _ = api
    police = keys["city-police-example"]
    denied = client.post("/v1/jobs", json={"kind": "index", "gallery": "police_gallery", "folder": str(folder),
                                           "purpose": "criminal-investigation"}, headers=_h(police))
    assert denied.status_code == 403
    body = denied.json()
    assert body["rule_ids"] == ["rekognition-police-moratorium"] and "moratorium" in body["detail"]
    refused_job = client.get(f"/v1/jobs/{body['job_id']}", headers=_h(police)).json()
    assert refused_job["state"] == "refused"
    metrics = client.get("/metrics").text
    assert 'facegate_policy_denials_total{rule="rekognition-police-moratorium"}' in metrics
    assert "facegate_jobs{" in metrics and "facegate_faces_indexed" in metrics


def test_organisation_b_cannot_see_or_touch_a(api):
    client, _, keys, _, _, _ = api
    lab, archive = keys["university-lab-example"], keys["photo-archive-example"]
    a_jobs = client.get("/v1/jobs", headers=_h(lab)).json()
    assert a_jobs
    b = _h(archive)
    assert client.get("/v1/jobs", headers=b).json() == []
    assert [g["name"] for g in client.get("/v1/galleries", headers=b).json()] == []
    assert client.get(f"/v1/jobs/{a_jobs[0]['id']}", headers=b).status_code == 404
    assert client.get(f"/v1/jobs/{a_jobs[0]['id']}/results", headers=b).status_code == 404
    assert client.post(f"/v1/jobs/{a_jobs[0]['id']}/cancel", headers=b).status_code == 404
    assert client.get("/v1/galleries/archive", headers=b).status_code == 404
    assert client.delete("/v1/galleries/archive", headers=b).status_code == 404
    assert client.post("/v1/erasures", json={"gallery": "archive", "whole_gallery": True},
                       headers=b).status_code == 404
    search = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive", "purpose": "photo-library",
                                           "probes": [str(PHOTOS[0])]}, headers=b)
    assert search.status_code == 404


def test_erasure_removes_exactly_the_named_vectors_and_is_audited(api):
    client, settings, keys, folder, _, _ = api
    lab = keys["university-lab-example"]
    before = _faces_in_store(settings, "archive")
    target = str(folder / "group.jpg")
    job = client.post("/v1/erasures", json={"gallery": "archive", "paths": [target]}, headers=_h(lab))
    assert job.status_code == 202, job.text
    done = _wait(client, lab, job.json()["id"])
    assert done["state"] == "done" and done["faces"] == 6
    assert _faces_in_store(settings, "archive") == before - 6
    shown = client.get("/v1/galleries/archive", headers=_h(lab)).json()
    assert shown["images"] == 4 and shown["faces"] == before - 6
    service = JobService(settings)
    rows = service.audit.rows(job_id=done["id"], event="erasure")
    assert len(rows) == 1 and rows[0].detail["images"] == [target] and rows[0].detail["faces_removed"] == 6


def test_nightly_reindex_applies_exactly_the_changes_and_twice_changes_nothing(api):
    client, settings, keys, folder, app_celery, _ = api
    lab = keys["university-lab-example"]
    service = JobService(settings, CeleryTaskQueue(app_celery))
    # New content, not byte copies: identical files share their vectors (face ids derive from content).
    ImageOps.mirror(Image.open(PHOTOS[0])).save(folder / "added.jpg", quality=90)  # new
    ImageOps.mirror(Image.open(PHOTOS[1])).save(folder / PHOTOS[1].name, quality=90)  # changed, same path
    (folder / PHOTOS[3].name).unlink()  # deleted
    summary = run_nightly_reindex(settings, app_celery)
    plan = summary["archive"]
    # group.jpg was erased: it stays erased (an item that says so), it is not new again.
    assert (plan["new"], plan["changed"], plan["deleted"], plan["erased"]) == (1, 1, 1, 1)
    job = service.wait(plan["job"], timeout_s=300)
    assert job.state == "done" and job.submitter == "facegate-system"
    assert [i["path"] for i in job.not_indexed] == [str(folder / "group.jpg")]
    shown = client.get("/v1/galleries/archive", headers=_h(lab)).json()
    assert shown["images"] == 4 and shown["erased_images"] == 1
    count = _faces_in_store(settings, "archive")
    assert count == shown["faces"]
    # Run as the system submitter on the owner's behalf: decided for the lab as well, and audited so.
    owner_decision = [r for r in service.audit.rows(job_id=plan["job"], event="policy.decision")
                      if r.organisation_id == "university-lab-example"]
    assert owner_decision and owner_decision[0].allowed and owner_decision[0].detail["requested_by"] == \
        "facegate-system"
    again = run_nightly_reindex(settings, app_celery)["archive"]
    assert (again["new"], again["changed"], again["deleted"]) == (0, 0, 0)
    assert service.wait(again["job"], timeout_s=60).state == "done"
    assert _faces_in_store(settings, "archive") == count


def service_principal():
    from scheduler.galleries import SYSTEM_PRINCIPAL

    return SYSTEM_PRINCIPAL


def test_model_change_rebuilds_into_a_new_collection_while_searches_use_the_old(api):
    client, settings, keys, folder, app_celery, tmp = api
    lab = keys["university-lab-example"]
    service = JobService(settings, CeleryTaskQueue(app_celery))
    galleries = GalleryService(service)
    faces = _faces_in_store(settings, "archive")
    rebuild = galleries.reindex("archive", principal=service_principal(), worker_model_version="untrained-seed1")
    assert rebuild.params["rebuild_generation"] == 1
    assert client.get("/v1/galleries/archive", headers=_h(lab)).json()["rebuilding"]

    # No worker of the new model runs yet: the rebuild waits, and a search answers from the old collection.
    during = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive", "purpose": "research",
                                           "probes": [str(PHOTOS[0])], "threshold": 0.0}, headers=_h(lab))
    answered = _wait(client, lab, during.json()["id"])
    assert answered["state"] == "done" and answered["model_version"] == "untrained-seed0"
    assert client.get(f"/v1/jobs/{answered['id']}/results", headers=_h(lab)).json()["items"][0]["matches"]

    new_worker = WorkerProcess(settings.model_copy(update={"untrained_seed": 1}), tmp / "worker-seed1.log")
    try:
        assert service.wait(rebuild.id, timeout_s=300).state == "done"
        shown = client.get("/v1/galleries/archive", headers=_h(lab)).json()
        assert shown["generation"] == 1 and shown["model_version"] == "untrained-seed1" and not shown["rebuilding"]
        assert _faces_in_store(settings, "archive__g1") == faces
        deadline = time.monotonic() + 120
        while _faces_in_store(settings, "archive") is not None and time.monotonic() < deadline:
            time.sleep(0.5)  # the old generation is erased once the new one is complete
        assert _faces_in_store(settings, "archive") is None
        after = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive", "purpose": "research",
                                              "probes": [str(PHOTOS[0])], "threshold": 0.0}, headers=_h(lab))
        assert _wait(client, lab, after.json()["id"])["model_version"] == "untrained-seed1"
    finally:
        new_worker.stop()


def test_openapi_document_describes_the_api(api):
    client, *_ = api
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/results", "/v1/galleries", "/v1/erasures"} <= set(spec["paths"])
    assert client.get("/healthz").json() == {"status": "ok"}
