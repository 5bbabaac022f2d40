"""Index and search end to end against a real Milvus standalone server: real Redis, a real worker process."""

from __future__ import annotations

import pytest

from facegate.queue import make_celery
from index import GalleryStore
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from tests.conftest import FIXTURES, MULTIFACE, PHOTOS, make_settings, redis_client, register
from tests.e2e import WorkerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server_url, milvus_server_uri):
    tmp = tmp_path_factory.mktemp("e2e-server")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/15", milvus_uri=milvus_server_uri)
    redis_client(settings.broker_url).flushdb()
    store = GalleryStore(milvus_server_uri)
    for gallery in ("srv_fixtures", "srv_twice"):
        store.drop_gallery(gallery)  # a server given over to the tests may hold an earlier run's
    worker = WorkerProcess(settings, tmp / "worker.log")
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, _ = register(settings)
    yield settings, service, store, principal
    worker.stop()
    app.close()
    for gallery in ("srv_fixtures", "srv_twice"):
        store.drop_gallery(gallery)
    store.close()


def test_index_then_search_on_a_milvus_server(stack):
    settings, service, store, lab = stack
    assert not store.is_milvus_lite and "://" in settings.resolved_milvus_uri
    done = service.wait(service.submit_index(FIXTURES, "srv_fixtures", lab, "research").id, timeout_s=600)
    assert done.state == "done", done.errors
    assert done.faces == 15 and done.failed_items == 0
    assert store.count("srv_fixtures") == 15  # what the worker wrote, read by another client at once

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
    settings, service, store, lab = stack
    for _ in range(2):
        done = service.wait(service.submit_index(FIXTURES / "photos", "srv_twice", lab, "research").id, timeout_s=600)
        assert done.state == "done", done.errors
        assert store.count("srv_twice") == len(PHOTOS)
