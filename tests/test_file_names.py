"""Any file name: non-ASCII, quotes, backslashes and line breaks are indexed and erased by name exactly; a name
that is not valid UTF-8 fails as its own item, shown with \\x escapes, and loses nothing else."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from facegate.messages import IndexChunk
from facegate.paths import confined_images, display_path
from index import GalleryStore
from index.store import FaceRecord
from tests.conftest import PHOTOS
from workers.chunks import run_index_chunk

NAMES = ["é ü 中文 😀.jpg", 'quote " and \' .jpg', "back\\slash \\n.jpg", "line\nbreak\r.jpg", "ctl\x01\x7f.jpg"]
NOT_UTF8 = os.fsdecode(b"bad \xff\xfe.jpg")


def test_every_name_is_stored_and_erased_exactly(tmp_path):
    store = GalleryStore(str(tmp_path / "milvus.db"))
    try:
        store.ensure_gallery("names", "untrained:0", 8)
        vector = np.ones(8, dtype=np.float32)
        records = [FaceRecord("names", f"/g/{name}", f"{n:064x}", 0, [0, 0, 1, 1], 0.99, [[0, 0]] * 5,
                              "untrained:0", vector) for n, name in enumerate(NAMES)]
        assert store.upsert_faces(records) == len(NAMES)
        for left, name in zip(range(len(NAMES) - 1, -1, -1), NAMES):
            assert store.delete_image("names", image_path=f"/g/{name}") == 1, name
            assert store.count("names") == left
    finally:
        store.close()


def test_display_path_escapes_only_what_is_not_utf8():
    assert display_path("/g/é.jpg") == "/g/é.jpg"
    assert display_path("/g/" + NOT_UTF8) == "/g/bad \\xff\\xfe.jpg"


def test_a_name_that_is_not_utf8_fails_alone_and_the_rest_is_indexed(tmp_path, pipeline):
    gallery = tmp_path / "g"
    gallery.mkdir()
    for photo, name in zip(PHOTOS, ["é ü 中文.jpg", 'quote " \\.jpg', NOT_UTF8]):
        shutil.copy(photo, os.path.join(gallery, name))
    paths = [str(p) for p in confined_images([gallery], [tmp_path])]
    assert len(paths) == 3
    store = GalleryStore(str(tmp_path / "milvus.db"))
    try:
        result = run_index_chunk(IndexChunk(job_id="j", chunk_no=0, gallery="g", paths=paths), pipeline, store,
                                 [tmp_path])
        by_name = {display_path(o.path).rsplit("/", 1)[1]: o for o in result.items}
        assert by_name["é ü 中文.jpg"].faces == 1 and by_name['quote " \\.jpg'].faces == 1
        bad = by_name["bad \\xff\\xfe.jpg"]
        assert not bad.ok and "not valid UTF-8" in bad.reason
        assert store.count("g") == 2 == sum(o.faces for o in result.items)
        assert store.delete_image("g", image_path=str(gallery / "é ü 中文.jpg")) == 1
        assert store.count("g") == 1
    finally:
        store.close()


@pytest.mark.slow
def test_a_job_over_odd_names_ends_with_what_the_store_holds(tmp_path, redis_url):
    from facegate.queue import make_celery
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.service import JobService
    from tests.conftest import make_settings, register
    from tests.e2e import MilvusLiteServer, WorkerProcess

    milvus = MilvusLiteServer(tmp_path / "milvus")
    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=milvus.uri)
    gallery = tmp_path / "galleries" / "odd"
    gallery.mkdir(parents=True)
    for photo, name in zip(PHOTOS, ["é ü 中文.jpg", "line\nbreak.jpg", NOT_UTF8, "plain.jpg"]):
        shutil.copy(photo, os.path.join(gallery, name))
    app = make_celery(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        service = JobService(settings, CeleryTaskQueue(app))
        principal, _ = register(settings)
        job = service.wait(service.submit_index(gallery, "odd", principal, "research").id, timeout_s=600)
        assert job.state == "partly_failed" and job.total_items == 4 and job.failed_items == 1
        assert [e["path"] for e in job.errors] == [str(gallery / "bad \\xff\\xfe.jpg")]
        assert "not valid UTF-8" in job.errors[0]["reason"]
        store = GalleryStore(milvus.uri)
        try:
            assert store.count("odd") == job.faces == 3
        finally:
            store.close()
    finally:
        worker.stop()
        app.close()
        milvus.stop()
