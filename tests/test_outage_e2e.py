"""A store outage is waited out, not failed: the vector store stops for 10 s in the middle of an index job
(a real worker, a real `milvus-lite server` restarted on the same data), and no item fails."""

from __future__ import annotations

import time

import pytest

from facegate.queue import make_celery
from facegate.vocabulary import JobState
from index import GalleryStore
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from tests.conftest import PHOTOS, make_settings, register
from tests.e2e import MilvusLiteServer, WorkerProcess

pytestmark = pytest.mark.slow


def _images(folder, copies: int = 4) -> int:
    """Distinct images (each photo at several sizes), so that the job outlasts the first chunk."""
    from PIL import Image

    folder.mkdir(parents=True)
    for photo in PHOTOS:
        with Image.open(photo) as image:
            for k in range(copies):
                scale = 1 - 0.05 * k
                image.resize((int(image.width * scale), int(image.height * scale))).save(folder / f"{photo.stem}-{k}.jpg")
    return len(PHOTOS) * copies


def test_a_ten_second_store_outage_fails_no_item(tmp_path, redis_url):
    milvus = MilvusLiteServer(tmp_path / "milvus")
    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=milvus.uri, index_chunk_size=2)
    images = _images(tmp_path / "galleries" / "outage")
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, _ = register(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        job = service.submit_index(tmp_path / "galleries" / "outage", "outage", principal, "research")
        deadline = time.monotonic() + 300
        while service.refresh(job.id).done_items < 2:  # the store has been written to: the outage is mid-job
            assert time.monotonic() < deadline, "the first chunk never finished"
            time.sleep(0.2)
        milvus.stop()
        time.sleep(10)
        milvus.start()

        done = service.wait(job.id, timeout_s=900)
        assert done.state == JobState.DONE, (done.error, done.errors[:3])
        assert done.failed_items == 0 and done.done_items == images
        store = GalleryStore(milvus.uri)
        try:
            assert store.count("outage") == done.faces >= images
        finally:
            store.close()
        assert "retry" in (tmp_path / "worker.log").read_text().lower()  # it was waited out, not lucky
    finally:
        worker.stop()
        app.close()
        milvus.stop()
