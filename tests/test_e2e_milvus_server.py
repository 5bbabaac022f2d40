"""Index and search end to end against a real Milvus standalone server: real Redis, real worker processes,
the API. The gallery passes a small ANN size (10 faces), so its collection, and a rebuilt generation's,
is searched through HNSW; `gallery show` and the API say so."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from facegate.queue import make_celery
from index import GalleryNotFound, GalleryStore
from scheduler.api.app import create_app
from scheduler.dispatch import CeleryTaskQueue
from scheduler.galleries import SYSTEM_PRINCIPAL, GalleryService
from scheduler.service import JobService
from tests.conftest import FIXTURES, MULTIFACE, PHOTOS, make_settings, redis_client, register
from tests.e2e import WorkerProcess, api_headers, env_for, run_cli, wait_for_api_job

pytestmark = pytest.mark.slow
GALLERIES = ("srv_fixtures", "srv_twice", "srv_archive", "srv_archive__g1")


def _drop(store: GalleryStore) -> None:
    for gallery in GALLERIES:  # a server given over to the tests may hold an earlier run's
        store.drop_gallery(gallery)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server_url, milvus_server_uri):
    tmp = tmp_path_factory.mktemp("e2e-server")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/15", milvus_uri=milvus_server_uri,
                             milvus_ann_min_faces=10, milvus_hnsw_m=8, milvus_hnsw_ef_construction=64)
    redis_client(settings.broker_url).flushdb()
    store = GalleryStore(milvus_server_uri)
    _drop(store)
    worker = WorkerProcess(settings, tmp / "worker.log")
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, token = register(settings)
    yield settings, service, store, principal, token, app, tmp
    worker.stop()
    app.close()
    _drop(store)
    store.close()


def test_index_then_search_on_a_milvus_server(stack):
    settings, service, store, lab, *_ = stack
    assert not store.is_milvus_lite and "://" in settings.resolved_milvus_uri
    done = service.wait(service.submit_index(FIXTURES, "srv_fixtures", lab, "research").id, timeout_s=600)
    assert done.state == "done", done.errors
    assert done.faces == 15 and done.failed_items == 0
    assert store.count("srv_fixtures") == 15  # what the worker wrote, read by another client at once
    assert store.index_info("srv_fixtures")["type"] == "HNSW"  # 15 faces >= FACEGATE_MILVUS_ANN_MIN_FACES

    search = service.submit_search([str(p) for p in PHOTOS] + [str(MULTIFACE)], "srv_fixtures", lab, "research",
                                   top_k=3, threshold=0.0)
    finished = service.wait(search.id, timeout_s=600)
    assert finished.state == "done", finished.errors
    results = service.probe_results(search.id)
    assert len(results) == len(PHOTOS) + 6
    for probe in results:
        assert probe["matches"][0]["image_path"] == probe["path"]
        assert probe["matches"][0]["similarity"] > 0.99


def test_indexing_twice_on_a_server_keeps_one_row_per_face(stack):
    settings, service, store, lab, *_ = stack
    for _ in range(2):
        done = service.wait(service.submit_index(FIXTURES / "photos", "srv_twice", lab, "research").id, timeout_s=600)
        assert done.state == "done", done.errors
        assert store.count("srv_twice") == len(PHOTOS)


def _faces(store: GalleryStore, key: str) -> int | None:
    try:
        return store.count(key) if store.has_gallery(key) else None
    except GalleryNotFound:  # dropped between the two calls by the worker finishing a rebuild
        return None


def test_the_index_is_shown_and_a_rebuilt_generation_gets_one_too(stack):
    settings, service, store, lab, token, app_celery, tmp = stack
    headers = api_headers(token)
    galleries = GalleryService(service)
    folder = tmp / "galleries" / "archive"
    folder.mkdir(parents=True)
    for photo in [*PHOTOS, MULTIFACE]:
        shutil.copy(photo, folder / photo.name)
    faces = len(PHOTOS) + 6  # at least FACEGATE_MILVUS_ANN_MIN_FACES (10)
    with TestClient(create_app(settings, CeleryTaskQueue(app_celery), collect_every_s=0.5)) as client:
        created = client.post("/v1/galleries", json={"name": "srv_archive", "folder": str(folder),
                                                     "purpose": "research"}, headers=headers)
        assert created.status_code == 201, created.text
        assert created.json()["index"] is None  # only one gallery's view asks the store
        assert client.get("/v1/galleries/srv_archive", headers=headers).json()["index"] is None  # nothing indexed
        job = client.post("/v1/jobs", json={"kind": "index", "gallery": "srv_archive", "purpose": "research"},
                          headers=headers)
        assert wait_for_api_job(client, token, job.json()["id"])["state"] == "done"
        shown = client.get("/v1/galleries/srv_archive", headers=headers).json()
        assert shown["faces"] == faces >= settings.milvus_ann_min_faces
        assert shown["index"] == {"type": "HNSW", "build_params": {"M": 8, "efConstruction": 64},
                                  "search_params": {"ef": 2048}, "metric": "IP", "engine": "milvus-server"}

        env = env_for(settings)
        env["FACEGATE_API_KEY"] = token
        cli = run_cli(["gallery", "show", "srv_archive"], env)
        assert cli.returncode == 0, cli.stderr
        assert "index: HNSW (M 8, efConstruction 64, ef 2048), metric IP, milvus-server" in " ".join(cli.stdout.split())
        as_json = run_cli(["gallery", "show", "srv_archive", "--json"], env)
        assert json.loads(as_json.stdout)["index"]["type"] == "HNSW"

        # A model change rebuilds into generation 1: a new collection, FLAT when created, HNSW once past the size.
        rebuild = galleries.reindex("srv_archive", principal=SYSTEM_PRINCIPAL, worker_model_version="untrained-seed1")
        assert rebuild.params["rebuild_generation"] == 1
        new_worker = WorkerProcess(settings.model_copy(update={"untrained_seed": 1}), tmp / "worker-seed1.log")
        try:
            assert service.wait(rebuild.id, timeout_s=600).state == "done"
            deadline = time.monotonic() + 120
            while _faces(store, "srv_archive") is not None and time.monotonic() < deadline:
                time.sleep(0.5)  # the old generation is erased once the new one is complete
            assert _faces(store, "srv_archive") is None and _faces(store, "srv_archive__g1") == faces
            shown = client.get("/v1/galleries/srv_archive", headers=headers).json()
            assert shown["generation"] == 1 and shown["index"]["type"] == "HNSW"
            after = client.post("/v1/jobs", json={"kind": "search", "gallery": "srv_archive", "purpose": "research",
                                                  "probes": [str(PHOTOS[0])], "threshold": 0.0}, headers=headers)
            answered = wait_for_api_job(client, token, after.json()["id"])
            assert answered["state"] == "done" and answered["model_version"] == "untrained-seed1"
            items = client.get(f"/v1/jobs/{answered['id']}/results", headers=headers).json()["items"]
            assert items[0]["matches"][0]["image_path"] == str(folder / PHOTOS[0].name)
        finally:
            new_worker.stop()
