"""The console over HTTP (no browser, no worker: results recorded as a fold leaves them): sign-in, the session
cookie, CSRF on every form, sign-out and expiry, pages of one organisation only, review in place, audit."""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.vocabulary import JobKind, JobState
from scheduler.api import create_app
from scheduler.console.sessions import COOKIE, ConsoleSessionRecord
from scheduler.models import Gallery, Job, MatchReview, ProbeResult, utcnow
from tests.conftest import PHOTOS, add_user, make_settings, register

ICMEC, OTHER = "icmec", "photo-archive-example"


@pytest.fixture
def console(tmp_path):
    settings = make_settings(tmp_path)
    folder = tmp_path / "galleries" / "cases"
    folder.mkdir(parents=True)
    image = folder / PHOTOS[0].name
    shutil.copy(PHOTOS[0], image)
    probe_image = tmp_path / "galleries" / "probe.jpg"
    shutil.copy(PHOTOS[1], probe_image)
    register(settings, ICMEC)
    add_user(settings, ICMEC, "ana", "reviewer", "submitter")
    add_user(settings, ICMEC, "ben", "reviewer")
    add_user(settings, ICMEC, "audrey", "auditor")
    add_user(settings, OTHER, "olga", "reviewer", "submitter", "auditor")
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="cases", label="cases", owner=ICMEC, folder=str(folder), purpose="missing-children",
                      model_version="untrained-seed0"))
        s.add(Job(id="job1", kind=JobKind.SEARCH, submitter=ICMEC, purpose="missing-children", gallery="cases",
                  gallery_label="cases", state=JobState.DONE, params={}, review_required=True,
                  model_version="untrained-seed0", decision_reason="Allowed: icmec is excepted",
                  decision_rule_ids=["allow.child-safety-exception"]))
        s.flush()
        match = {"face_id": "face-1", "image_path": str(image), "image_sha256": sha256_file(image),
                 "similarity": 0.99, "box": [20.0, 10.0, 80.0, 90.0], "review": "unconfirmed",
                 "false_match_rate": None, "false_match_rate_below_limit": None}
        probe = ProbeResult(job_id="job1", path=str(probe_image), face_no=0, box=[40.0, 30.0, 140.0, 150.0],
                            probability=0.99, matches=[match])
        s.add(probe)
        s.flush()
        probe_id = probe.id
    app = create_app(settings, None, collect_every_s=None)
    yield app, settings, probe_id


def _signed_in(app, username: str, password: str = "correct horse battery staple") -> TestClient:
    client = TestClient(app, follow_redirects=False)
    form = client.get("/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = client.post("/sign-in", data={"username": username, "password": password, "csrf_token": token,
                                           "next": "/jobs"})
    assert answer.status_code == 303 and answer.headers["location"] == "/jobs", answer.text
    return client


def _csrf(page_html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page_html).group(1)


def test_sign_in_needs_its_csrf_token_and_sets_a_strict_httponly_session(console):
    app, _, _ = console
    client = TestClient(app, follow_redirects=False)
    away = client.get("/jobs/job1")
    assert away.status_code == 303 and away.headers["location"] == "/sign-in?next=/jobs/job1"
    form = client.get("/sign-in")
    assert form.status_code == 200 and "default-src 'self'" in form.headers["content-security-policy"]
    refused = client.post("/sign-in", data={"username": "ana", "password": "correct horse battery staple"})
    assert refused.status_code == 403 and "CSRF" in refused.text and COOKIE not in refused.headers.get("set-cookie", "")
    token = _csrf(form.text)
    wrong = client.post("/sign-in", data={"username": "ana", "password": "not her password", "csrf_token": token})
    assert wrong.status_code == 401 and "wrong username or password" in wrong.text
    token = _csrf(wrong.text)
    ok = client.post("/sign-in", data={"username": "ana", "password": "correct horse battery staple",
                                       "csrf_token": token, "next": "https://evil.example/"})
    assert ok.status_code == 303 and ok.headers["location"] == "/jobs"  # never an open redirect
    cookie = ok.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    jobs = client.get("/jobs")
    assert jobs.status_code == 200 and "job1"[:4] in jobs.text and "Allowed: icmec is excepted" in jobs.text
    assert "ana" in jobs.text and "allow.child-safety-exception" in jobs.text
    # Nothing on the page comes from another site: only this server's script and style.
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', jobs.text)
    assert client.get("/console/static/console.js").status_code == 200


def test_results_show_crops_and_review_in_place_as_the_signed_in_user(console):
    app, settings, probe_id = console
    ana = _signed_in(app, "ana")
    page = ana.get("/jobs/job1")
    assert page.status_code == 200
    crops = re.findall(r'<img class="crop" src="([^"]+)"', page.text)
    assert crops == [f"/v1/jobs/job1/results/{probe_id}/crop", f"/v1/jobs/job1/results/{probe_id}/matches/face-1/crop"]
    for url in crops:  # the session cookie signs the API's crop endpoints in too
        image = ana.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert "0.9900" in page.text and "not calibrated" in page.text and "untrained-seed0" in page.text
    csrf = _csrf(page.text)
    form_url = f"/jobs/job1/results/{probe_id}/reviews"
    # A form posted without its token (or with another's) does nothing.
    assert ana.post(form_url, data={"face_id": "face-1", "decision": "confirmed"}).status_code == 403
    assert ana.post(form_url, data={"face_id": "face-1", "decision": "confirmed",
                                    "csrf_token": "x" * 43}).status_code == 403
    with session_scope(settings.resolved_database_url) as s:
        assert s.query(MatchReview).count() == 0
    done = ana.post(form_url, data={"face_id": "face-1", "decision": "confirmed", "csrf_token": csrf})
    assert done.status_code == 303 and done.headers["location"].startswith("/jobs/job1?")
    once = ana.get("/jobs/job1").text  # missing-children needs two different reviewers
    assert "1 of 2 confirmations" in once and 'data-field="review">unconfirmed<' in once
    # The script's way: the review API with the session cookie needs the CSRF header as well.
    ben = _signed_in(app, "ben")
    api_url = f"/v1/jobs/job1/results/{probe_id}/reviews"
    no_header = ben.post(api_url, json={"face_id": "face-1", "decision": "confirmed"})
    assert no_header.status_code == 403 and "X-CSRF-Token" in no_header.json()["detail"]
    ben_csrf = _csrf(ben.get("/jobs/job1").text)
    by_ben = ben.post(api_url, json={"face_id": "face-1", "decision": "confirmed"}, headers={"X-CSRF-Token": ben_csrf})
    assert by_ben.status_code == 200, by_ben.text
    with session_scope(settings.resolved_database_url) as s:
        assert [(r.reviewer, r.decision) for r in s.query(MatchReview).order_by(MatchReview.id)] == [
            ("ana", "confirmed"), ("ben", "confirmed")]
    shown = ana.get("/jobs/job1").text
    assert "confirmed by ana" in shown and "confirmed by ben" in shown and "2 of 2 confirmations" in shown
    assert 'data-field="review">confirmed<' in shown

    olga = _signed_in(app, "olga")
    for url in ("/jobs/job1", *crops, "/v1/jobs/job1", "/v1/jobs/job1/results"):
        assert olga.get(url).status_code == 404, url
    assert "job1" not in olga.get("/jobs").text


def test_sign_out_ends_the_session_and_a_session_expires(console):
    app, settings, _ = console
    ana = _signed_in(app, "ana")
    cookie = ana.cookies[COOKIE]
    page = ana.get("/jobs")
    assert ana.post("/sign-out", data={}).status_code == 403  # sign-out is a form too
    out = ana.post("/sign-out", data={"csrf_token": _csrf(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/sign-in"
    # The cookie kept from before is worth nothing now: the session ended on the server.
    replay = TestClient(app, follow_redirects=False, cookies={COOKIE: cookie})
    assert replay.get("/jobs").status_code == 303 and replay.get("/v1/jobs").status_code == 401

    ben = _signed_in(app, "ben")
    assert ben.get("/jobs").status_code == 200
    with session_scope(settings.resolved_database_url) as s:
        for record in s.query(ConsoleSessionRecord).filter_by(username="ben"):
            record.expires_at = utcnow() - timedelta(seconds=1)
    assert ben.get("/jobs").status_code == 303


def test_audit_page_is_for_auditors_filters_and_exports(console):
    app, _, probe_id = console
    ana = _signed_in(app, "ana")
    csrf = _csrf(ana.get("/jobs/job1").text)
    ana.post(f"/jobs/job1/results/{probe_id}/reviews", data={"face_id": "face-1", "decision": "rejected",
                                                              "csrf_token": csrf})
    assert ana.get("/audit").status_code == 403 and "auditor" in ana.get("/audit").text
    audrey = _signed_in(app, "audrey")
    page = audrey.get("/audit")
    assert page.status_code == 200 and "Hash chain intact" in page.text
    assert "review.rejected" in page.text
    only = audrey.get("/audit?event=review.rejected&purpose=missing-children")
    assert set(re.findall(r'data-event="([^"]+)"', only.text)) == {"review.rejected"}
    assert audrey.get("/audit?from=yesterday").status_code == 422
    export = audrey.get("/audit/export.jsonl?event=review.rejected")
    assert export.status_code == 200 and "attachment" in export.headers["content-disposition"]
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert len(rows) == 1 and rows[0]["detail"]["reviewer"] == "ana" and rows[0]["row_hash"]
    # Another organisation's auditor reads none of it.
    olga = _signed_in(app, "olga")
    assert "review.rejected" not in olga.get("/audit").text
    galleries = audrey.get("/galleries")
    assert galleries.status_code == 200 and "cases" in galleries.text and "untrained-seed0" in galleries.text


def test_a_job_page_takes_a_unique_prefix_and_an_ambiguous_one_is_said_so(console):
    app, settings, probe_id = console
    first, second = "feed0001" + "a" * 24, "feed0002" + "b" * 24
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, "job1")
        for job_id in (first, second):
            s.add(Job(id=job_id, kind=JobKind.SEARCH, submitter=ICMEC, purpose="missing-children", gallery="cases",
                      gallery_label="cases", state=JobState.DONE, params={}, review_required=True,
                      model_version="untrained-seed0", decision_reason=job.decision_reason))
        s.flush()
        match = dict(s.get(ProbeResult, probe_id).matches[0])
        probe = ProbeResult(job_id=first, path=s.get(ProbeResult, probe_id).path, face_no=0,
                            box=[40.0, 30.0, 140.0, 150.0], probability=0.99, matches=[match])
        s.add(probe)
        s.flush()
        first_probe = probe.id
    ana = _signed_in(app, "ana")
    page = ana.get("/jobs/feed0001")
    assert page.status_code == 200 and f"<code>{first}</code>" in page.text
    # The page's crops and form name the whole id; the API's crop and review routes take the prefix too.
    assert f"/v1/jobs/{first}/results/{first_probe}/crop" in page.text
    assert ana.get(f"/v1/jobs/feed0001/results/{first_probe}/crop").status_code == 200
    done = ana.post(f"/jobs/feed0001/results/{first_probe}/reviews",
                    data={"face_id": "face-1", "decision": "confirmed", "csrf_token": _csrf(page.text)})
    assert done.status_code == 303 and done.headers["location"].startswith(f"/jobs/{first}?")
    api = ana.post(f"/v1/jobs/feed0001/results/{first_probe}/reviews", json={"face_id": "face-1",
                   "decision": "rejected"}, headers={"X-CSRF-Token": _csrf(page.text)})
    assert api.status_code == 200 and api.json()["review"] == "rejected", api.text
    with session_scope(settings.resolved_database_url) as s:
        assert [(r.job_id, r.decision) for r in s.query(MatchReview).order_by(MatchReview.id)] == [
            (first, "confirmed"), (first, "rejected")]
    ambiguous = ana.get("/jobs/feed")
    assert ambiguous.status_code == 422 and "ambiguous" in ambiguous.text and first[:12] in ambiguous.text
    assert "Traceback" not in ambiguous.text
    assert ana.get("/v1/jobs/feed/results/1/crop").status_code == 422
    # Another organisation's job is not found by its prefix either.
    olga = _signed_in(app, "olga")
    assert olga.get("/jobs/feed0001").status_code == 404
    assert olga.get(f"/v1/jobs/feed0001/results/{first_probe}/crop").status_code == 404
