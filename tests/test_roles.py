"""Roles in the one access rule: a named user acts for its organisation within its roles; a machine key
keeps its organisation's standing; the API takes a user by HTTP Basic. No worker: a queue that only
records what it was sent stands in for the broker (nothing here runs a chunk)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from facegate.db import session_scope
from scheduler.access import AccessRefused, AccessRule, Action, GalleryHidden
from scheduler.api import create_app
from scheduler.audit import AuditLog
from scheduler.dispatch import ChunkStatus
from scheduler.models import Gallery
from scheduler.service import JobService
from scheduler.users import UserStore
from tests.conftest import PHOTOS, USER_PASSWORD, add_user, make_settings, register
from tests.e2e import api_headers

LAB, ARCHIVE = "university-lab-example", "photo-archive-example"


class RecordingQueue:
    """Accepts chunks and never runs them: enough to see what was allowed to be queued."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, task_name: str, message: dict, task_id: str, queue: str | None = None) -> None:
        self.sent.append((task_name, message))

    def status(self, task_id: str) -> ChunkStatus:
        return ChunkStatus("PENDING")

    def forget(self, task_id: str) -> None:
        pass

    def revoke(self, task_ids: list[str]) -> None:
        pass


@pytest.fixture
def world(tmp_path):
    settings = make_settings(tmp_path)
    lab_key, lab_token = register(settings, LAB)
    _, archive_token = register(settings, ARCHIVE)
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="lab", label="lab", owner=LAB, purpose="research"))
    users = {name: add_user(settings, LAB, name, *roles)[0] for name, roles in
             {"sub": ["submitter"], "rev": ["reviewer"], "aud": ["auditor"], "adm": ["administrator"]}.items()}
    users["other-adm"] = add_user(settings, ARCHIVE, "other-adm", "administrator")[0]
    rule = AccessRule(settings, AuditLog(settings.resolved_database_url))
    return settings, rule, users, lab_key, {"lab": lab_token, "archive": archive_token}


def _refused(rule, who, action, gallery="lab", **kw) -> str:
    with pytest.raises(AccessRefused) as caught:
        rule.authorize(who, action, gallery, **kw)
    return caught.value.access.rule_ids[0]


def test_each_role_allows_its_actions_and_nothing_else(world):
    _, rule, users, _, _ = world
    assert rule.authorize(users["sub"], Action.SEARCH, "lab", purpose="research").allowed
    assert rule.authorize(users["sub"], Action.REINDEX, "lab", purpose="research").allowed
    for action in (Action.REVIEW, Action.ERASE, Action.GRANT):
        assert _refused(rule, users["sub"], action, purpose="research") == f"deny.role-may-not-{action.value}"
    assert _refused(rule, users["sub"], Action.AUDIT, None) == "deny.role-may-not-audit"
    assert rule.authorize(users["rev"], Action.REVIEW, "lab", purpose="research", human_review=True).allowed
    assert _refused(rule, users["rev"], Action.SEARCH, purpose="research") == "deny.role-may-not-search"
    assert _refused(rule, users["rev"], Action.INDEX, "new-one", purpose="research") == "deny.role-may-not-index"
    assert rule.authorize(users["aud"], Action.AUDIT, None).allowed
    assert _refused(rule, users["aud"], Action.ERASE, purpose="erasure") == "deny.role-may-not-erase"
    # Every role may read its organisation's galleries and jobs.
    for name in ("sub", "rev", "aud", "adm"):
        assert rule.authorize(users[name], Action.READ, "lab").allowed
    # An administrator may do everything in its organisation, erasure and grants included.
    for action in (Action.ERASE, Action.GRANT, Action.SEARCH, Action.REVIEW):
        assert rule.authorize(users["adm"], action, "lab", purpose="research").allowed
    assert rule.authorize(users["adm"], Action.AUDIT, None).allowed


def test_another_organisations_user_is_told_the_gallery_does_not_exist(world):
    _, rule, users, _, _ = world
    with pytest.raises(GalleryHidden, match="no gallery 'lab' for organisation 'photo-archive-example'"):
        rule.authorize(users["other-adm"], Action.ERASE, "lab", purpose="erasure")
    with pytest.raises(GalleryHidden):
        rule.authorize(users["other-adm"], Action.READ, "lab")


def test_a_machine_key_keeps_its_standing_but_never_reviews_what_needs_a_person(world):
    settings, rule, _, key, _ = world
    assert rule.authorize(key, Action.ERASE, "lab", purpose="erasure").allowed
    assert rule.authorize(key, Action.GRANT, "lab").allowed
    assert rule.authorize(key, Action.AUDIT, None).allowed
    assert rule.authorize(key, Action.REVIEW, "lab", purpose="research").allowed  # research needs no review
    assert _refused(rule, key, Action.REVIEW, purpose="research", human_review=True) == "deny.key-may-not-review"
    # A purpose the registry says requires human review, whatever the caller claims.
    refused = _refused(rule, key, Action.REVIEW, purpose="missing-children")
    assert refused == "deny.key-may-not-review"
    row = [r for r in AuditLog(settings.resolved_database_url).rows(organisation_id=LAB)
           if r.event == "access.refused"][-1]
    assert row.api_key_id == key.key_id and "named user with the reviewer role" in row.detail["reason"]
    assert row.username is None  # a machine key is nobody


def test_refusals_and_decisions_name_the_user(world):
    settings, rule, users, _, _ = world
    _refused(rule, users["rev"], Action.SEARCH, purpose="research")
    rule.authorize(users["adm"], Action.GRANT, "lab")
    rows = AuditLog(settings.resolved_database_url).rows(organisation_id=LAB)
    refused = [r for r in rows if r.event == "access.refused"][-1]
    assert refused.detail["user"] == "rev" and refused.detail["roles"] == ["reviewer"]
    assert refused.username == "rev"  # the user column, not only the detail
    assert refused.api_key_id == users["rev"].key_id and refused.api_key_id.startswith("user:")
    assert "needs the submitter or administrator role" in refused.detail["reason"]
    allowed = [r for r in rows if r.event == "access.decision"][-1]
    assert allowed.detail["user"] == "adm" and allowed.allowed and allowed.username == "adm"


@pytest.fixture
def api(world, tmp_path):
    settings, _, _, _, tokens = world
    queue = RecordingQueue()
    folder = tmp_path / "galleries" / "labphotos"
    folder.mkdir(parents=True)
    for photo in PHOTOS[:2]:
        folder.joinpath(photo.name).write_bytes(photo.read_bytes())
    client = TestClient(create_app(settings, queue, collect_every_s=None))
    return client, settings, queue, folder, tokens


def test_the_api_takes_a_user_by_http_basic(api):
    client, settings, _, _, tokens = api
    assert client.get("/v1/galleries", auth=("rev", USER_PASSWORD)).status_code == 200
    wrong = client.get("/v1/galleries", auth=("rev", USER_PASSWORD + "!"))
    assert wrong.status_code == 401 and wrong.headers["content-type"] == "application/problem+json"
    assert wrong.json()["detail"] == "wrong username or password"
    assert 'Basic realm="facegate"' in wrong.headers["www-authenticate"]
    assert client.get("/v1/galleries", auth=("nobody", USER_PASSWORD)).json()["detail"] == "wrong username or password"
    UserStore(settings.resolved_database_url).set_disabled("rev", True)
    disabled = client.get("/v1/galleries", auth=("rev", USER_PASSWORD))
    assert disabled.status_code == 401 and "disabled" in disabled.json()["detail"]
    # Keys work as before, beside users; OpenAPI declares all three schemes.
    assert client.get("/v1/galleries", headers=api_headers(tokens["lab"])).status_code == 200
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert {"basic": []} in document["paths"]["/v1/jobs"]["get"]["security"]


def test_roles_decide_what_a_user_may_do_through_the_api(api):
    client, settings, queue, folder, tokens = api
    submitter, reviewer, auditor, admin = (("sub", USER_PASSWORD), ("rev", USER_PASSWORD), ("aud", USER_PASSWORD),
                                           ("adm", USER_PASSWORD))
    body = {"name": "photos", "folder": str(folder), "purpose": "research"}
    refused = client.post("/v1/galleries", json=body, auth=reviewer)
    assert refused.status_code == 403 and "needs the submitter or administrator role" in refused.json()["detail"]
    assert client.post("/v1/galleries", json=body, auth=submitter).status_code == 201
    job = client.post("/v1/jobs", json={"kind": "index", "gallery": "photos", "purpose": "research"}, auth=submitter)
    assert job.status_code == 202, job.text
    assert JobService(settings).get(job.json()["id"]).api_key_id == UserStore(settings.resolved_database_url).get("sub").key_id
    assert queue.sent
    # Erasure and grants: the owner's administrators (or its key), never a submitter.
    sent = len(queue.sent)
    assert client.post("/v1/erasures", json={"gallery": "photos", "whole_gallery": True},
                       auth=submitter).status_code == 403
    assert client.post("/v1/galleries/photos/grants", json={"organisation_id": ARCHIVE},
                       auth=submitter).status_code == 403
    assert len(queue.sent) == sent
    assert client.post("/v1/galleries/photos/grants", json={"organisation_id": ARCHIVE},
                       auth=admin).status_code == 204
    erased = client.post("/v1/erasures", json={"gallery": "photos", "whole_gallery": True}, auth=admin)
    assert erased.status_code == 202, erased.text
    assert client.post("/v1/erasures", json={"gallery": "lab", "whole_gallery": True},
                       headers=api_headers(tokens["lab"])).status_code == 202
    # The audit log: auditors and administrators (and keys), not submitters or reviewers.
    assert client.get("/v1/audit/head", auth=auditor).status_code == 200
    assert client.get("/v1/audit/head", auth=admin).status_code == 200
    assert client.get("/v1/audit/head", auth=reviewer).status_code == 403
    assert client.post("/v1/audit/checkpoints", auth=submitter).status_code == 403
    assert client.get("/v1/audit/head", headers=api_headers(tokens["lab"])).status_code == 200
    # Another organisation's user: a gallery not granted to it does not exist for it; a granted one it may
    # see, and, administrator or not, never erase.
    other = ("other-adm", USER_PASSWORD)
    assert client.get("/v1/galleries/lab", auth=other).status_code == 404
    assert client.get("/v1/galleries/photos", auth=other).status_code == 200
    assert client.post("/v1/erasures", json={"gallery": "photos", "whole_gallery": True},
                       auth=other).status_code == 403
    assert client.post("/v1/erasures", json={"gallery": "lab", "whole_gallery": True}, auth=other).status_code == 404
    assert client.get(f"/v1/jobs/{job.json()['id']}", auth=other).status_code == 404
    # Cancelling a job is for whoever may start one of its kind.
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", auth=reviewer).status_code == 403
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", auth=submitter).json()["state"] == "cancelled"
