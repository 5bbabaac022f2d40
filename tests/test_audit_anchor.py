"""The audit log anchored by signed checkpoints; the registry as the authority on who an organisation is;
CLI bad inputs answered in one line."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from facegate.audit import GENESIS_HASH, AuditLog
from facegate.db import engine_for
from policy import RegistryError, registry_from_dict
from tests.conftest import make_settings
from tests.e2e import env_for, run_cli


def _log_with_rows(settings, n=5):
    log = AuditLog(settings.resolved_database_url)
    for i in range(n):
        log.append("test.event", organisation_id="university-lab-example", detail={"i": i})
    return log


def test_verify_prints_the_head_and_a_checkpoint_catches_truncation_and_a_forged_tail(tmp_path):
    settings = make_settings(tmp_path)
    env = env_for(settings)
    log = _log_with_rows(settings)
    head = log.head()
    verified = run_cli(["audit", "verify"], env)
    assert verified.returncode == 0 and f"head: 5 rows, last hash {head[1]}" in verified.stdout
    checkpoint = tmp_path / "checkpoint.json"
    assert run_cli(["audit", "checkpoint", "--out", str(checkpoint)], env).returncode == 0
    assert json.loads(checkpoint.read_text())["rows"] == 5
    assert run_cli(["audit", "verify", "--checkpoint", str(checkpoint)], env).returncode == 0

    with engine_for(settings.resolved_database_url).begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq >= 4"))
    # The chain alone is still valid: only the checkpoint shows what is gone.
    assert run_cli(["audit", "verify"], env).returncode == 0
    truncated = run_cli(["audit", "verify", "--checkpoint", str(checkpoint)], env)
    assert truncated.returncode == 1 and "truncated" in truncated.stdout and "3 rows" in truncated.stdout

    # A forged tail with correct hashes: rows 4 and 5 rewritten by someone who knows the hash recipe.
    log.append("forged.event", organisation_id="someone", detail={})
    log.append("forged.event", organisation_id="someone", detail={})
    assert log.verify().ok
    forged = run_cli(["audit", "verify", "--checkpoint", str(checkpoint)], env)
    assert forged.returncode == 1 and "row 5" in forged.stdout and "checkpoint" in forged.stdout

    # A checkpoint edited to fit is refused by its signature.
    edited = json.loads(checkpoint.read_text())
    edited["head_hash"] = log.head()[1]
    checkpoint.write_text(json.dumps(edited))
    refused = run_cli(["audit", "verify", "--checkpoint", str(checkpoint)], env)
    assert refused.returncode == 1 and "signature" in refused.stdout


def test_a_corrupt_row_is_named_not_a_traceback(tmp_path):
    settings = make_settings(tmp_path)
    _log_with_rows(settings)
    with engine_for(settings.resolved_database_url).begin() as conn:
        conn.execute(text("UPDATE audit_log SET detail = 'not json {' WHERE seq = 3"))
    broken = run_cli(["audit", "verify"], env_for(settings))
    assert broken.returncode == 1 and "row 3" in broken.stdout and "Traceback" not in broken.stderr
    assert "head: 2 rows" in broken.stdout


def test_checkpoint_of_an_empty_log(tmp_path):
    log = AuditLog(make_settings(tmp_path).resolved_database_url)
    checkpoint = log.checkpoint("s")
    assert (checkpoint.rows, checkpoint.head_hash) == (0, GENESIS_HASH)
    assert log.verify(checkpoint, "s").ok and not log.verify(checkpoint, "other").ok


def test_org_add_refuses_what_contradicts_the_registry(tmp_path):
    env = env_for(make_settings(tmp_path))
    police = run_cli(["org", "add", "icmec", "--sector", "police"], env)
    assert police.returncode == 2 and "child_safety" in police.stderr
    renamed = run_cli(["org", "add", "icmec", "--name", "Not ICMEC"], env)
    assert renamed.returncode == 2 and "registry" in renamed.stderr
    assert run_cli(["org", "add", "icmec"], env).returncode == 0
    bad_id = run_cli(["org", "add", "../etc", "--name", "x", "--sector", "commercial"], env)
    assert bad_id.returncode == 2 and "not valid" in bad_id.stderr


@pytest.mark.parametrize("at", ["0001-01-01", "9999-12-31", "0001-01-01T00:00:00+01:00", "soon"])
def test_policy_check_at_the_edges_of_time_is_one_line_and_exit_2(tmp_path, at):
    checked = run_cli(["policy", "check", "city-police-example", "-c", "search", "-p", "criminal-investigation",
                       "--at", at], env_for(make_settings(tmp_path)))
    assert checked.returncode == 2 and "Traceback" not in checked.stderr and "--at" in checked.stderr


def _registry_with(org_ids):
    from policy.registry import _read_default  # the shipped registry, as a dict to vary

    import yaml

    data = yaml.safe_load(_read_default()[0])
    template = data["organisations"][0]
    data["organisations"] += [{**template, "id": i} for i in org_ids]
    return data


@pytest.mark.parametrize("ids,problem", [(["Thorn"], "confusable"), (["city_police.example"], "confusable"),
                                         (["thorn\u200b"], "safe alphabet"), (["ｔｈｏｒｎ２"], "safe alphabet"),
                                         (["../x"], "safe alphabet")])
def test_registry_refuses_unsafe_and_confusable_ids(ids, problem):
    with pytest.raises(RegistryError, match=problem):
        registry_from_dict(_registry_with(ids))
