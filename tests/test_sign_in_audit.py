"""People in the audit log: console sign-ins (refused ones with the name tried, never the password), sign-outs
and expired sessions are audited; the acting user is a column of its own, shown and filtered in the console
and the API; HTTP Basic reads UTF-8 credentials and answers undecodable ones with a 401."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

from fastapi.testclient import TestClient

from facegate.db import session_scope
from scheduler.audit import AuditLog
from scheduler.console.sessions import ConsoleSessionRecord
from scheduler.models import utcnow
from tests.conftest import USER_PASSWORD, add_user
from tests.test_console import ICMEC, _csrf, _signed_in, console

__all__ = ["console"]  # the console fixture of test_console, used here too


def _rows(settings, event: str):
    return AuditLog(settings.resolved_database_url).rows(event=event)


def _basic(username: str, password: str | bytes) -> dict[str, str]:
    raw = (username.encode() + b":" + (password if isinstance(password, bytes) else password.encode("utf-8")))
    return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def test_console_sign_ins_sign_outs_and_expiry_are_audited_without_the_password(console):
    app, settings, _ = console
    client = TestClient(app, follow_redirects=False)
    token = _csrf(client.get("/sign-in").text)
    wrong = client.post("/sign-in", data={"username": "ana", "password": "not-her-password", "csrf_token": token})
    assert wrong.status_code == 401
    token = _csrf(wrong.text)
    assert client.post("/sign-in", data={"username": "mallory", "password": "guess-guess",
                                         "csrf_token": token}).status_code == 401
    failed = _rows(settings, "user.sign_in_failed")
    assert [(r.organisation_id, r.username, r.detail["username_tried"], r.detail["via"], r.allowed)
            for r in failed] == [(ICMEC, "ana", "ana", "console", False),
                                 ("facegate-system", None, "mallory", "console", False)]
    assert failed[0].api_key_id.startswith("user:")
    everything = json.dumps([r.as_dict() for r in AuditLog(settings.resolved_database_url).rows()], default=str)
    assert "not-her-password" not in everything and "guess-guess" not in everything

    ana = _signed_in(app, "ana")
    [signed_in] = _rows(settings, "user.signed_in")
    assert (signed_in.username, signed_in.organisation_id, signed_in.detail["via"]) == ("ana", ICMEC, "console")
    assert ana.post("/sign-out", data={"csrf_token": _csrf(ana.get("/jobs").text)}).status_code == 303
    [signed_out] = _rows(settings, "user.signed_out")
    assert (signed_out.username, signed_out.organisation_id, signed_out.api_key_id) == ("ana", ICMEC,
                                                                                        signed_in.api_key_id)

    ben = _signed_in(app, "ben")
    with session_scope(settings.resolved_database_url) as s:
        for record in s.query(ConsoleSessionRecord).filter_by(username="ben"):
            record.expires_at = utcnow() - timedelta(seconds=1)
    assert ben.get("/jobs").status_code == 303
    assert ben.get("/v1/jobs").status_code == 401
    [expired] = _rows(settings, "user.session_expired")  # recorded once, however often the cookie comes back
    assert expired.username == "ben" and expired.detail["expired_at"]
    assert AuditLog(settings.resolved_database_url).verify().ok


def test_the_audit_page_and_the_api_show_and_filter_the_acting_user(console):
    app, settings, probe_id = console
    ana = _signed_in(app, "ana")
    ana.post(f"/jobs/job1/results/{probe_id}/reviews",
             data={"face_id": "face-1", "decision": "rejected", "csrf_token": _csrf(ana.get("/jobs/job1").text)})
    audrey = _signed_in(app, "audrey")
    page = audrey.get("/audit?user=ana")
    assert page.status_code == 200
    shown = set(re.findall(r'<td data-field="user">([^<]*)</td>', page.text))
    assert shown == {"ana"} and 'data-event="review.rejected"' in page.text and 'data-event="user.signed_in"' in page.text
    export = [json.loads(line) for line in audrey.get("/audit/export.jsonl?user=ana").text.splitlines()]
    assert export and {row["username"] for row in export} == {"ana"}

    api = TestClient(app)
    auditor = _basic("audrey", USER_PASSWORD)
    listed = api.get("/v1/audit/events", params={"user": "ana", "event": "review.rejected"}, headers=auditor)
    assert listed.status_code == 200, listed.text
    [row] = listed.json()["items"]
    assert (row["username"], row["event"], row["organisation_id"]) == ("ana", "review.rejected", ICMEC)
    everyone = api.get("/v1/audit/events", params={"limit": 1}, headers=auditor).json()
    assert len(everyone["items"]) == 1 and everyone["next_offset"] == 1
    lines = api.get("/v1/audit/export", params={"user": "ana"}, headers=auditor)
    assert lines.status_code == 200 and lines.headers["content-type"].startswith("application/x-ndjson")
    exported = [json.loads(line) for line in lines.text.splitlines()]
    assert {r["username"] for r in exported} == {"ana"} and [r["seq"] for r in exported] == sorted(r["seq"] for r in exported)
    assert api.get("/v1/audit/events", params={"from": "yesterday"}, headers=auditor).status_code == 422
    # A reviewer is not an auditor: the role rule refuses, with the role it needs.
    refused = api.get("/v1/audit/events", headers=_basic("ana", USER_PASSWORD))
    assert refused.status_code == 403 and "auditor" in refused.json()["detail"]


def test_http_basic_reads_utf8_and_answers_undecodable_credentials_with_401(console):
    app, settings, _ = console
    add_user(settings, ICMEC, "ulla", "submitter", password="pässwörd-ü")
    api = TestClient(app)
    assert api.get("/v1/jobs", headers=_basic("ulla", "pässwörd-ü")).status_code == 200
    wrong = api.get("/v1/jobs", headers=_basic("ulla", "passwoerd-ue"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong username or password"
    # The same password sent in Latin-1 is not UTF-8: a 401 that says so, never a 500.
    for header, why in ((_basic("ulla", "pässwörd-ü".encode("latin-1")), "not UTF-8"),
                        (_basic("ulla", b"\xff\xfe\xfd"), "not UTF-8"),
                        ({"Authorization": "Basic ***not-base64***"}, "not base64"),
                        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "username:password")):
        answer = api.get("/v1/jobs", headers=header)
        assert answer.status_code == 401, answer.text
        assert why in answer.json()["detail"] and answer.headers["content-type"] == "application/problem+json"
        assert 'charset="UTF-8"' in answer.headers["www-authenticate"]
    failed = _rows(settings, "user.sign_in_failed")
    assert [(r.username, r.detail["via"]) for r in failed] == [("ulla", "api")]
    # A user name that is not ASCII decodes as well, and is simply nobody's.
    assert api.get("/v1/jobs", headers=_basic("ülla", "pässwörd-ü")).status_code == 401


def test_the_cli_lists_and_exports_the_audit_log_by_user(console, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app as cli

    app, settings, _ = console
    _signed_in(app, "ana")
    _signed_in(app, "ben")
    monkeypatch.setenv("FACEGATE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("COLUMNS", "120")
    runner = CliRunner()
    listed = runner.invoke(cli, ["audit", "list", "--username", "ana"])
    assert listed.exit_code == 0, listed.output
    assert "user.signed_in" in listed.output and "ana" in listed.output and "ben" not in listed.output
    as_json = json.loads(runner.invoke(cli, ["audit", "list", "--event", "user.signed_in", "--json"]).output)
    assert [row["username"] for row in as_json] == ["ana", "ben"]
    assert [row["username"] for row in json.loads(runner.invoke(
        cli, ["audit", "list", "--event", "user.signed_in", "--limit", "1", "--json"]).output)] == ["ben"]
    out = tmp_path / "ana.jsonl"
    assert runner.invoke(cli, ["audit", "export", "--username", "ana", "-o", str(out)]).exit_code == 0
    assert {json.loads(line)["username"] for line in out.read_text().splitlines()} == {"ana"}
