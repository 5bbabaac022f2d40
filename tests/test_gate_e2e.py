"""The policy gate at both ends, through real Redis and a real worker process; the audit trail; keys."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time

import pytest
import yaml
from sqlalchemy import text

from facegate.db import engine_for
from facegate.messages import work_binding, INDEX_CHUNK_TASK, SEARCH_CHUNK_TASK, IndexChunk, SearchChunk, model_queue
from facegate.queue import make_celery
from index import GalleryStore
from policy import TicketClaims, sign_ticket
from scheduler.access import AccessRefused
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobDenied, JobService
from tests.conftest import FIXTURES, PHOTOS, add_user, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, env_for, run_cli

DEFAULT_REGISTRY = yaml.safe_load(open(__import__("policy").__path__[0] + "/default_registry.yaml"))


def _service(settings):
    app = make_celery(settings)
    return JobService(settings, CeleryTaskQueue(app)), app


def _photos_of_its_own(settings, name: str):
    """The fixture photos in a folder of their own. In a module sharing one database, the fixtures folder is
    another organisation's gallery once indexed (an index job records its folder, and the folder of one
    organisation's gallery is not another's to read)."""
    folder = settings.gallery_roots[1] / name
    folder.mkdir(exist_ok=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    return folder


def _ticket(settings, job_id, capability="index", purpose="research", org="university-lab-example", ttl=600,
            secret=None):
    claims = TicketClaims(job_id=job_id, organisation_id=org, capability=capability, purpose=purpose,
                          registry_hash="r", expires_at=int(time.time()) + ttl)
    return sign_ticket(claims, secret or settings.resolved_ticket_secret())


def test_denied_job_never_reaches_the_broker_and_says_why(tmp_path, redis_url):
    settings = make_settings(tmp_path, broker_url=redis_url)
    service, app = _service(settings)
    police, _ = register(settings, "city-police-example")
    with pytest.raises(JobDenied) as denied:
        service.submit_index(FIXTURES / "photos", "pol", police, "criminal-investigation")
    view = denied.value.view
    assert view.state == "refused" and "rekognition-police-moratorium" in view.decision_rule_ids
    assert "moratorium" in view.decision_reason and "city-police-example" in view.decision_reason
    assert redis_client(redis_url).llen("facegate") == 0
    # The refusal is stored, readable later, and audited.
    assert service.get(view.id).decision_reason == view.decision_reason
    events = [r.event for r in service.audit.rows(job_id=view.id)]
    assert events == ["policy.decision", "job.refused"]
    # The control: the same request by an allowed organisation is queued.
    lab, _ = register(settings)
    service.submit_index(FIXTURES / "photos", "lab", lab, "research")
    assert redis_client(redis_url).llen("facegate") == 1
    app.close()


def test_search_below_the_purpose_floor_is_refused_naming_the_floor(tmp_path, redis_url):
    settings = make_settings(tmp_path, broker_url=redis_url)
    service, app = _service(settings)
    archive, _ = register(settings, "photo-archive-example")
    # A gallery whose model version the scheduler knows (as after an index job).
    from facegate.db import session_scope
    from scheduler.models import Gallery

    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="archive", owner="photo-archive-example", model_version="untrained-seed0"))
    with pytest.raises(JobDenied) as denied:
        service.submit_search([str(PHOTOS[0])], "archive", archive, "photo-library", threshold=0.5)
    reason = denied.value.view.decision_reason
    assert "0.5" in reason and "0.8" in reason and "untrained-seed0" in reason
    assert redis_client(redis_url).llen("facegate") == 0
    # No threshold given: the floor itself is used, and the job is queued.
    job = service.submit_search([str(PHOTOS[0])], "archive", archive, "photo-library")
    assert job.params["threshold"] == pytest.approx(0.8)
    # Searches go to the workers of the gallery's model version.
    assert redis_client(redis_url).llen(model_queue("untrained-seed0")) == 1
    app.close()


@pytest.mark.slow
def test_moratorium_revision_while_queued_is_refused_by_the_worker(tmp_path, redis_url):
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(yaml.safe_dump(DEFAULT_REGISTRY, sort_keys=False))
    milvus_file = tmp_path / "milvus.db"
    settings = make_settings(tmp_path, broker_url=redis_url, policy_registry=registry_file,
                             milvus_uri=str(milvus_file))
    service, app = _service(settings)
    lab, _ = register(settings)
    job = service.submit_index(FIXTURES / "photos", "lab", lab, "research")
    assert job.state == "queued"

    # While it waits, a new moratorium on research use takes effect today.
    today = dt.date.today().isoformat()
    revised = dict(DEFAULT_REGISTRY)
    revised["moratoria"] = DEFAULT_REGISTRY["moratoria"] + [{
        "id": "research-pause", "title": "Pause on research use", "covers_sectors": ["research"],
        "covers_organisations": [], "capabilities": ["index", "search", "compare"], "start": today, "end": None,
        "history": [{"date": today, "change": "Research use paused.", "start": today, "end": None}]}]
    registry_file.write_text(yaml.safe_dump(revised, sort_keys=False))

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        done = service.wait(job.id, timeout_s=300)
    finally:
        worker.stop()
    assert done.state == "refused_at_execution"
    assert "research-pause" in done.error
    events = [r.event for r in service.audit.rows(job_id=job.id)]
    assert "job.refused_at_execution" in events
    store = GalleryStore(str(milvus_file))
    assert not store.has_gallery("lab")  # nothing was written
    store.close()
    app.close()


@pytest.fixture(scope="module")
def gated_worker(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("gate")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/13", milvus_uri=milvus.uri)
    redis_client(settings.broker_url).flushdb()
    worker = WorkerProcess(settings, tmp / "worker.log")
    service, app = _service(settings)
    yield settings, service, app
    worker.stop()
    app.close()
    milvus.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "forged", "expired", "other-job", "wrong-capability"])
def test_task_pushed_straight_into_the_broker_without_a_valid_ticket_is_refused(gated_worker, kind):
    settings, _, app = gated_worker
    job_id = f"pushed-{kind}"
    ticket = {
        "missing": None,
        "forged": _ticket(settings, job_id, secret="not-the-scheduler-secret"),
        "expired": _ticket(settings, job_id, ttl=-5),
        "other-job": _ticket(settings, "some-other-job"),
        "wrong-capability": _ticket(settings, job_id, capability="search"),
    }[kind]
    message = IndexChunk(job_id=job_id, chunk_no=0, gallery=f"pushed_{kind.replace('-', '_')}",
                         paths=[str(PHOTOS[0])], ticket=ticket)
    result = app.send_task(INDEX_CHUNK_TASK, args=[message.model_dump(mode="json")]).get(timeout=300)
    assert result["refused"] and "refused at execution" in result["refused"]
    assert result["items"] == []
    store = GalleryStore(settings.milvus_uri)
    assert not store.has_gallery(message.gallery)  # nothing written
    store.close()


@pytest.mark.slow
def test_worker_checks_the_threshold_floor_again(gated_worker):
    settings, service, app = gated_worker
    archive, _ = register(settings, "photo-archive-example")
    done = service.wait(service.submit_index(FIXTURES / "photos", "floors", archive, "photo-library").id,
                        timeout_s=300)
    assert done.state == "done"
    # A ticket for an allowed search, but a threshold under the floor written straight into the message.
    job_id = "low-threshold"
    # done.gallery is the store's key for this owner's "floors"; the ticket binds exactly this message's work.
    message = SearchChunk(job_id=job_id, chunk_no=0, gallery=done.gallery, paths=[str(PHOTOS[0])], top_k=3,
                          threshold=0.1, ticket="")
    claims = TicketClaims(organisation_id="photo-archive-example", capability="search", purpose="photo-library",
                          registry_hash="r", expires_at=int(time.time()) + 600, **work_binding(message))
    message = message.model_copy(update={"ticket": sign_ticket(claims, settings.resolved_ticket_secret())})
    result = app.send_task(SEARCH_CHUNK_TASK, args=[message.model_dump(mode="json")]).get(timeout=300)
    assert result["refused"] and "0.8" in result["refused"] and result["probes"] == []


@pytest.mark.slow
def test_review_required_matches_are_unconfirmed_until_a_reviewer_confirms(gated_worker):
    settings, service, _ = gated_worker
    icmec, _ = register(settings, "icmec")
    cases = _photos_of_its_own(settings, "icmec-cases")
    indexed = service.wait(service.submit_index(cases, "icmec_cases", icmec, "missing-children").id,
                           timeout_s=300)
    assert indexed.state == "done"
    job = service.wait(service.submit_search([str(cases / PHOTOS[1].name)], "icmec_cases", icmec,
                                             "missing-children").id, timeout_s=300)
    assert job.state == "done" and job.review_required
    probe = service.probe_results(job.id)[0]
    assert probe["matches"] and all(m["review"] == "unconfirmed" for m in probe["matches"])
    match = probe["matches"][0]
    # A machine key never reviews what needs a person; a user with the reviewer role does, as itself.
    with pytest.raises(AccessRefused, match="requires human review"):
        service.review_match(job.id, probe["id"], match["face_id"], confirmed=True, principal=icmec)
    analyst, _ = add_user(settings, "icmec", "analyst-7", "reviewer")
    second, _ = add_user(settings, "icmec", "analyst-9", "reviewer")
    service.review_match(job.id, probe["id"], match["face_id"], confirmed=True, principal=analyst)
    once = service.probe_results(job.id)[0]["matches"][0]
    # Missing children: two different reviewers of the organisation confirm before anyone acts on it.
    assert once["review"] == "unconfirmed" and once["confirmations"] == 1 and once["reviewers_required"] == 2
    service.review_match(job.id, probe["id"], match["face_id"], confirmed=True, principal=second)
    reviewed = service.probe_results(job.id)[0]["matches"][0]
    assert reviewed["review"] == "confirmed" and reviewed["reviewed_by"] == ["analyst-7", "analyst-9"]
    rows = service.audit.rows(job_id=job.id, event="review.confirmed")
    assert [r.detail["reviewer"] for r in rows] == ["analyst-7", "analyst-9"]
    # Start and end of the search are in the audit log with its numbers.
    finished = service.audit.rows(job_id=job.id, event="job.finished")[0].detail
    assert finished["probe_faces"] == 1 and finished["matches"] == len(probe["matches"])
    assert finished["model_version"] == "untrained-seed0"


def test_audit_verify_catches_a_changed_row(tmp_path):
    settings = make_settings(tmp_path)
    env = env_for(settings)
    created = run_cli(["key", "create", "university-lab-example", "--json"], env)
    assert created.returncode == 2 and "university-lab-example" in created.stderr  # not recorded yet
    assert run_cli(["org", "add", "university-lab-example", "--sector", "research"], env).returncode == 0
    token = json.loads(run_cli(["key", "create", "university-lab-example", "--json"], env).stdout)["token"]
    run_cli(["policy", "check", "city-police-example", "-c", "search", "-p", "criminal-investigation"], env)
    ok = run_cli(["audit", "verify"], env)
    assert ok.returncode == 0 and "intact" in ok.stdout
    with engine_for(settings.resolved_database_url).begin() as conn:
        conn.execute(text("UPDATE audit_log SET organisation_id = 'someone-else' WHERE seq = 1"))
    broken = run_cli(["audit", "verify"], env)
    assert broken.returncode == 1 and "row 1" in broken.stdout
    exported = run_cli(["audit", "export"], env)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert lines[0]["event"] == "key.created" and all("row_hash" in line for line in lines)
    assert token not in exported.stdout  # the secret is never logged


def test_revoked_key_is_refused(tmp_path):
    settings = make_settings(tmp_path)
    _, token = register(settings)
    env = env_for(settings, FACEGATE_API_KEY=token)
    assert run_cli(["jobs"], env).returncode == 0
    key_id = token.split("_")[1]
    assert run_cli(["key", "revoke", key_id], env).returncode == 0
    refused = run_cli(["jobs"], env)
    assert refused.returncode == 3 and "revoked" in refused.stderr


def test_policy_check_explains_its_decision(tmp_path):
    env = env_for(make_settings(tmp_path))
    before = run_cli(["policy", "check", "city-police-example", "-c", "search", "-p", "criminal-investigation",
                      "--at", "2020-06-09"], env)
    after = run_cli(["policy", "check", "city-police-example", "-c", "search", "-p", "criminal-investigation",
                     "--at", "2021-07-01", "--json"], env)
    assert before.returncode == 0 and "ALLOWED" in before.stdout
    assert after.returncode == 3
    decision = json.loads(after.stdout)
    assert not decision["allowed"] and decision["rule_ids"] == ["rekognition-police-moratorium"]
    shown = run_cli(["policy", "show"], env)
    assert "2021-05-18" in shown.stdout and "child-safety-" in shown.stdout


@pytest.mark.slow
def test_matches_carry_the_false_match_rate_of_their_similarity(gated_worker):
    import numpy as np

    from facegate.calibration import Calibration, CalibrationStore

    settings, service, _ = gated_worker
    lab, _ = register(settings)
    # Impostor scores spread over [0, 0.995]: a calibration for the workers' model version.
    calibration = Calibration.from_impostor_scores(np.linspace(0.0, 0.995, 2000), model_version="untrained-seed0",
                                                   dataset="test")
    path = CalibrationStore(settings.resolved_calibration_dir).put(calibration)
    try:
        photos = _photos_of_its_own(settings, "fmr-photos")
        service.wait(service.submit_index(photos, "fmr", lab, "research").id, timeout_s=300)
        job = service.wait(service.submit_search([str(photos / PHOTOS[0].name)], "fmr", lab, "research",
                                                 threshold=0.0).id, timeout_s=300)
        matches = service.probe_results(job.id)[0]["matches"]
        for match in matches:
            expected = calibration.fmr_at(match["similarity"])
            assert match["false_match_rate"] == pytest.approx(expected.fmr)
            assert match["false_match_rate_below_limit"] == expected.below_resolution_limit
        assert matches[0]["false_match_rate_below_limit"]  # the photo itself scores above every impostor
    finally:
        path.unlink()
