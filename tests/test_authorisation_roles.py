"""Who may record, confirm and withdraw a legal authorisation: administrators, with four eyes on a
confirmation (whoever recorded it may not confirm it); every role reads them. The same rule
(AccessRule.authorize_authorisation) answers the service, the API and the CLI, and a refusal is audited. And
the CLI's --user on every command that acts for an organisation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from scheduler.access import AccessRefused
from scheduler.audit import AuditLog
from tests.conftest import USER_PASSWORD, add_user, make_settings, register
from tests.e2e import api_headers

AGENCY = "federal-agency-example"


@pytest.fixture
def agency(tmp_path):
    settings = make_settings(tmp_path)
    _, token = register(settings, AGENCY)
    users = {name: add_user(settings, AGENCY, name, *roles)[0] for name, roles in (
        ("adm1", ["administrator"]), ("adm2", ["administrator"]), ("sub", ["submitter"]), ("aud", ["auditor"]))}
    return settings, users, token


def _issued() -> datetime:
    return datetime.now(timezone.utc) - timedelta(hours=1)


def _refusals(settings) -> list:
    return AuditLog(settings.resolved_database_url).rows(event="access.refused")


def test_administrators_record_another_confirms_and_every_role_reads(agency):
    from scheduler.authorisations import AuthorisationService

    settings, users, _ = agency
    service = AuthorisationService(settings)
    with pytest.raises(AccessRefused, match="needs the administrator role"):
        service.record(users["sub"], kind="exigent", reference="EX-1", issuing_authority="Duty officer",
                       issued_at=_issued())
    [refused] = _refusals(settings)
    assert (refused.username, refused.rule_ids) == ("sub", ["deny.role-may-not-record-authorisation"])

    made = service.record(users["adm1"], kind="exigent", reference="EX-1", issuing_authority="Duty officer",
                          issued_at=_issued())
    assert made.recorded_by == users["adm1"].key_id
    with pytest.raises(AccessRefused, match="four eyes"):
        service.confirm(users["adm1"], made.id)
    own = _refusals(settings)[-1]
    assert own.rule_ids == ["deny.confirm-own-authorisation"] and own.username == "adm1"
    assert own.detail["authorisation"] == made.id
    assert service.get(users["adm1"], made.id).confirmed_at is None  # the refused confirmation did nothing
    with pytest.raises(AccessRefused, match="administrator role"):
        service.confirm(users["sub"], made.id)

    confirmed = service.confirm(users["adm2"], made.id)
    assert confirmed.confirmed_at is not None and confirmed.valid_until is None
    row = AuditLog(settings.resolved_database_url).rows(event="authorisation.confirmed")[-1]
    assert row.username == "adm2"

    for reader in ("sub", "aud"):  # a submitter names it on a job; an auditor checks it
        assert service.get(users[reader], made.id).id == made.id
        assert [v.id for v in service.list(users[reader])] == [made.id]
    with pytest.raises(AccessRefused, match="administrator role"):
        service.withdraw(users["aud"], made.id, reason="not for an auditor")
    # Withdrawing is the safe direction: the recorder may do it.
    assert service.withdraw(users["adm1"], made.id, reason="court refused").status == "withdrawn"


def test_the_same_key_may_not_confirm_what_it_recorded(agency):
    from scheduler.authorisations import AuthorisationService

    settings, _, _ = agency
    first, _ = register(settings, AGENCY)
    second, _ = register(settings, AGENCY)
    service = AuthorisationService(settings)
    made = service.record(first, kind="exigent", reference="EX-2", issuing_authority="Duty officer",
                          issued_at=_issued())
    with pytest.raises(AccessRefused, match=f"key {first.key_id} recorded"):
        service.confirm(first, made.id)
    assert service.confirm(second, made.id).confirmed_at is not None


def test_the_api_applies_the_same_rule(agency):
    from scheduler.api import create_app

    settings, _, token = agency
    client = TestClient(create_app(settings, None))
    body = {"kind": "exigent", "reference": "EX-3", "issuing_authority": "Duty officer",
            "issued_at": _issued().isoformat()}
    by_submitter = client.post("/v1/authorisations", json=body, auth=("sub", USER_PASSWORD))
    assert by_submitter.status_code == 403 and "administrator role" in by_submitter.json()["detail"]
    made = client.post("/v1/authorisations", json=body, auth=("adm1", USER_PASSWORD))
    assert made.status_code == 201, made.text
    made_id = made.json()["id"]
    assert made.json()["recorded_by"].startswith("user:")
    own = client.post(f"/v1/authorisations/{made_id}/confirm", auth=("adm1", USER_PASSWORD))
    assert own.status_code == 403 and "four eyes" in own.json()["detail"]
    assert client.post(f"/v1/authorisations/{made_id}/confirm", auth=("adm2", USER_PASSWORD)).status_code == 200
    assert client.get(f"/v1/authorisations/{made_id}", auth=("aud", USER_PASSWORD)).status_code == 200
    withdraw = client.post(f"/v1/authorisations/{made_id}/withdraw", json={"reason": "x"}, auth=("aud", USER_PASSWORD))
    assert withdraw.status_code == 403
    assert client.post(f"/v1/authorisations/{made_id}/withdraw", json={"reason": "court refused"},
                       headers=api_headers(token)).status_code == 200
    assert [r.username for r in _refusals(settings)] == ["sub", "adm1", "aud"]


def _cli_env(settings, monkeypatch):
    import json

    monkeypatch.setenv("FACEGATE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("FACEGATE_GALLERY_ROOTS", json.dumps([str(r) for r in settings.gallery_roots]))
    monkeypatch.setenv("FACEGATE_USER_PASSWORD", USER_PASSWORD)
    monkeypatch.setenv("COLUMNS", "200")


def test_the_cli_applies_the_same_rule_with_user_on_every_command(agency, monkeypatch):
    from cli.app import app

    settings, _, token = agency
    _cli_env(settings, monkeypatch)
    runner = CliRunner()
    record = ["authorisation", "record", "--kind", "exigent", "--reference", "EX-4", "--authority", "Duty officer",
              "--json"]
    refused = runner.invoke(app, [*record, "--user", "sub"])
    assert refused.exit_code == 3 and "administrator role" in refused.output, refused.output
    made = runner.invoke(app, [*record, "--user", "adm1"])
    assert made.exit_code == 0, made.output
    import json

    made_id = json.loads(made.output)["id"]
    own = runner.invoke(app, ["authorisation", "confirm", made_id, "--user", "adm1"])
    assert own.exit_code == 3 and "four eyes" in own.output
    # FACEGATE_USER is --user's fallback.
    by_env = runner.invoke(app, ["authorisation", "confirm", made_id], env={"FACEGATE_USER": "adm2"})
    assert by_env.exit_code == 0 and "confirmed at" in by_env.output, by_env.output
    assert runner.invoke(app, ["authorisation", "show", made_id, "--user", "aud"]).exit_code == 0
    rows = AuditLog(settings.resolved_database_url).rows()
    assert [(r.event, r.username) for r in rows if r.event.startswith("authorisation.")] == [
        ("authorisation.recorded", "adm1"), ("authorisation.confirmed", "adm2")]
    # A key on the command line wins over FACEGATE_USER in the environment; --user wins over a key.
    by_key = runner.invoke(app, ["gallery", "list", "--key", token, "--json"], env={"FACEGATE_USER": "nobody-here"})
    assert by_key.exit_code == 0, by_key.output
    wrong = runner.invoke(app, ["gallery", "list", "--key", token, "--user", "sub"],
                          env={"FACEGATE_USER_PASSWORD": "not her password"})
    assert wrong.exit_code == 3 and "sign-in refused" in wrong.output
    assert runner.invoke(app, ["jobs", "--user", "sub", "--json"]).exit_code == 0
    failed = AuditLog(settings.resolved_database_url).rows(event="user.sign_in_failed")
    assert [(r.username, r.detail["via"]) for r in failed] == [("sub", "cli")]
    for command in (["index", "--help"], ["search", "--help"], ["jobs", "--help"], ["reindex", "--help"],
                    ["gallery", "erase", "--help"], ["authorisation", "withdraw", "--help"], ["evaluate", "--help"]):
        assert "--user" in runner.invoke(app, command).output, command
