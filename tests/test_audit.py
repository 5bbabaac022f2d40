"""The audit log's hash chain: intact chains verify, and every kind of tampering is named at the right row."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading

import pytest
from sqlalchemy import text

from facegate.db import engine_for
from policy import Decision
from scheduler.audit import GENESIS_HASH, HASHED_FIELDS, OPTIONAL_HASHED_FIELDS, AuditLog, row_hash_of

@pytest.fixture
def db_url(any_database_url):
    return any_database_url


def _fill(log: AuditLog, count: int = 6) -> None:
    for n in range(count):
        log.append(
            "job.finished" if n % 2 else "job.submitted",
            organisation_id="photo-archive-example",
            api_key_id="0123456789ab",
            job_id=f"job-{n}",
            capability="search",
            purpose="photo-library",
            gallery="archive",
            registry_hash="ab" * 32,
            rule_ids=["exception.photo-archive"],
            allowed=True,
            detail={"probes": n, "matches": 2 * n, "threshold": 0.92, "model_version": "arcface-r100@1"},
        )


def _execute(url: str, sql: str, **params) -> None:
    with engine_for(url).begin() as conn:
        conn.execute(text(sql), params)


def test_intact_chain_verifies(db_url):
    log = AuditLog(db_url)
    assert log.verify().ok  # an empty log is a valid chain
    _fill(log)
    result = log.verify()
    assert result.ok, result.reason
    assert result.rows_checked == 6
    rows = log.rows()
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == GENESIS_HASH
    assert all(later.prev_hash == earlier.row_hash for earlier, later in zip(rows, rows[1:]))
    assert rows[0].at.tzinfo is not None and rows[0].at.utcoffset() == dt.timedelta(0)
    assert rows[2].detail == {"probes": 2, "matches": 4, "threshold": 0.92, "model_version": "arcface-r100@1"}


def test_changed_detail_is_named_at_that_row(db_url):
    log = AuditLog(db_url)
    _fill(log)
    # A literal, not a bind parameter: PostgreSQL casts an untyped literal to json, but not a varchar.
    _execute(db_url, """UPDATE audit_log SET detail = '{"probes": 0, "matches": 0}' WHERE seq = 3""")
    result = log.verify()
    assert not result.ok
    assert result.first_broken_seq == 3
    assert result.rows_checked == 2
    assert result.reason == "row 3: stored hash does not match its content (changed after it was written)"


def test_changed_allowed_flag_is_named_at_that_row(db_url):
    log = AuditLog(db_url)
    _fill(log)
    _execute(db_url, "UPDATE audit_log SET allowed = :allowed WHERE seq = 5", allowed=False)
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 5)
    assert "row 5: stored hash does not match" in result.reason


def test_deleted_middle_row_is_named(db_url):
    log = AuditLog(db_url)
    _fill(log)
    _execute(db_url, "DELETE FROM audit_log WHERE seq = 4")
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 4)
    assert result.reason == "row 4 missing: sequence jumps from 3 to 5"


def test_deleted_first_row_is_named(db_url):
    log = AuditLog(db_url)
    _fill(log)
    _execute(db_url, "DELETE FROM audit_log WHERE seq = 1")
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 1)
    assert result.reason == "row 1 missing: sequence starts at 2"


def test_row_changed_and_rehashed_is_caught_at_the_next_row(db_url):
    log = AuditLog(db_url)
    _fill(log)
    forged = log.rows()[3].as_dict()  # seq 4
    forged["allowed"] = False
    _execute(
        db_url,
        "UPDATE audit_log SET allowed = :allowed, row_hash = :row_hash WHERE seq = 4",
        allowed=False,
        row_hash=row_hash_of(forged),
    )
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 5)
    assert result.rows_checked == 4  # row 4 itself is now self-consistent
    assert result.reason.startswith("row 5: prev_hash does not match row 4's hash")


def test_concurrent_appends_keep_one_chain(db_url):
    AuditLog(db_url)  # create the table before the threads race
    errors: list[BaseException] = []

    def append_many(worker: int) -> None:
        log = AuditLog(db_url)
        try:
            for n in range(25):
                log.append("policy.decision", organisation_id=f"org-{worker}", detail={"n": n})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=append_many, args=(worker,)) for worker in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    log = AuditLog(db_url)
    seqs = [row.seq for row in log.rows()]
    assert seqs == list(range(1, 51))
    result = log.verify()
    assert result.ok, result.reason
    assert result.rows_checked == 50


def test_export_writes_one_json_object_per_row(tmp_path):
    log = AuditLog(f"sqlite:///{tmp_path}/db.sqlite")
    _fill(log, 3)
    log.append("erasure", organisation_id="other-org", gallery="archive", detail={"vectors_removed": 17})

    out = io.StringIO()
    assert log.export(out) == 4
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    exported = [json.loads(line) for line in lines]
    for record in exported:
        assert set(record) == {*HASHED_FIELDS, *OPTIONAL_HASHED_FIELDS, "row_hash"}
        assert dt.datetime.fromisoformat(record["at"]).utcoffset() == dt.timedelta(0)
        # An exported row can be checked without the database.
        assert row_hash_of(record) == record["row_hash"]
    assert exported[3]["event"] == "erasure"
    assert exported[3]["detail"] == {"vectors_removed": 17}

    only_other = io.StringIO()
    assert log.export(only_other, organisation_id="other-org") == 1
    assert json.loads(only_other.getvalue())["seq"] == 4

    later = io.StringIO()
    assert log.export(later, since=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)) == 0
    assert later.getvalue() == ""


def test_append_decision_records_the_decision(tmp_path):
    log = AuditLog(f"sqlite:///{tmp_path}/db.sqlite")
    decision = Decision(
        allowed=False,
        rule_ids=["moratorium.rekognition-police"],
        reason="police use of face search is under moratorium",
        registry_hash="cd" * 32,
        at=dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.timezone.utc),
        organisation_id="city-police-example",
        capability="search",
        purpose="criminal-investigation",
    )
    entry = log.append_decision(decision, event="job.refused", api_key_id="0123456789ab", job_id="job-7")
    assert entry.seq == 1
    (row,) = log.rows(job_id="job-7")
    assert row == entry
    assert row.event == "job.refused"
    assert row.allowed is False
    assert row.rule_ids == ["moratorium.rekognition-police"]
    assert row.organisation_id == "city-police-example"
    assert row.registry_hash == "cd" * 32
    assert row.detail == {
        "reason": "police use of face search is under moratorium",
        "decided_for": "2024-03-01T12:00:00+00:00",
    }
    assert log.rows(event="policy.decision") == []
    assert log.head() == (1, entry.row_hash)
    assert log.verify().ok
