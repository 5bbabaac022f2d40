"""The audit log's user column: hashed when set, so tampering with it breaks the chain, while rows written
before the column existed (hashed without it) still verify after the database is upgraded."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from sqlalchemy import inspect, text

from facegate.db import create_schema, engine_for
from scheduler.audit import GENESIS_HASH, AuditLog, row_hash_of

# The fields an audit row was hashed with before the user column existed, spelt out here on purpose: the
# test must fail if the code's idea of the old format drifts.
OLD_FIELDS = ("seq", "at", "event", "organisation_id", "api_key_id", "job_id", "capability", "purpose", "gallery",
              "registry_hash", "rule_ids", "allowed", "detail", "prev_hash")


def _old_hash(row: dict) -> str:
    content = {name: row[name] for name in OLD_FIELDS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _old_database(url: str, rows: int = 3) -> None:
    """An audit_log as a FaceGate without the user column left it, with rows hashed the way it hashed them."""
    create_schema(url)
    with engine_for(url).begin() as conn:
        conn.exec_driver_sql('DROP INDEX "ix_audit_log_username"')
        conn.exec_driver_sql('ALTER TABLE "audit_log" DROP COLUMN "username"')
    prev = GENESIS_HASH
    with engine_for(url).begin() as conn:
        for seq in range(1, rows + 1):
            at = datetime(2026, 11, 1, 9, seq, tzinfo=timezone.utc)
            row = {"seq": seq, "at": at.isoformat(timespec="microseconds"), "event": "review.confirmed",
                   "organisation_id": "icmec", "api_key_id": "user:00aa11bb22cc", "job_id": f"job-{seq}",
                   "capability": "search", "purpose": "missing-children", "gallery": "cases", "registry_hash": None,
                   "rule_ids": [], "allowed": True, "detail": {"reviewer": "ana"}, "prev_hash": prev}
            row["row_hash"] = _old_hash(row)
            conn.execute(text('INSERT INTO audit_log (seq, at, event, organisation_id, api_key_id, job_id, capability, '
                              'purpose, gallery, registry_hash, rule_ids, allowed, detail, prev_hash, row_hash) VALUES '
                              '(:seq, :at, :event, :organisation_id, :api_key_id, :job_id, :capability, :purpose, '
                              ':gallery, :registry_hash, :rule_ids, :allowed, :detail, :prev_hash, :row_hash)'),
                         {**row, "at": at, "rule_ids": json.dumps(row["rule_ids"]), "detail": json.dumps(row["detail"])})
            prev = row["row_hash"]


def _set_username(url: str, seq: int, value: str | None) -> None:
    with engine_for(url).begin() as conn:
        conn.execute(text("UPDATE audit_log SET username = :v WHERE seq = :seq"), {"v": value, "seq": seq})


def test_an_old_chain_still_verifies_after_the_upgrade_and_new_rows_hash_the_user(any_database_url):
    url = any_database_url
    _old_database(url)
    assert "username" not in {c["name"] for c in inspect(engine_for(url)).get_columns("audit_log")}

    log = AuditLog(url)  # creates the schema: the column is added, the old rows keep NULL there
    assert "username" in {c["name"] for c in inspect(engine_for(url)).get_columns("audit_log")}
    result = log.verify()
    assert result.ok and result.rows_checked == 3, result.reason

    entry = log.append("review.confirmed", organisation_id="icmec", api_key_id="user:00aa11bb22cc", username="ana",
                       job_id="job-4", detail={"reviewer": "ana"})
    log.append("job.submitted", organisation_id="icmec", api_key_id="0123456789ab")
    assert log.verify().ok
    assert [r.username for r in log.rows()] == [None, None, None, "ana", None]
    assert [r.seq for r in log.rows(username="ana")] == [4]
    # The user is part of what row 4's hash covers: the same content without it hashes differently.
    assert row_hash_of({**entry.as_dict(), "username": None}) != entry.row_hash
    assert row_hash_of(entry.as_dict()) == entry.row_hash


def test_changing_adding_or_removing_the_user_of_a_row_breaks_the_chain(any_database_url):
    url = any_database_url
    log = AuditLog(url)
    log.append("job.submitted", organisation_id="icmec", api_key_id="0123456789ab")
    log.append("review.confirmed", organisation_id="icmec", api_key_id="user:00aa11bb22cc", username="ana")
    log.append("review.confirmed", organisation_id="icmec", api_key_id="user:11bb22cc33dd", username="ben")
    assert log.verify().ok

    _set_username(url, 2, "ben")  # changed: ana's confirmation claimed for ben
    assert (log.verify().ok, log.verify().first_broken_seq) == (False, 2)
    _set_username(url, 2, "ana")
    assert log.verify().ok

    _set_username(url, 3, None)  # removed: a user's act passed off as a machine's
    assert (log.verify().ok, log.verify().first_broken_seq) == (False, 3)
    _set_username(url, 3, "ben")

    _set_username(url, 1, "ana")  # added: a machine key's row pinned on a person
    broken = log.verify()
    assert (broken.ok, broken.first_broken_seq) == (False, 1) and "does not match its content" in broken.reason


def test_an_export_line_recomputes_its_hash_with_or_without_a_user(tmp_path):
    import io

    log = AuditLog(f"sqlite:///{tmp_path / 'db.sqlite'}")
    log.append("job.submitted", organisation_id="icmec", api_key_id="0123456789ab")
    log.append("user.signed_in", organisation_id="icmec", api_key_id="user:00aa11bb22cc", username="ana")
    buffer = io.StringIO()
    assert log.export(buffer, username="ana") == 1
    line = json.loads(buffer.getvalue())
    assert line["username"] == "ana" and row_hash_of(line) == line["row_hash"]
    old_line = log.rows()[0].as_dict()
    del old_line["username"]  # as an export from before the column reads
    assert row_hash_of(old_line) == old_line["row_hash"]
