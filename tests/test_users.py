"""Named users: roles, argon2id password hashes, sign-in refused for a wrong password or a disabled user,
and the `facegate user` commands (password never echoed, every change audited)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from cli.app import app
from facegate.db import engine_for
from scheduler.audit import AuditLog
from scheduler.keys import AuthenticationError, KeyStore
from scheduler.users import UserError, UserStore

ORG = "photo-archive-example"
PASSWORD = "a long enough passphrase"


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path}/db.sqlite"


@pytest.fixture
def users(db_url):
    KeyStore(db_url).add_organisation(ORG, "Example Photo Archive", "photo_archive")
    return UserStore(db_url)


def test_a_user_signs_in_with_its_password_and_acts_for_its_organisation(users, db_url):
    added = users.add(ORG, "alice", PASSWORD, ["reviewer", "submitter"])
    assert added.roles == ("submitter", "reviewer")  # in the one order of ROLES
    who = users.authenticate("alice", PASSWORD)
    assert who.organisation_id == ORG and who.user == "alice" and who.is_user
    assert who.roles == frozenset({"submitter", "reviewer"}) and who.key_id == f"user:{added.id}"
    # Only an argon2id hash is stored, never the password.
    with engine_for(db_url).connect() as c:
        stored = c.execute(text("select password_hash from users")).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert users.get("alice").last_sign_in_at is not None


def test_wrong_password_unknown_user_and_disabled_user_are_refused(users):
    users.add(ORG, "alice", PASSWORD, ["reviewer"])
    with pytest.raises(AuthenticationError, match="wrong username or password"):
        users.authenticate("alice", PASSWORD + "x")
    with pytest.raises(AuthenticationError, match="wrong username or password"):
        users.authenticate("nobody", PASSWORD)
    _, changed = users.set_disabled("alice", True)
    assert changed and not users.set_disabled("alice", True)[1]
    with pytest.raises(AuthenticationError, match="disabled"):
        users.authenticate("alice", PASSWORD)
    users.set_disabled("alice", False)
    assert users.authenticate("alice", PASSWORD).user == "alice"
    users.set_password("alice", "another passphrase")
    with pytest.raises(AuthenticationError):
        users.authenticate("alice", PASSWORD)
    assert users.authenticate("alice", "another passphrase").user == "alice"


def test_bad_input_is_named(users):
    with pytest.raises(UserError, match="organisation 'nowhere' does not exist"):
        users.add("nowhere", "bob", PASSWORD, ["reviewer"])
    with pytest.raises(UserError, match="unknown role 'boss'"):
        users.add(ORG, "bob", PASSWORD, ["boss"])
    with pytest.raises(UserError, match="at least one role"):
        users.add(ORG, "bob", PASSWORD, [])
    with pytest.raises(UserError, match="too short"):
        users.add(ORG, "bob", "short", ["reviewer"])
    with pytest.raises(UserError, match="not valid"):
        users.add(ORG, "Bob\n", PASSWORD, ["reviewer"])
    users.add(ORG, "bob", PASSWORD, ["reviewer"])
    with pytest.raises(UserError, match="already exists"):
        users.add(ORG, "bob", PASSWORD, ["auditor"])
    with pytest.raises(UserError, match="no role left"):
        users.change_roles("bob", remove=["reviewer"])
    assert users.change_roles("bob", add=["auditor"], remove=["reviewer"]).roles == ("auditor",)
    with pytest.raises(UserError, match="no user 'carol'"):
        users.set_disabled("carol", True)


def _cli(args, **env):
    return CliRunner().invoke(app, args, env=env, catch_exceptions=False)


def test_the_user_commands_never_echo_the_password_and_audit_every_change(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEGATE_DATA_DIR", str(tmp_path / "data"))
    assert _cli(["org", "add", ORG]).exit_code == 0
    added = _cli(["user", "add", ORG, "alice", "--role", "reviewer", "--role", "auditor"],
                 FACEGATE_USER_PASSWORD=PASSWORD)
    assert added.exit_code == 0, added.output
    assert PASSWORD not in added.output
    # From a prompt, asked twice; from stdin for scripts.
    prompted = CliRunner().invoke(app, ["user", "add", ORG, "bob", "-r", "submitter"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0 and PASSWORD not in prompted.output, prompted.output
    mismatch = CliRunner().invoke(app, ["user", "passwd", "bob"], input=f"{PASSWORD}\nsomething else\n\n")
    assert mismatch.exit_code != 0
    piped = CliRunner().invoke(app, ["user", "passwd", "bob", "--password-stdin"], input="a new long passphrase\n")
    assert piped.exit_code == 0, piped.output
    short = _cli(["user", "add", ORG, "carol", "-r", "reviewer"], FACEGATE_USER_PASSWORD="short")
    assert short.exit_code == 2 and "too short" in short.output
    assert _cli(["user", "roles", "alice", "--add", "administrator", "--remove", "auditor"]).exit_code == 0
    assert _cli(["user", "disable", "bob"]).exit_code == 0
    listed = _cli(["user", "list", ORG, "--json"])
    rows = {r["username"]: r for r in __import__("json").loads(listed.output)}
    assert rows["alice"]["roles"] == ["reviewer", "administrator"] and rows["alice"]["active"]
    assert not rows["bob"]["active"] and "carol" not in rows
    assert "password" not in listed.output
    assert _cli(["user", "enable", "bob"]).exit_code == 0
    assert _cli(["user", "roles", "nobody", "--add", "reviewer"]).exit_code == 2
    store = UserStore(f"sqlite:///{tmp_path}/data/facegate.db")
    assert store.authenticate("bob", "a new long passphrase").user == "bob"
    log = AuditLog(f"sqlite:///{tmp_path}/data/facegate.db")
    events = [(r.event, r.detail.get("user")) for r in log.rows(organisation_id=ORG) if r.event.startswith("user.")]
    assert events == [("user.added", "alice"), ("user.added", "bob"), ("user.password_changed", "bob"),
                      ("user.roles_changed", "alice"), ("user.disabled", "bob"), ("user.enabled", "bob")]
    assert all(PASSWORD not in str(r.detail) for r in log.rows(organisation_id=ORG))
