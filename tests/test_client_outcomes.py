"""What a client reads without a worker: the no-face outcome, short job ids, tables at 80 columns."""

from __future__ import annotations

import io
import re
import uuid

import pytest
from rich.console import Console

import cli.common as common
from facegate.db import session_scope
from facegate.vocabulary import JobKind, JobState
from scheduler.models import Job, JobItem
from scheduler.service import JobNotFound, JobRefused, JobService


def _job(service: JobService, org: str, *, items: list[tuple[str, bool, int]], job_id: str | None = None,
         state: JobState = JobState.DONE) -> str:
    job_id = job_id or uuid.uuid4().hex
    with session_scope(service.db_url) as s:
        s.add(Job(id=job_id, kind=JobKind.SEARCH, submitter=org, purpose="research", gallery="g", state=state,
                  total_items=len(items), done_items=len(items), failed_items=sum(1 for _, ok, _ in items if not ok),
                  faces=sum(f for _, ok, f in items if ok)))
        s.flush()
        s.add_all(JobItem(job_id=job_id, chunk_no=0, path=p, ok=ok, faces=f, reason=None if ok else "unreadable")
                  for p, ok, f in items)
    return job_id


def test_a_probe_without_a_face_is_its_own_outcome_and_exit_code(settings):
    service = JobService(settings)
    mixed = _job(service, "org-a", items=[("/p/face.jpg", True, 1), ("/p/wall.jpg", True, 0)])
    view = service.get(mixed)
    assert view.no_face == [{"path": "/p/wall.jpg", "reason": "no face found"}]
    assert common.exit_code(view) == common.EXIT_OK

    none = service.get(_job(service, "org-a", items=[("/p/wall.jpg", True, 0), ("/p/sky.jpg", True, 0)]))
    assert [i["path"] for i in none.no_face] == ["/p/wall.jpg", "/p/sky.jpg"]
    assert common.exit_code(none) == common.EXIT_NO_FACE == 4
    # One probe unreadable, the other without a face: still no face anywhere.
    partly = service.get(_job(service, "org-a", items=[("/p/bad.jpg", False, 0), ("/p/sky.jpg", True, 0)],
                              state=JobState.PARTLY_FAILED))
    assert common.exit_code(partly) == common.EXIT_NO_FACE
    # Every probe unreadable: the job failed, which is not "no face".
    failed = service.get(_job(service, "org-a", items=[("/p/bad.jpg", False, 0)], state=JobState.FAILED))
    assert failed.no_face == [] and common.exit_code(failed) == common.EXIT_FAILED


def test_job_ids_resolve_by_unique_prefix_within_the_organisation(settings):
    service = JobService(settings)
    first = _job(service, "org-a", items=[], job_id="abcd1111" + "0" * 24)
    _job(service, "org-a", items=[], job_id="abcd2222" + "0" * 24)
    theirs = _job(service, "org-b", items=[], job_id="ffff3333" + "0" * 24)
    assert service.resolve_job_id(first, "org-a") == first
    assert service.resolve_job_id("ABCD1", "org-a") == first
    with pytest.raises(JobRefused, match="ambiguous"):
        service.resolve_job_id("abcd", "org-a")
    with pytest.raises(JobNotFound):
        service.resolve_job_id("ffff3", "org-a")  # another organisation's job: not found
    with pytest.raises(JobNotFound):
        service.resolve_job_id(theirs, "org-a")
    with pytest.raises(JobNotFound):
        service.resolve_job_id("abc", "org-a")  # too short to be a prefix
    assert service.resolve_job_id("ffff", "org-b") == theirs


def test_matches_read_one_per_line_at_80_columns(settings, monkeypatch):
    service = JobService(settings)
    job_id = _job(service, "org-a", items=[("/very/long/folder/name/for/probes/" + "p" * 30 + ".jpg", True, 1),
                                           ("/very/long/folder/name/for/probes/nothing-here.jpg", True, 0)])
    view = service.get(job_id)
    matches = [{"face_id": f"{n:08x}" + "e" * 24, "image_path": "/galleries/archive/deep/folder/" + "g" * 40 + f"{n}.jpg",
                "image_sha256": "0" * 64, "similarity": 0.91 - n / 100, "box": [1.0, 2.0, 3.0, 4.0],
                "false_match_rate": 1e-4, "false_match_rate_below_limit": False, "review": "unconfirmed"}
               for n in range(3)]
    results = [{"id": 17, "path": "/very/long/folder/name/for/probes/" + "p" * 30 + ".jpg", "face_no": 0,
                "box": [0, 0, 1, 1], "probability": 0.99, "quality": None, "not_searched": None, "matches": matches}]
    buffer = io.StringIO()
    monkeypatch.setattr(common, "out", Console(file=buffer, width=80, color_system=None))
    common.print_matches(view, results, as_json=False)
    text = buffer.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    for m in matches:
        # One line per match, with the short face id `review` takes and the file name (not the folder).
        rows = [line for line in lines if m["face_id"][:8] in line]
        assert len(rows) == 1, text
        assert f"{m['similarity']:.3f}" in rows[0] and "unconfirmed" in rows[0]
    assert "/galleries/archive" not in text and re.search(r"\b17\b", text)
    assert any("nothing-here.jpg" in line and "no face found" in line for line in lines), text
