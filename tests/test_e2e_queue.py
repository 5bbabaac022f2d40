"""End to end through real Redis and a real `facegate worker` process."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from facegate.messages import INDEX_CHUNK_TASK, IndexChunk, work_binding
from facegate.queue import make_celery
from index import GalleryStore
from policy import TicketClaims, sign_ticket
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobRefused, JobService
from tests.conftest import FIXTURES, MULTIFACE, PHOTOS, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, env_for, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("e2e")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/14", milvus_uri=milvus.uri)
    redis_client(settings.broker_url).flushdb()
    worker = WorkerProcess(settings, tmp / "worker.log")
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, token = register(settings)
    yield settings, service, app, tmp, principal, token
    worker.stop()
    app.close()
    milvus.stop()


def _count(settings, gallery):
    store = GalleryStore(settings.milvus_uri)
    try:
        return store.count(gallery)
    finally:
        store.close()


def test_index_then_search_through_the_queue(stack):
    settings, service, _, _, lab, _ = stack
    job = service.submit_index(FIXTURES, "fixtures", lab, "research")
    assert job.state == "queued" and job.total_items == 11
    done = service.wait(job.id, timeout_s=600)
    assert done.state == "done", done.errors
    assert done.faces == 15 and done.failed_items == 0 and done.untrained
    assert _count(settings, "fixtures") == 15

    search = service.submit_search([str(p) for p in PHOTOS] + [str(MULTIFACE)], "fixtures", lab, "research", top_k=3,
                                   threshold=0.0)
    finished = service.wait(search.id, timeout_s=600)
    assert finished.state == "done"
    results = service.probe_results(search.id)
    assert len(results) == len(PHOTOS) + 6
    for probe in results:
        assert probe["matches"][0]["image_path"] == probe["path"]
        assert probe["matches"][0]["similarity"] > 0.99


def test_index_twice_and_a_chunk_delivered_twice_keep_the_count(stack):
    settings, service, app, _, lab, _ = stack
    first = service.wait(service.submit_index(FIXTURES / "photos", "twice", lab, "research").id, timeout_s=600)
    count = _count(settings, "twice")
    assert first.state == "done" and count == len(PHOTOS)
    second = service.wait(service.submit_index(FIXTURES / "photos", "twice", lab, "research").id, timeout_s=600)
    assert second.state == "done" and _count(settings, "twice") == count

    # The same chunk as a broker would redeliver it: the message of a real job, run twice more.
    job = service.submit_index(FIXTURES / "photos", "twice", lab, "research")
    service.wait(job.id, timeout_s=600)
    chunk = IndexChunk(job_id=job.id, chunk_no=0, gallery="twice", paths=[str(p) for p in PHOTOS])
    chunk.ticket = sign_ticket(TicketClaims(organisation_id=lab.organisation_id, capability="index",
                                            purpose="research", registry_hash="x",
                                            expires_at=int(time.time()) + 600, **work_binding(chunk)),
                               settings.resolved_ticket_secret())
    message = chunk.model_dump(mode="json")
    results = [app.send_task(INDEX_CHUNK_TASK, args=[message], task_id=f"redelivery-{n}") for n in range(2)]
    for r in results:
        assert r.get(timeout=600)["refused"] is None
    assert _count(settings, "twice") == count


def test_bad_files_make_the_job_partly_failed_with_reasons(stack):
    settings, service, _, tmp, lab, _ = stack
    gallery = tmp / "galleries" / "mixed"
    gallery.mkdir(parents=True)
    shutil.copy(PHOTOS[0], gallery / "good.jpg")
    (gallery / "broken.jpg").write_bytes(PHOTOS[1].read_bytes()[:5000])
    (gallery / "notes.jpg").write_text("not an image")
    done = service.wait(service.submit_index(gallery, "mixed", lab, "research").id, timeout_s=600)
    assert done.state == "partly_failed"
    assert done.total_items == 3 and done.failed_items == 2 and done.faces == 1
    reasons = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in done.errors}
    assert set(reasons) == {"broken.jpg", "notes.jpg"}
    assert "corrupt" in reasons["broken.jpg"] and "not an image" in reasons["notes.jpg"]


def test_cli_runs_a_job_against_the_real_worker(stack):
    settings, _, _, _, _, token = stack
    env = env_for(settings)
    env["FACEGATE_API_KEY"] = token
    index = run_cli(["index", str(FIXTURES / "photos"), "--gallery", "cli", "--purpose", "research", "--json"], env)
    assert index.returncode == 0, index.stderr
    job = json.loads(index.stdout)
    assert job["state"] == "done" and job["faces"] == len(PHOTOS)
    assert job["untrained"] and "UNTRAINED" in job["warning"]

    search = run_cli(["search", str(PHOTOS[0]), "--gallery", "cli", "--top-k", "2", "--purpose", "research",
                      "--threshold", "0", "--json"], env)
    assert search.returncode == 0, search.stderr
    payload = json.loads(search.stdout)
    assert payload["results"][0]["matches"][0]["image_path"] == str(PHOTOS[0])

    listing = run_cli(["jobs", "--json"], env)
    assert {j["id"] for j in json.loads(listing.stdout)} >= {job["id"], payload["job"]["id"]}


def test_a_gallery_made_by_facegate_index_can_be_reindexed(stack):
    """`facegate index FOLDER` then `facegate reindex`: the index job recorded its folder on the gallery."""
    settings, _, _, tmp, _, token = stack
    env = env_for(settings, FACEGATE_API_KEY=token)
    folder = tmp / "galleries" / "adhoc"
    folder.mkdir(parents=True)
    for photo in PHOTOS[:3]:
        shutil.copy(photo, folder / photo.name)
    index = run_cli(["index", str(folder), "--gallery", "adhoc", "--purpose", "research", "--json"], env)
    assert index.returncode == 0, index.stderr
    assert json.loads(index.stdout)["faces"] == 3
    shown = json.loads(run_cli(["gallery", "show", "adhoc", "--json"], env).stdout)
    assert shown["folder"] == str(folder.resolve())
    shutil.copy(PHOTOS[3], folder / PHOTOS[3].name)  # new
    (folder / PHOTOS[0].name).unlink()  # deleted
    reindex = run_cli(["reindex", "adhoc", "--json"], env)
    assert reindex.returncode == 0, reindex.stderr
    job = json.loads(reindex.stdout)
    assert job["state"] == "done" and (job["params"]["new"], job["params"]["deleted"]) == (1, 1)
    assert _count(settings, "adhoc") == 3
    again = json.loads(run_cli(["reindex", "adhoc", "--json"], env).stdout)
    assert (again["params"]["new"], again["params"]["changed"], again["params"]["deleted"]) == (0, 0, 0)
    assert _count(settings, "adhoc") == 3


def test_refused_path_never_reaches_the_broker(tmp_path, redis_url):
    """No worker here: what is submitted stays in the queue, so its length shows what was sent."""
    settings = make_settings(tmp_path, broker_url=redis_url)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    lab, _ = register(settings)
    queue = redis_client(redis_url)
    outside = tmp_path / "galleries" / "escape"
    outside.symlink_to(tmp_path.parent)
    with pytest.raises(JobRefused, match="outside the gallery roots"):
        service.submit_index(FIXTURES / ".." / "..", "g", lab, "research")
    with pytest.raises(JobRefused, match="outside the gallery roots"):
        service.submit_index(outside, "g", lab, "research")
    with pytest.raises(JobRefused, match="outside the gallery roots"):
        service.submit_search([str(FIXTURES / "photos" / ".." / ".." / ".." / "README.md")], "g", lab, "research")
    assert queue.llen("facegate") == 0
    assert service.list_jobs() == []
    # The control: an allowed job does reach the broker, one message per chunk.
    job = service.submit_index(FIXTURES, "g", lab, "research")
    assert queue.llen("facegate") == 1 and job.state == "queued"
    app.close()
