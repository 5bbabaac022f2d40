"""Retention: the pure schedule (owner, purpose, default, legal maximum), the owner's period and the gallery's
stated schedule, and the sweep with the clock moved forward: expired galleries, uploads and results erased
exactly (vector counts), audited; unexpired ones stay."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone

import pytest

from policy import load_registry
from policy.retention import RetentionPeriods, check_owner_period, schedule
from tests.conftest import ALIGNED, FIXTURES, PHOTOS, make_settings, register

REGISTRY = load_registry()
POLICY = REGISTRY.retention
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_the_owner_then_the_purpose_then_the_default_and_never_past_the_legal_maximum():
    owner = schedule("gallery", T0, policy=POLICY, purpose_id="research", purpose_periods=None, owner_days=30)
    assert owner.basis == "owner" and owner.erase_at == T0 + timedelta(days=30) and "owner's period" in owner.reason
    assert not owner.due(T0 + timedelta(days=29, hours=23)) and owner.due(T0 + timedelta(days=30))
    periods = RetentionPeriods(results_days=180, uploads_days=7)
    purpose = schedule("results", T0, policy=POLICY, purpose_id="criminal-investigation", purpose_periods=periods)
    assert purpose.basis == "purpose" and purpose.days == 180
    default = schedule("results", T0, policy=POLICY, purpose_id="research", purpose_periods=None)
    assert default.basis == "default" and default.days == 365
    legal = schedule("gallery", T0, policy=POLICY, purpose_id="research", purpose_periods=None)
    assert legal.basis == "legal maximum" and legal.days == 1095 and "BIPA" in legal.reason
    # A period longer than the law allows is not honoured: the legal maximum decides.
    capped = schedule("gallery", T0, policy=POLICY, purpose_id="x", purpose_periods=RetentionPeriods(gallery_days=5000))
    assert capped.basis == "legal maximum" and capped.days == 1095
    assert check_owner_period(1095, POLICY) is None
    assert "longer than the legal maximum of 1095 days" in check_owner_period(1096, POLICY)
    assert "at least 1" in check_owner_period(0, POLICY)


def test_gallery_show_and_the_api_state_the_schedule_and_refuse_a_period_past_the_maximum(tmp_path):
    from fastapi.testclient import TestClient

    from facegate.db import session_scope
    from scheduler.api import create_app
    from scheduler.galleries import GalleryService
    from scheduler.models import Gallery
    from scheduler.retention import RetentionService
    from scheduler.service import JobRefused, JobService
    from tests.e2e import api_headers, run_cli, env_for

    settings = make_settings(tmp_path)
    lab, token = register(settings)
    indexed = datetime.now(timezone.utc) - timedelta(days=10)
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="lab", owner=lab.organisation_id, purpose="research", last_indexed_at=indexed,
                      created_at=indexed - timedelta(days=1)))
    galleries = GalleryService(JobService(settings))
    shown = galleries.show(lab, "lab").retention
    assert shown["basis"] == "legal maximum" and shown["erase_at"] == indexed + timedelta(days=1095)
    due = RetentionService(galleries).set_gallery_period(lab, "lab", 30)
    assert due.erase_at == indexed + timedelta(days=30)
    with pytest.raises(JobRefused, match="longer than the legal maximum"):
        RetentionService(galleries).set_gallery_period(lab, "lab", 2000)
    assert galleries.jobs.audit.rows(event="retention.period_set")[0].detail["days"] == 30

    client = TestClient(create_app(settings, None))
    body = client.get("/v1/galleries/lab", headers=api_headers(token)).json()
    assert body["retention"]["basis"] == "owner" and body["retention"]["days"] == 30
    refused = client.put("/v1/galleries/lab/retention", json={"days": 5000}, headers=api_headers(token))
    assert refused.status_code == 422 and "legal maximum" in refused.json()["detail"]
    cleared = client.put("/v1/galleries/lab/retention", json={"days": None}, headers=api_headers(token)).json()
    assert cleared["retention"]["basis"] == "legal maximum"
    cli = run_cli(["gallery", "show", "lab"], env_for(settings, FACEGATE_API_KEY=token), timeout=120)
    assert cli.returncode == 0 and "retention" in cli.stdout and "legal maximum" in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.slow
def test_sweep_with_the_clock_moved_forward_erases_exactly_what_expired(tmp_path, redis_url):
    from facegate.queue import make_celery
    from index import GalleryStore
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.galleries import GalleryService
    from scheduler.retention import RetentionService
    from scheduler.service import JobService
    from tests.e2e import MilvusLiteServer, WorkerProcess

    milvus = MilvusLiteServer(tmp_path / "milvus")
    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=milvus.uri, upload_retention_days=7)
    app = make_celery(settings)
    jobs = JobService(settings, CeleryTaskQueue(app))
    galleries = GalleryService(jobs)
    retention = RetentionService(galleries)
    lab, _ = register(settings)
    store = GalleryStore(milvus.uri)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        short = jobs.wait(jobs.submit_index(FIXTURES / "aligned", "short", lab, "research").id, timeout_s=300)
        long = jobs.wait(jobs.submit_index(FIXTURES / "photos", "long", lab, "research").id, timeout_s=300)
        assert short.state == long.state == "done"
        retention.set_gallery_period(lab, "short", 30)
        retention.set_gallery_period(lab, "long", 400)
        counts = {"short": store.count(short.gallery), "long": store.count(long.gallery)}
        assert counts == {"short": len(ALIGNED), "long": len(PHOTOS)}
        # A search with an uploaded probe, kept 7 days after the job (FACEGATE_UPLOAD_RETENTION_DAYS).
        folder = settings.uploads_for(lab.organisation_id) / "upload1"
        folder.mkdir(parents=True)
        shutil.copy(PHOTOS[0], folder / "probe.jpg")
        searched = jobs.wait(jobs.submit_search([str(folder / "probe.jpg")], "long", lab, "research",
                                                upload_folder=folder).id, timeout_s=300)
        assert searched.state == "done" and folder.exists() and jobs.count_probe_results(searched.id) == 1

        now = datetime.now(timezone.utc)
        nothing = retention.run(now)
        assert (nothing.galleries, nothing.uploads, nothing.results) == ([], [], [])
        preview = retention.run(now + timedelta(days=31), dry_run=True)
        assert [g["gallery"] for g in preview.galleries] == [short.gallery] and store.count(short.gallery) == 5

        month = retention.run(now + timedelta(days=31))
        assert [g["gallery"] for g in month.galleries] == [short.gallery]
        assert [u["job"] for u in month.uploads] == [searched.id] and month.results == []
        erased = jobs.wait(month.galleries[0]["erase_job"], timeout_s=300)
        assert erased.state == "done"
        assert not store.has_gallery(short.gallery)  # every vector of the expired gallery
        assert store.count(long.gallery) == counts["long"]  # not one of the other's
        assert not folder.exists()
        audited = jobs.audit.rows(event="retention.gallery_erased")[0].detail
        assert audited["faces"] == counts["short"] and audited["basis"] == "owner"
        assert jobs.audit.rows(job_id=erased.id, event="erasure")[0].detail["faces_removed"] == counts["short"]
        assert jobs.audit.rows(job_id=searched.id, event="uploads.removed")[-1].detail["why"] == "retention"
        assert jobs.count_probe_results(searched.id) == 1  # results are kept 365 days

        year = retention.run(now + timedelta(days=366))
        assert year.galleries == [] and [r["job"] for r in year.results] == [searched.id]
        assert year.results[0]["probe_faces"] == 1 and jobs.count_probe_results(searched.id) == 0
        assert store.count(long.gallery) == counts["long"]  # 400 days: not yet

        later = retention.run(now + timedelta(days=401))
        assert [g["gallery"] for g in later.galleries] == [long.gallery]
        assert jobs.wait(later.galleries[0]["erase_job"], timeout_s=300).state == "done"
        assert not store.has_gallery(long.gallery)
        assert [r.detail["galleries"] for r in jobs.audit.rows(event="retention.run")] == [0, 1, 0, 1]
    finally:
        store.close()
        worker.stop()
        app.close()
        milvus.stop()


def test_retention_run_dry_run_says_what_a_later_date_would_erase_and_refuses_a_real_run_at_a_date(tmp_path):
    from facegate.db import session_scope
    from scheduler.models import Gallery
    from tests.e2e import env_for, run_cli

    settings = make_settings(tmp_path)
    lab, _ = register(settings)
    indexed = datetime.now(timezone.utc) - timedelta(days=10)
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="old", owner=lab.organisation_id, purpose="research", last_indexed_at=indexed,
                      created_at=indexed, retention_days=20))
    env = env_for(settings)
    soon = run_cli(["retention", "run", "--dry-run", "--json"], env, timeout=120)
    assert soon.returncode == 0, soon.stderr
    import json

    assert json.loads(soon.stdout)["galleries"] == []
    later = run_cli(["retention", "run", "--dry-run", "--at", (indexed + timedelta(days=21)).date().isoformat()], env,
                    timeout=120)
    assert later.returncode == 0 and "1 galleries" in later.stdout and "owner's period of 20 days" in later.stdout
    refused = run_cli(["retention", "run", "--at", "2099-01-01"], env, timeout=120)
    assert refused.returncode != 0 and "nothing is erased before its date" in refused.stdout + refused.stderr
