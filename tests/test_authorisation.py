"""Legal authorisation per job: the pure rule (exigent circumstances valid 48 hours unless confirmed), the
gate that refuses a job without one, and a real worker that refuses a queued job whose authorisation lapsed
or was withdrawn, and the erasure of the results of a job whose authorisation is withdrawn."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from policy import load_registry
from policy.authorisation import AuthorisationRecord, check_authorisation
from scheduler.service import JobDenied
from tests.conftest import FIXTURES, PHOTOS, make_settings, register

REGISTRY = load_registry()
KINDS = {k.id: k for k in REGISTRY.authorisation_kinds}
NEEDED = REGISTRY.purpose("criminal-investigation").authorisation
# Not under the police moratorium with the shipped scope `police`; allowed criminal-investigation.
AGENCY = "federal-agency-example"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def _record(kind: str, **changes) -> AuthorisationRecord:
    base = dict(id="a1", organisation_id=AGENCY, kind=kind, reference="W-2026-0142", issuing_authority="County Court",
                issued_at=T0)
    return AuthorisationRecord(**{**base, **changes})


def _check(record, at, capability="search"):
    return check_authorisation(NEEDED, KINDS, record, organisation_id=AGENCY, purpose="criminal-investigation",
                               capability=capability, at=at, authorisation_id=record.id if record else None)


def test_a_purpose_that_requires_one_refuses_a_job_without_it():
    refused = _check(None, T0)
    assert not refused.allowed and refused.rule_ids == ["deny.authorisation-required"]
    assert "warrant or court-order or exigent" in refused.reason
    # Only for the capabilities it names: indexing for that purpose needs none, nor does another purpose.
    assert _check(None, T0, capability="index").allowed
    assert check_authorisation(None, KINDS, None, organisation_id=AGENCY, purpose="research", capability="search",
                               at=T0).allowed


def test_exigent_circumstances_lapse_after_48_hours_unless_confirmed_in_time():
    exigent = _record("exigent")
    assert _check(exigent, T0 + timedelta(hours=47, minutes=59)).allowed
    lapsed = _check(exigent, T0 + timedelta(hours=48))
    assert not lapsed.allowed and lapsed.rule_ids == ["deny.authorisation-lapsed"]
    assert "lapsed at 2026-12-03T09:00:00+00:00" in lapsed.reason and "unless confirmed" in lapsed.reason
    confirmed = _record("exigent", confirmed_at=T0 + timedelta(hours=30))
    assert _check(confirmed, T0 + timedelta(days=30)).allowed
    too_late = _record("exigent", confirmed_at=T0 + timedelta(hours=49))
    assert not _check(too_late, T0 + timedelta(hours=50)).allowed
    # A warrant does not lapse; it stops when withdrawn.
    assert _check(_record("warrant"), T0 + timedelta(days=3650)).allowed
    withdrawn = _record("warrant", withdrawn_at=T0 + timedelta(days=2), withdrawn_reason="quashed on appeal")
    assert _check(withdrawn, T0 + timedelta(days=1)).allowed
    stopped = _check(withdrawn, T0 + timedelta(days=2))
    assert stopped.rule_ids == ["deny.authorisation-withdrawn"] and "quashed on appeal" in stopped.reason


def test_another_organisations_or_an_unaccepted_kind_is_refused():
    other = _check(_record("warrant", organisation_id="state-police-example"), T0)
    assert other.rule_ids == ["deny.authorisation-unknown"]
    data = REGISTRY.model_dump(mode="json")
    data["authorisation_kinds"].append({"id": "internal-memo", "description": "Not a legal authorisation."})
    from policy import registry_from_dict

    registry = registry_from_dict(data)
    kinds = {k.id: k for k in registry.authorisation_kinds}
    memo = check_authorisation(NEEDED, kinds, _record("internal-memo"), organisation_id=AGENCY,
                               purpose="criminal-investigation", capability="search", at=T0)
    assert memo.rule_ids == ["deny.authorisation-kind-not-accepted"]
    data["purposes"][2]["authorisation"] = {"kinds": ["subpoena"]}
    with pytest.raises(Exception, match="unknown authorisation kind 'subpoena'"):
        registry_from_dict(data)


def test_service_records_confirms_and_withdraws_with_audit(tmp_path):
    from scheduler.authorisations import AuthorisationError, AuthorisationNotFound, AuthorisationService

    settings = make_settings(tmp_path)
    agency, _ = register(settings, AGENCY)
    # Another key of the agency confirms: whoever recorded an authorisation may not confirm it (four eyes).
    colleague, _ = register(settings, AGENCY)
    police, _ = register(settings, "state-police-example")
    service = AuthorisationService(settings)
    now = datetime.now(timezone.utc)
    exigent = service.record(agency, kind="exigent", reference="EX-7", issuing_authority="Duty officer",
                             issued_at=now - timedelta(hours=1))
    assert exigent.status == "valid" and exigent.valid_until == exigent.issued_at + timedelta(hours=48)
    assert service.confirm(colleague, exigent.id).valid_until is None
    with pytest.raises(AuthorisationError, match="not in the registry"):
        service.record(agency, kind="subpoena", reference="S", issuing_authority="x", issued_at=now)
    with pytest.raises(AuthorisationNotFound):
        service.get(police, exigent.id)  # another organisation's reads as not found
    lapsed = service.record(agency, kind="exigent", reference="EX-8", issuing_authority="Duty officer",
                            issued_at=now - timedelta(hours=49))
    assert lapsed.status == "lapsed"
    with pytest.raises(AuthorisationError, match="does not revive"):
        service.confirm(colleague, lapsed.id)
    gone = service.withdraw(agency, exigent.id, reason="court refused")
    assert gone.status == "withdrawn"
    events = [r.event for r in service.audit.rows(organisation_id=AGENCY)]
    assert events == ["authorisation.recorded", "authorisation.confirmed", "authorisation.recorded",
                      "authorisation.withdrawn"]
    assert service.audit.rows(event="authorisation.withdrawn")[0].detail["authorisation"]["withdrawn_reason"] == \
        "court refused"


def test_the_gate_refuses_a_search_without_one_and_binds_it_into_ticket_and_audit(tmp_path, redis_url):
    from facegate.db import session_scope
    from facegate.queue import make_celery
    from policy import verify_ticket
    from scheduler.authorisations import AuthorisationService
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.models import Gallery
    from scheduler.service import JobService
    from tests.conftest import redis_client

    settings = make_settings(tmp_path, broker_url=redis_url)
    app = make_celery(settings)
    jobs = JobService(settings, CeleryTaskQueue(app))
    agency, _ = register(settings, AGENCY)
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="suspects", owner=AGENCY, model_version="untrained-seed0", purpose="criminal-investigation"))
    with pytest.raises(JobDenied) as denied:
        jobs.submit_search([str(PHOTOS[0])], "suspects", agency, "criminal-investigation", threshold=0.95)
    assert denied.value.view.decision_rule_ids == ["deny.authorisation-required"]
    assert redis_client(redis_url).llen("facegate") + redis_client(redis_url).llen("facegate.model.untrained-seed0") == 0
    with pytest.raises(JobDenied, match="no authorisation 'nope'"):
        jobs.submit_search([str(PHOTOS[0])], "suspects", agency, "criminal-investigation", threshold=0.95,
                           authorisation="nope")
    warrant = AuthorisationService(settings).record(agency, kind="warrant", reference="W-2026-0142",
                                                    issuing_authority="County Court",
                                                    issued_at=datetime.now(timezone.utc))
    job = jobs.submit_search([str(PHOTOS[0])], "suspects", agency, "criminal-investigation", threshold=0.95,
                             authorisation=warrant.id)
    assert job.state == "queued" and job.authorisation_id == warrant.id
    submitted = jobs.audit.rows(job_id=job.id, event="job.submitted")[0].detail
    assert submitted["authorisation"] == {"id": warrant.id, "kind": "warrant", "reference": "W-2026-0142",
                                          "issuing_authority": "County Court"}
    decided = jobs.audit.rows(job_id=job.id, event="authorisation.decision")[0]
    assert decided.allowed and decided.detail["authorisation_id"] == warrant.id
    import json

    sent = json.loads(redis_client(redis_url).lindex("facegate.model.untrained-seed0", 0))
    ticket = json.loads(__import__("base64").b64decode(sent["body"]))[0][0]["ticket"]
    claims = verify_ticket(ticket, settings.resolved_ticket_secret(), datetime.now(timezone.utc))
    assert claims.authorisation == warrant.id
    app.close()


@pytest.mark.slow
def test_worker_refuses_lapsed_and_withdrawn_and_withdrawal_erases_results(tmp_path, redis_url):
    from facegate.queue import make_celery
    from scheduler.authorisations import AuthorisationService
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.service import JobService
    from tests.e2e import WorkerProcess

    settings = make_settings(tmp_path, broker_url=redis_url, milvus_uri=str(tmp_path / "milvus.db"))
    app = make_celery(settings)
    jobs = JobService(settings, CeleryTaskQueue(app))
    auths = AuthorisationService(settings)
    agency, _ = register(settings, AGENCY)
    now = datetime.now(timezone.utc)
    warrant = auths.record(agency, kind="warrant", reference="W-1", issuing_authority="County Court", issued_at=now)
    doomed = auths.record(agency, kind="warrant", reference="W-2", issuing_authority="County Court", issued_at=now)
    # Exigent circumstances declared 48 hours ago less 20 seconds: valid when the job is queued, not when it runs.
    exigent = auths.record(agency, kind="exigent", reference="EX-1", issuing_authority="Duty officer",
                           issued_at=now - timedelta(hours=48) + timedelta(seconds=20))
    indexed = jobs.submit_index(FIXTURES / "aligned", "suspects", agency, "criminal-investigation")
    probe = [str(next(p for p in PHOTOS if p.stem == "kate_siegel"))]  # above the purpose's quality floor

    def search(authorisation: str):
        return jobs.submit_search(probe, "suspects", agency, "criminal-investigation", threshold=0.95,
                                  authorisation=authorisation)

    kept, lapsing, withdrawn = search(warrant.id), search(exigent.id), search(doomed.id)
    assert {kept.state, lapsing.state, withdrawn.state} == {"queued"}
    auths.withdraw(agency, doomed.id, reason="court refused the application")
    while auths.get(agency, exigent.id).status != "lapsed":
        time.sleep(0.5)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        assert jobs.wait(indexed.id, timeout_s=300).state == "done"
        done = jobs.wait(kept.id, timeout_s=300)
        assert done.state == "done"
        lapsed = jobs.wait(lapsing.id, timeout_s=300)
        assert lapsed.state == "refused_at_execution" and "deny.authorisation-lapsed" in lapsed.error
        refused = jobs.wait(withdrawn.id, timeout_s=300)
        assert refused.state == "refused_at_execution" and "deny.authorisation-withdrawn" in refused.error
        assert "court refused the application" in refused.error
        assert jobs.audit.rows(job_id=lapsing.id, event="task.refused_at_execution")
    finally:
        worker.stop()
        app.close()
    found = jobs.count_probe_results(kept.id)
    assert found == 1 and jobs.probe_results(kept.id)[0]["matches"]
    # Withdrawing the warrant the finished search stood on erases what it found, audited.
    jobs.withdraw_authorisation(agency, warrant.id, reason="warrant quashed")
    assert jobs.count_probe_results(kept.id) == 0
    erased = jobs.audit.rows(job_id=kept.id, event="results.erased")[0].detail
    assert erased["probe_faces"] == 1 and erased["remaining"] == 0 and "warrant quashed" in erased["why"]
    assert jobs.get(kept.id).params["results_erased"].startswith(f"authorisation {warrant.id} withdrawn")


def test_the_api_records_shows_confirms_and_withdraws_and_hides_anothers(tmp_path):
    from fastapi.testclient import TestClient

    from scheduler.api import create_app
    from tests.e2e import api_headers

    settings = make_settings(tmp_path)
    _, token = register(settings, AGENCY)
    _, colleague = register(settings, AGENCY)
    _, other = register(settings, "state-police-example")
    client = TestClient(create_app(settings, None))
    issued = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    made = client.post("/v1/authorisations", json={"kind": "exigent", "reference": "EX-9",
                                                   "issuing_authority": "Duty officer", "issued_at": issued},
                       headers=api_headers(token))
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["status"] == "valid" and body["valid_until"] and "48 hours" in body["rule"]
    bad = client.post("/v1/authorisations", json={"kind": "hunch", "reference": "x", "issuing_authority": "y",
                                                  "issued_at": issued}, headers=api_headers(token))
    assert bad.status_code == 422 and "hunch" in bad.json()["detail"]
    assert client.get(f"/v1/authorisations/{body['id']}", headers=api_headers(other)).status_code == 404
    own = client.post(f"/v1/authorisations/{body['id']}/confirm", headers=api_headers(token))
    assert own.status_code == 403 and "four eyes" in own.json()["detail"]
    confirmed = client.post(f"/v1/authorisations/{body['id']}/confirm", headers=api_headers(colleague)).json()
    assert confirmed["valid_until"] is None and confirmed["confirmed_at"]
    gone = client.post(f"/v1/authorisations/{body['id']}/withdraw", json={"reason": "court refused"},
                       headers=api_headers(token)).json()
    assert gone["status"] == "withdrawn" and gone["withdrawn_reason"] == "court refused"
    listed = client.get("/v1/authorisations", headers=api_headers(token)).json()
    assert [a["id"] for a in listed] == [body["id"]]
    assert client.get("/v1/authorisations", headers=api_headers(other)).json() == []
