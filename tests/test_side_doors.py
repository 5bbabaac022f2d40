"""The gate's side doors, walked end to end and shown shut: real API, real worker, real Redis, Milvus Lite.

Each door: the vectors in Milvus before and after, and an audit row naming whoever asked.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from facegate.db import session_scope
from facegate.messages import ERASE_CHUNK_TASK, INDEX_CHUNK_TASK, EraseChunk, IndexChunk
from facegate.queue import make_celery
from index import GalleryNotFound, GalleryStore
from scheduler.api import create_app
from scheduler.dispatch import CeleryTaskQueue
from scheduler.models import Gallery
from scheduler.service import JobService
from scheduler.tasks import run_nightly_reindex
from tests.conftest import PHOTOS, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, api_headers, env_for, run_cli, wait_for_api_job

pytestmark = pytest.mark.slow
LAB, ARCHIVE, POLICE = "university-lab-example", "photo-archive-example", "city-police-example"


@pytest.fixture(scope="module")
def doors(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("doors")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/12", milvus_uri=milvus.uri,
                             max_request_bytes=2 * 1024 * 1024)
    redis_client(settings.broker_url).flushdb()
    folders = {}
    for name in ("lab_photos", "police_photos", "archive_photos"):
        folders[name] = tmp / "galleries" / name
        folders[name].mkdir(parents=True)
        for photo in PHOTOS[:2]:
            shutil.copy(photo, folders[name] / photo.name)
    worker = WorkerProcess(settings, tmp / "worker.log")
    celery = make_celery(settings)
    app = create_app(settings, CeleryTaskQueue(celery), collect_every_s=0.5)
    keys = {org: register(settings, org)[1] for org in (LAB, ARCHIVE, POLICE)}
    with TestClient(app) as client:
        yield client, settings, keys, folders, celery
    worker.stop()
    celery.close()
    milvus.stop()


_h = api_headers
_wait = wait_for_api_job


def _vectors(settings, collection):
    store = GalleryStore(settings.milvus_uri)
    try:
        return store.count(collection) if store.has_gallery(collection) else 0
    except GalleryNotFound:
        return 0
    finally:
        store.close()


def _refusals(settings, organisation_id, since_seq=0, event=None):
    rows = JobService(settings).audit.rows(organisation_id=organisation_id)
    return [r for r in rows if r.seq > since_seq and r.allowed is False and (event is None or r.event == event)]


def _last_seq(settings):
    head = JobService(settings).audit.head()
    return head[0] if head else 0


def _indexed(client, keys, folders, org, name, purpose):
    token = keys[org]
    created = client.post("/v1/galleries", json={"name": name, "folder": str(folders[f"{name}_photos"]),
                                                 "purpose": purpose, "nightly": True}, headers=_h(token))
    assert created.status_code == 201, created.text
    job = client.post("/v1/jobs", json={"kind": "index", "gallery": name, "purpose": purpose}, headers=_h(token))
    assert job.status_code == 202, job.text
    assert _wait(client, token, job.json()["id"])["state"] == "done"


def test_police_key_cannot_register_index_or_reindex_during_the_moratorium(doors):
    client, settings, keys, folders, celery = doors
    police = _h(keys[POLICE])
    mark = _last_seq(settings)
    # Registering takes a decision now.
    registered = client.post("/v1/galleries", json={"name": "police", "folder": str(folders["police_photos"]),
                                                    "purpose": "criminal-investigation", "nightly": True},
                             headers=police)
    assert registered.status_code == 403 and "moratorium" in registered.json()["detail"]
    indexed = client.post("/v1/jobs", json={"kind": "index", "gallery": "police", "purpose": "criminal-investigation",
                                            "folder": str(folders["police_photos"])}, headers=police)
    assert indexed.status_code == 403
    # A gallery the police registered before the moratorium (as a restored database would hold it).
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="police", owner=POLICE, folder=str(folders["police_photos"]), nightly=True,
                      purpose="criminal-investigation"))
    before = _vectors(settings, "police")
    reindexed = client.post("/v1/jobs", json={"kind": "reindex", "gallery": "police",
                                              "purpose": "criminal-investigation"}, headers=police)
    assert reindexed.status_code == 403 and reindexed.json()["rule_ids"] == ["rekognition-police-moratorium"]
    cli = run_cli(["reindex", "police"], env_for(settings, FACEGATE_API_KEY=keys[POLICE]))
    assert cli.returncode == 3 and "moratorium" in cli.stderr
    # The nightly schedule runs as the system submitter, on the owner's behalf: refused, naming the owner.
    summary = run_nightly_reindex(settings, celery)["police"]
    assert summary["state"] == "refused" and "city-police-example" in summary["error"]
    time.sleep(2)
    assert _vectors(settings, "police") == before == 0
    refusals = _refusals(settings, POLICE, mark)
    assert {"job.refused", "policy.decision"} <= {r.event for r in refusals}
    owner_rows = [r for r in refusals if r.event == "policy.decision" and r.detail.get("requested_by") ==
                  "facegate-system"]
    assert owner_rows and owner_rows[0].rule_ids == ["rekognition-police-moratorium"]
    system_refused = [r for r in _refusals(settings, "facegate-system", mark, "job.refused")
                      if r.gallery == "police"]
    assert system_refused and system_refused[0].detail["on_behalf_of"] == POLICE
    # Register, index, reindex by API and by CLI: each decided for the police key that asked.
    asked = [r for r in refusals if r.event == "policy.decision" and "requested_by" not in r.detail]
    assert len(asked) == 4 and all(r.api_key_id == keys[POLICE].split("_")[1] for r in asked)
    assert {r.detail["action"] for r in asked} == {"register", "index", "reindex"}


def test_a_ticket_replayed_with_other_work_is_refused_and_audited(doors):
    client, settings, keys, folders, celery = doors
    _indexed(client, keys, folders, ARCHIVE, "archive", "photo-library")
    service = JobService(settings, CeleryTaskQueue(celery))
    lab, _ = register(settings, LAB)
    # A ticket exactly as the scheduler signs it, for chunk 0 of a lab job indexing one photo into `lab_a`.
    admission = service.gate.admit(lab, "index", "research", job_id="replayed", gallery="lab_a")
    original = IndexChunk(job_id="replayed", chunk_no=0, gallery="lab_a", paths=[str(PHOTOS[0])])
    ticket = admission.ticket_for(original)
    victim = _vectors(settings, "archive")
    assert victim > 0
    mark = _last_seq(settings)
    replays = {
        "gallery": IndexChunk(job_id="replayed", chunk_no=0, gallery="archive", paths=[str(PHOTOS[0])]),
        "generation": IndexChunk(job_id="replayed", chunk_no=0, gallery="lab_a", generation=1,
                                 paths=[str(PHOTOS[0])]),
        "chunk": IndexChunk(job_id="replayed", chunk_no=1, gallery="lab_a", paths=[str(PHOTOS[0])]),
        "paths": IndexChunk(job_id="replayed", chunk_no=0, gallery="lab_a", paths=[str(PHOTOS[1])]),
    }
    for what, message in replays.items():
        message.ticket = ticket
        result = celery.send_task(INDEX_CHUNK_TASK, args=[message.model_dump(mode="json")]).get(timeout=300)
        assert result["refused"] and "does not match its ticket" in result["refused"], what
    erase = EraseChunk(job_id="replayed", chunk_no=0, gallery="archive", whole_gallery=True, ticket=ticket)
    result = celery.send_task(ERASE_CHUNK_TASK, args=[erase.model_dump(mode="json")]).get(timeout=300)
    assert result["refused"]
    forged = IndexChunk(job_id="never-made", chunk_no=0, gallery="archive", paths=[str(PHOTOS[0])],
                        ticket="eyJvcmdhbmlzYXRpb25faWQiOiJtYWxsb3J5In0.AAAA")
    assert celery.send_task(INDEX_CHUNK_TASK, args=[forged.model_dump(mode="json")]).get(timeout=300)["refused"]
    assert _vectors(settings, "archive") == victim and _vectors(settings, "lab_a") == 0
    rows = [r for r in JobService(settings).audit.rows(event="task.refused_at_execution") if r.seq > mark]
    assert len(rows) == len(replays) + 2
    assert sum(r.organisation_id == LAB for r in rows) == len(replays) + 1
    unknown = next(r for r in rows if r.job_id == "never-made")
    assert unknown.organisation_id == "unverified" and unknown.detail["claimed_organisation"] == "mallory"
    # The control: the original message with its own ticket runs.
    original.ticket = ticket
    assert not celery.send_task(INDEX_CHUNK_TASK, args=[original.model_dump(mode="json")]).get(timeout=300)["refused"]
    assert _vectors(settings, "lab_a") > 0


def test_uploads_and_registered_folders_belong_to_their_organisation(doors):
    client, settings, keys, folders, _ = doors
    _indexed(client, keys, folders, LAB, "lab", "research")
    lab, archive, police = _h(keys[LAB]), _h(keys[ARCHIVE]), _h(keys[POLICE])
    files = [("files", (PHOTOS[0].name, PHOTOS[0].read_bytes(), "image/jpeg"))]
    search = client.post("/v1/jobs/uploads", data={"gallery": "lab", "purpose": "research", "threshold": "0"},
                         files=files, headers=lab)
    assert search.status_code == 202, search.text
    done = _wait(client, keys[LAB], search.json()["id"])
    assert done["state"] == "done"
    upload_folder = done["params"]["upload_folder"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not JobService(settings).audit.rows(job_id=done["id"],
                                                                             event="uploads.removed"):
        time.sleep(0.3)
    assert not (settings.uploads_dir / LAB).joinpath(upload_folder).exists()
    # The search's audit row names each probe by its digest, and the generation searched.
    finished = JobService(settings).audit.rows(job_id=done["id"], event="job.finished")[0].detail
    assert finished["generation"] == 0 and len(finished["probe_images"][0]["sha256"]) == 64

    # A probe left in the lab's uploads is not the archive's to read, as probe or as gallery.
    kept = settings.uploads_for(LAB) / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copy(PHOTOS[0], kept / "p.jpg")
    mark = _last_seq(settings)
    _indexed(client, keys, folders, ARCHIVE, "archive", "photo-library") if not client.get(
        "/v1/galleries/archive", headers=archive).status_code == 200 else None
    as_probe = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive", "purpose": "photo-library",
                                             "probes": [str(kept / "p.jpg")]}, headers=archive)
    assert as_probe.status_code == 422 and "outside" in as_probe.json()["detail"]
    as_gallery = client.post("/v1/jobs", json={"kind": "index", "gallery": "archive2", "purpose": "photo-library",
                                               "folder": str(kept)}, headers=archive)
    assert as_gallery.status_code == 422
    # The lab's registered folder cannot be indexed or probed by the archive either.
    before = _vectors(settings, "archive")
    foreign = client.post("/v1/jobs", json={"kind": "index", "gallery": "archive", "purpose": "photo-library",
                                            "folder": str(folders["lab_photos"])}, headers=archive)
    assert foreign.status_code == 422 and str(folders["lab_photos"]) in foreign.json()["detail"]
    probe = client.post("/v1/jobs", json={"kind": "search", "gallery": "archive", "purpose": "photo-library",
                                          "probes": [str(folders["lab_photos"] / PHOTOS[0].name)]}, headers=archive)
    assert probe.status_code == 422
    assert _vectors(settings, "archive") == before
    assert len(_refusals(settings, ARCHIVE, mark, "access.refused")) >= 4
    # A refused upload (the police under the moratorium) is deleted at once.
    denied = client.post("/v1/jobs/uploads", data={"gallery": "lab", "purpose": "criminal-investigation"},
                         files=files, headers=police)
    assert denied.status_code in (403, 404)
    assert not any((settings.uploads_for(POLICE)).glob("*/*"))


def test_a_grant_lets_the_grantee_search_and_nothing_more_until_revoked(doors):
    client, settings, keys, folders, _ = doors
    lab, archive = _h(keys[LAB]), _h(keys[ARCHIVE])
    if client.get("/v1/galleries/lab", headers=lab).status_code != 200:
        _indexed(client, keys, folders, LAB, "lab", "research")
    assert client.post("/v1/galleries/lab/grants", json={"organisation_id": ARCHIVE}, headers=lab).status_code == 204
    assert [g["organisation_id"] for g in client.get("/v1/galleries/lab/grants", headers=lab).json()] == [ARCHIVE]
    before = _vectors(settings, "lab")
    searched = client.post("/v1/jobs", json={"kind": "search", "gallery": "lab", "purpose": "photo-library",
                                             "probes": [str(PHOTOS[0])]}, headers=archive)
    assert searched.status_code == 202, searched.text
    assert _wait(client, keys[ARCHIVE], searched.json()["id"])["state"] == "done"
    mark = _last_seq(settings)
    assert client.post("/v1/jobs", json={"kind": "reindex", "gallery": "lab", "purpose": "photo-library"},
                       headers=archive).status_code == 403
    assert client.post("/v1/erasures", json={"gallery": "lab", "whole_gallery": True},
                       headers=archive).status_code == 403
    assert client.delete("/v1/galleries/lab", headers=archive).status_code == 403
    assert client.post("/v1/galleries/lab/grants", json={"organisation_id": POLICE},
                       headers=archive).status_code == 403
    refused = _refusals(settings, ARCHIVE, mark, "access.refused")
    assert {r.detail["action"] for r in refused} == {"reindex", "erase", "grant"}
    assert _vectors(settings, "lab") == before
    assert client.delete(f"/v1/galleries/lab/grants/{ARCHIVE}", headers=lab).status_code == 204
    after = client.post("/v1/jobs", json={"kind": "search", "gallery": "lab", "purpose": "photo-library",
                                          "probes": [str(PHOTOS[0])]}, headers=archive)
    assert after.status_code == 404
    events = [r.event for r in JobService(settings).audit.rows(organisation_id=LAB) if r.gallery == "lab"]
    assert "gallery.granted" in events and "gallery.grant_revoked" in events


def test_bad_inputs_get_clear_problems_not_500s(doors):
    client, settings, keys, folders, _ = doors
    lab = _h(keys[LAB])
    nul = client.post("/v1/jobs", json={"kind": "index", "gallery": "lab", "purpose": "research",
                                        "folder": str(folders["lab_photos"]) + "\u0000x"}, headers=lab)
    assert nul.status_code == 422 and "NUL" in nul.json()["detail"]
    newline = client.post("/v1/jobs", json={"kind": "index", "gallery": "lab\n", "purpose": "research",
                                            "folder": str(folders["lab_photos"])}, headers=lab)
    assert newline.status_code == 422 and "not valid" in newline.json()["detail"]
    reviewer = client.post("/v1/jobs/x/results/1/reviews", json={"face_id": "f", "decision": "confirmed",
                                                                 "reviewer": "   "}, headers=lab)
    # The job id is resolved first (a unique prefix works): an unknown job is a 404 problem, not a 500.
    assert reviewer.status_code == 404 and reviewer.headers["content-type"] == "application/problem+json"

    def stream():
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    streamed = client.post("/v1/jobs/uploads", content=stream(),
                           headers={**lab, "content-type": "multipart/form-data; boundary=zz"})
    assert streamed.status_code == 413 and streamed.headers["content-type"] == "application/problem+json"


def test_more_upload_files_than_the_parsers_default_cap(tmp_path):
    settings = make_settings(tmp_path, max_upload_files=1200, max_request_bytes=50 * 1024 * 1024)
    app = create_app(settings, None, collect_every_s=None)
    _, token = register(settings, LAB)
    files = [("files", (f"{n}.jpg", b"x", "image/jpeg")) for n in range(1100)]
    with TestClient(app) as client:
        answer = client.post("/v1/jobs/uploads", data={"gallery": "nothing", "purpose": "research"}, files=files,
                             headers=_h(token))
        assert answer.status_code == 404, answer.text[:300]  # parsed all 1100, then: no such gallery
        too_many = [("files", (f"{n}.jpg", b"x", "image/jpeg")) for n in range(1201)]
        assert client.post("/v1/jobs/uploads", data={"gallery": "nothing", "purpose": "research"}, files=too_many,
                           headers=_h(token)).status_code == 413
    assert not any(settings.uploads_for(LAB).glob("*/*"))  # nothing left behind


def test_gallery_names_are_per_organisation(doors):
    client, settings, keys, folders, _ = doors
    lab, archive = _h(keys[LAB]), _h(keys[ARCHIVE])
    extra = folders["lab_photos"].parent / "archive_second"
    extra.mkdir(exist_ok=True)
    shutil.copy(PHOTOS[2], extra / PHOTOS[2].name)
    mine = folders["lab_photos"].parent / "lab_second"
    mine.mkdir(exist_ok=True)
    shutil.copy(PHOTOS[3], mine / PHOTOS[3].name)
    assert client.post("/v1/galleries", json={"name": "casework", "folder": str(extra), "purpose": "photo-library"},
                       headers=archive).status_code == 201
    # The same name for another organisation: no 409, nothing learnt about the archive's names.
    created = client.post("/v1/galleries", json={"name": "casework", "folder": str(mine), "purpose": "research"},
                          headers=lab)
    assert created.status_code == 201, created.text
    again = client.post("/v1/galleries", json={"name": "casework", "folder": str(mine), "purpose": "research"},
                        headers=lab)
    assert again.status_code == 409 and "your organisation" in again.json()["detail"]
    for token, org in ((lab, LAB), (archive, ARCHIVE)):
        shown = client.get("/v1/galleries/casework", headers=token).json()
        assert shown["owner"] == org and shown["name"] == "casework"
    purposes = {LAB: "research", ARCHIVE: "photo-library"}
    for org in (LAB, ARCHIVE):
        job = client.post("/v1/jobs", json={"kind": "index", "gallery": "casework", "purpose": purposes[org]},
                          headers=_h(keys[org]))
        assert job.status_code == 202, job.text
        done = _wait(client, keys[org], job.json()["id"])
        assert done["state"] == "done" and done["gallery"] == "casework"
    with session_scope(settings.resolved_database_url) as s:
        stored = {g.owner: g.name for g in s.query(Gallery).filter(Gallery.label == "casework")}
    assert stored[ARCHIVE] != stored[LAB]
    assert _vectors(settings, stored[ARCHIVE]) > 0 and _vectors(settings, stored[LAB]) > 0
    found = client.post("/v1/jobs", json={"kind": "search", "gallery": "casework", "purpose": "research",
                                          "probes": [str(mine / PHOTOS[3].name)], "threshold": 0.0}, headers=lab)
    results = client.get(f"/v1/jobs/{_wait(client, keys[LAB], found.json()['id'])['id']}/results",
                         headers=lab).json()
    assert {m["image_path"] for p in results["items"] for m in p["matches"]} == {str(mine / PHOTOS[3].name)}


def test_the_api_offers_the_audit_head_and_signed_checkpoints(doors):
    client, settings, keys, _, _ = doors
    lab = _h(keys[LAB])
    head = client.get("/v1/audit/head", headers=lab).json()
    assert head["ok"] and head["rows"] > 0 and len(head["head_hash"]) == 64
    checkpoint = client.post("/v1/audit/checkpoints", headers=lab)
    assert checkpoint.status_code == 201
    body = checkpoint.json()
    assert client.post("/v1/audit/verify", json={"checkpoint": body}, headers=lab).json()["ok"]
    forged = {**body, "rows": body["rows"] + 1}
    refused = client.post("/v1/audit/verify", json={"checkpoint": forged}, headers=lab).json()
    assert not refused["ok"] and "signature" in refused["reason"]
    assert client.get("/v1/audit/head").status_code == 401


def test_grants_through_the_cli(doors):
    client, settings, keys, folders, _ = doors
    if client.get("/v1/galleries/lab", headers=_h(keys[LAB])).status_code != 200:
        _indexed(client, keys, folders, LAB, "lab", "research")
    owner = env_for(settings, FACEGATE_API_KEY=keys[LAB])
    grantee = env_for(settings, FACEGATE_API_KEY=keys[ARCHIVE])
    assert run_cli(["gallery", "grant", "lab", ARCHIVE], owner).returncode == 0
    listed = run_cli(["gallery", "grants", "lab", "--json"], owner)
    assert listed.returncode == 0 and [g["organisation_id"] for g in json.loads(listed.stdout)] == [ARCHIVE]
    onward = run_cli(["gallery", "grant", "lab", POLICE], grantee)
    assert onward.returncode == 3 and "grant" in onward.stderr
    assert run_cli(["gallery", "revoke", "lab", ARCHIVE], owner).returncode == 0
    assert run_cli(["gallery", "grants", "lab", "--json"], owner).stdout.strip() == "[]"
    gone = run_cli(["gallery", "grants", "lab"], grantee)
    assert gone.returncode == 2 and "no gallery" in gone.stderr
