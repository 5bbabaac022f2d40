"""Two-person review: the registry says how many reviewers per purpose; reviews are appended, by the
signed-in user; a match is confirmed only when that many different reviewers confirmed it, and a rejection
by anyone is kept. The search's results are written straight into the database here (what a worker's
folded result leaves), so no worker runs; tests/test_gate_e2e.py reviews a real search."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from facegate.db import session_scope
from facegate.vocabulary import JobKind, JobState, ReviewDecision
from policy import load_registry, registry_from_dict, reviewers_required
from scheduler.api import create_app
from scheduler.models import Gallery, Job, ProbeResult
from scheduler.reviews import ReviewEntry, review_state
from scheduler.service import JobService
from scheduler.users import UserStore
from tests.conftest import USER_PASSWORD, add_user, make_settings, register
from tests.e2e import api_headers

ICMEC, ARCHIVE = "icmec", "photo-archive-example"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def _entry(who: str, decision: ReviewDecision, minutes: int) -> ReviewEntry:
    return ReviewEntry(who, who, decision, T0 + timedelta(minutes=minutes))


def test_the_review_state_counts_different_reviewers_and_keeps_a_rejection():
    yes, no = ReviewDecision.CONFIRMED, ReviewDecision.REJECTED
    assert review_state([], needed=2, review_required=True)["review"] == "unconfirmed"
    assert review_state([], needed=1, review_required=False)["review"] == "not_required"
    once = review_state([_entry("ana", yes, 1)], needed=2, review_required=True)
    assert once["review"] == "unconfirmed" and once["confirmations"] == 1 and once["reviewers_required"] == 2
    twice = review_state([_entry("ana", yes, 1), _entry("ana", yes, 2)], needed=2, review_required=True)
    assert twice["review"] == "unconfirmed" and twice["confirmations"] == 1 and len(twice["reviews"]) == 2
    both = review_state([_entry("ana", yes, 1), _entry("ben", yes, 2)], needed=2, review_required=True)
    assert both["review"] == "confirmed" and both["confirmations"] == 2 and both["reviewed_by"] == ["ana", "ben"]
    kept = review_state([_entry("ana", yes, 1), _entry("ben", no, 2), _entry("carl", yes, 3)], needed=2,
                        review_required=True)
    assert kept["review"] == "rejected" and [r["decision"] for r in kept["reviews"]] == ["confirmed", "rejected",
                                                                                         "confirmed"]
    assert review_state([_entry("ana", yes, 1)], needed=1, review_required=False)["review"] == "confirmed"


def test_the_registry_states_reviewers_per_purpose():
    registry = load_registry()
    assert reviewers_required("missing-children", registry) == 2
    assert reviewers_required("trafficking-victims", registry) == 2
    assert reviewers_required("criminal-investigation", registry) == 2
    assert registry.purpose("research").reviewers_required == 0
    assert reviewers_required("no-such-purpose", registry) == 2  # unknown: the safe answer
    data = registry.model_dump(mode="json")
    research = next(i for i, p in enumerate(data["purposes"]) if p["id"] == "research")
    children = next(i for i, p in enumerate(data["purposes"]) if p["id"] == "missing-children")
    # Absent, it follows human review: 2 where required, else 0.
    del data["purposes"][children]["reviewers_required"]
    assert registry_from_dict(data).purpose("missing-children").reviewers_required == 2
    data["purposes"][children]["reviewers_required"] = 0
    with pytest.raises(Exception, match="requires human review but states reviewers_required 0"):
        registry_from_dict(data)
    data["purposes"][children]["reviewers_required"] = 2
    data["purposes"][research]["reviewers_required"] = 3
    with pytest.raises(Exception, match="no human review"):
        registry_from_dict(data)


def _match(face_id: str) -> dict:
    return {"face_id": face_id, "image_path": f"/galleries/cases/{face_id}.jpg", "image_sha256": "0" * 64,
            "similarity": 0.97, "box": [1.0, 2.0, 30.0, 40.0], "review": "unconfirmed"}


@pytest.fixture
def reviewed(tmp_path):
    """A finished missing-children search of ICMEC's with one probe face and two matches."""
    settings = make_settings(tmp_path)
    _, key = register(settings, ICMEC)
    _, archive_key = register(settings, ARCHIVE)
    for name, roles in {"ana": ["reviewer"], "ben": ["reviewer", "submitter"], "carl": ["reviewer"],
                        "sub": ["submitter"]}.items():
        add_user(settings, ICMEC, name, *roles)
    add_user(settings, ARCHIVE, "other", "reviewer", "administrator")
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="cases", label="cases", owner=ICMEC, purpose="missing-children"))
        s.add(Job(id="j" * 32, kind=JobKind.SEARCH, submitter=ICMEC, purpose="missing-children", gallery="cases",
                  state=JobState.DONE, review_required=True, reviewers_required=2))
        s.flush()
        probe = ProbeResult(job_id="j" * 32, path="/probes/p.jpg", face_no=0, box=[0, 0, 10, 10], probability=0.99,
                            matches=[_match("face-a"), _match("face-b")])
        s.add(probe)
        s.flush()
        probe_id = probe.id
    client = TestClient(create_app(settings, None, collect_every_s=None))
    return client, settings, probe_id, key, archive_key


def _review(client, probe_id, face_id, decision, auth=None, headers=None, **extra):
    return client.post(f"/v1/jobs/{'j' * 32}/results/{probe_id}/reviews",
                       json={"face_id": face_id, "decision": decision, **extra}, auth=auth, headers=headers)


def test_two_different_reviewers_confirm_and_one_reviewer_twice_does_not(reviewed):
    client, settings, probe_id, key, _ = reviewed
    ana, ben = ("ana", USER_PASSWORD), ("ben", USER_PASSWORD)
    first = _review(client, probe_id, "face-a", "confirmed", ana)
    assert first.status_code == 200, first.text
    assert first.json()["review"] == "unconfirmed" and first.json()["confirmations"] == 1
    assert first.json()["reviewers_required"] == 2 and first.json()["reviewer"] == "ana"
    again = _review(client, probe_id, "face-a", "confirmed", ana).json()
    assert again["review"] == "unconfirmed" and again["confirmations"] == 1 and len(again["reviews"]) == 2
    second = _review(client, probe_id, "face-a", "confirmed", ben, note="same scar").json()
    assert second["review"] == "confirmed" and second["confirmations"] == 2
    assert second["reviewed_by"] == ["ana", "ben"]
    # The results show the same state, with the whole history.
    results = client.get(f"/v1/jobs/{'j' * 32}/results", auth=ana).json()["items"][0]["matches"]
    a, b = (next(m for m in results if m["face_id"] == f) for f in ("face-a", "face-b"))
    assert a["review"] == "confirmed" and [r["reviewer"] for r in a["reviews"]] == ["ana", "ana", "ben"]
    assert a["reviews"][2]["note"] == "same scar"
    assert b["review"] == "unconfirmed" and b["confirmations"] == 0 and b["reviews"] == []
    # Every decision is audited, with the user who made it and the state it left.
    rows = JobService(settings).audit.rows(job_id="j" * 32, event="review.confirmed")
    assert [(r.detail["reviewer"], r.detail["state"]) for r in rows] == [
        ("ana", "unconfirmed"), ("ana", "unconfirmed"), ("ben", "confirmed")]
    assert rows[0].api_key_id == UserStore(settings.resolved_database_url).get("ana").key_id


def test_a_rejection_is_kept(reviewed):
    client, settings, probe_id, _, _ = reviewed
    assert _review(client, probe_id, "face-b", "confirmed", ("ana", USER_PASSWORD)).json()["review"] == "unconfirmed"
    rejected = _review(client, probe_id, "face-b", "rejected", ("carl", USER_PASSWORD), note="different ears").json()
    assert rejected["review"] == "rejected"
    after = _review(client, probe_id, "face-b", "confirmed", ("ben", USER_PASSWORD)).json()
    assert after["review"] == "rejected" and after["confirmations"] == 2
    assert [r["decision"] for r in after["reviews"]] == ["confirmed", "rejected", "confirmed"]
    assert JobService(settings).audit.rows(job_id="j" * 32, event="review.rejected")[0].detail["reviewer"] == "carl"


def test_who_may_review_and_who_may_not(reviewed):
    client, settings, probe_id, key, archive_key = reviewed
    by_key = _review(client, probe_id, "face-a", "confirmed", headers=api_headers(key))
    assert by_key.status_code == 403 and "requires human review" in by_key.json()["detail"]
    assert "named user with the reviewer role" in by_key.json()["detail"]
    # A typed name is never the reviewer: naming someone else is refused, naming oneself is accepted.
    other_name = _review(client, probe_id, "face-a", "confirmed", ("ana", USER_PASSWORD), reviewer="ben")
    assert other_name.status_code == 422 and "signed-in user" in other_name.json()["detail"]
    assert _review(client, probe_id, "face-a", "confirmed", ("ana", USER_PASSWORD), reviewer="ana").status_code == 200
    submitter = _review(client, probe_id, "face-a", "confirmed", ("sub", USER_PASSWORD))
    assert submitter.status_code == 403 and "reviewer or administrator role" in submitter.json()["detail"]
    # Another organisation's user (even its administrator) and key: no such job for them.
    assert _review(client, probe_id, "face-a", "confirmed", ("other", USER_PASSWORD)).status_code == 404
    assert _review(client, probe_id, "face-a", "confirmed", headers=api_headers(archive_key)).status_code == 404
    assert client.get(f"/v1/jobs/{'j' * 32}/results", auth=("other", USER_PASSWORD)).status_code == 404
    assert _review(client, probe_id, "face-a", "confirmed", ("ben", "wrong password")).status_code == 401
    UserStore(settings.resolved_database_url).set_disabled("ben", True)
    assert _review(client, probe_id, "face-a", "confirmed", ("ben", USER_PASSWORD)).status_code == 401
    # None of the refused attempts counted: only ana's confirmation.
    matches = client.get(f"/v1/jobs/{'j' * 32}/results", auth=("ana", USER_PASSWORD)).json()["items"][0]["matches"]
    face_a = next(m for m in matches if m["face_id"] == "face-a")
    assert face_a["review"] == "unconfirmed" and face_a["reviewed_by"] == ["ana"]


def test_the_cli_reviews_as_a_signed_in_user(reviewed, monkeypatch):
    from cli.app import app

    _, settings, probe_id, key, _ = reviewed
    monkeypatch.setenv("FACEGATE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FACEGATE_GALLERY_ROOTS", json.dumps([str(r) for r in settings.gallery_roots]))
    runner = CliRunner()
    by_key = runner.invoke(app, ["review", "j" * 32, str(probe_id), "face-a", "--confirm", "--key", key])
    assert by_key.exit_code == 3 and "requires human review" in by_key.output
    env = {"FACEGATE_USER_PASSWORD": USER_PASSWORD}
    first = runner.invoke(app, ["review", "j" * 32, str(probe_id), "face-a", "--confirm", "--user", "ana"], env=env)
    assert first.exit_code == 0 and "confirmed by ana; the match is now unconfirmed (1/2)" in first.output
    second = runner.invoke(app, ["review", "j" * 32, str(probe_id), "face-a", "--confirm"],
                           env={**env, "FACEGATE_USER": "ben"})
    assert second.exit_code == 0 and "now confirmed (2/2)" in second.output, second.output
    wrong = runner.invoke(app, ["review", "j" * 32, str(probe_id), "face-a", "--reject", "--user", "carl"],
                          env={"FACEGATE_USER_PASSWORD": "not it at all"})
    assert wrong.exit_code == 3 and "sign-in refused" in wrong.output
