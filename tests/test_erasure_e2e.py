"""Erasure that sticks, end to end: real API, real worker, real Redis, real Milvus Lite. Erased images stay
out of on-demand, CLI and nightly reindexing and of index jobs (the store's count shows it) until their
owner re-enrols them; another organisation cannot."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from facegate.queue import make_celery
from index import GalleryNotFound, GalleryStore
from scheduler.api import create_app
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from scheduler.tasks import run_nightly_reindex
from tests.conftest import PHOTOS, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, api_headers, env_for, run_cli, wait_for_api_job

pytestmark = pytest.mark.slow
LAB, ARCHIVE = "university-lab-example", "photo-archive-example"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server_url):
    tmp = tmp_path_factory.mktemp("erasure")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/15", milvus_uri=milvus.uri)
    redis_client(settings.broker_url).flushdb()
    folder = tmp / "galleries" / "lab"
    folder.mkdir(parents=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    worker = WorkerProcess(settings, tmp / "worker.log")
    celery = make_celery(settings)
    app = create_app(settings, CeleryTaskQueue(celery), collect_every_s=0.5)
    keys = {org: register(settings, org)[1] for org in (LAB, ARCHIVE)}
    with TestClient(app) as client:
        yield client, settings, keys, folder, celery
    worker.stop()
    celery.close()
    milvus.stop()


def _vectors(settings):
    store = GalleryStore(settings.milvus_uri)
    try:
        return store.count("lab") if store.has_gallery("lab") else 0
    except GalleryNotFound:
        return 0
    finally:
        store.close()


def test_erase_reindex_twice_then_re_enrol(stack):
    client, settings, keys, folder, celery = stack
    lab, archive = api_headers(keys[LAB]), api_headers(keys[ARCHIVE])
    assert client.post("/v1/galleries", json={"name": "lab", "folder": str(folder), "purpose": "research",
                                              "nightly": True}, headers=lab).status_code == 201
    job = client.post("/v1/jobs", json={"kind": "index", "gallery": "lab", "purpose": "research"}, headers=lab)
    assert wait_for_api_job(client, keys[LAB], job.json()["id"])["state"] == "done"
    assert _vectors(settings) == len(PHOTOS)

    first, second = (str((folder / p.name).resolve()) for p in PHOTOS[:2])
    erasure = client.post("/v1/erasures", json={"gallery": "lab", "paths": [first, second]}, headers=lab)
    assert wait_for_api_job(client, keys[LAB], erasure.json()["id"])["state"] == "done"
    left = len(PHOTOS) - 2
    assert _vectors(settings) == left

    # Reindexed on demand (API), by the CLI, by the nightly schedule, and indexed again: they stay erased.
    for _ in range(2):
        asked = client.post("/v1/jobs", json={"kind": "reindex", "gallery": "lab", "purpose": "research"}, headers=lab)
        done = wait_for_api_job(client, keys[LAB], asked.json()["id"])
        assert done["state"] == "done" and (done["params"]["new"], done["params"]["erased"]) == (0, 2)
        assert {i["path"] for i in done["not_indexed"]} == {first, second}
        assert all(f"by {LAB}" in i["reason"] and "facegate gallery enrol lab" in i["reason"]
                   for i in done["not_indexed"])
    env = env_for(settings, FACEGATE_API_KEY=keys[LAB])
    cli = run_cli(["reindex", "lab", "--json"], env)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["params"]["erased"] == 2
    nightly = run_nightly_reindex(settings, celery)["lab"]
    assert (nightly["new"], nightly["erased"]) == (0, 2)
    JobService(settings, CeleryTaskQueue(celery)).wait(nightly["job"], timeout_s=120)
    indexed = client.post("/v1/jobs", json={"kind": "index", "gallery": "lab", "purpose": "research"}, headers=lab)
    assert wait_for_api_job(client, keys[LAB], indexed.json()["id"])["state"] == "done"
    shown = client.get("/v1/galleries/lab", headers=lab).json()
    assert _vectors(settings) == left and shown["images"] == left and shown["erased_images"] == 2

    # Another organisation cannot re-enrol them: to it, the gallery does not exist.
    refused = client.post("/v1/galleries/lab/enrol", json={"paths": [first]}, headers=archive)
    assert refused.status_code == 404
    assert _vectors(settings) == left

    # The owner re-enrols one through the API and one through the CLI; both audited with its key.
    enrolled = client.post("/v1/galleries/lab/enrol", json={"paths": [first]}, headers=lab)
    assert enrolled.status_code == 200, enrolled.text
    assert [m["path"] for m in enrolled.json()["reenrolled"]] == [first]
    by_cli = run_cli(["gallery", "enrol", "lab", second], env)
    assert by_cli.returncode == 0 and "re-enrolled 1" in by_cli.stdout, by_cli.stderr
    rows = JobService(settings).audit.rows(event="gallery.reenrolled")
    assert [r.detail["images"][0]["path"] for r in rows] == [first, second]
    assert {r.organisation_id for r in rows} == {LAB} and all(r.api_key_id for r in rows)
    back = client.post("/v1/jobs", json={"kind": "reindex", "gallery": "lab", "purpose": "research"}, headers=lab)
    done = wait_for_api_job(client, keys[LAB], back.json()["id"])
    assert done["state"] == "done" and (done["params"]["new"], done["params"]["erased"]) == (2, 0)
    assert _vectors(settings) == len(PHOTOS)
    assert client.get("/v1/galleries/lab", headers=lab).json()["images"] == len(PHOTOS)


def test_the_cli_erases_and_the_erasure_sticks(stack):
    client, settings, keys, folder, celery = stack
    env = env_for(settings, FACEGATE_API_KEY=keys[LAB])
    target = str((folder / PHOTOS[2].name).resolve())
    before = _vectors(settings)
    erased = run_cli(["gallery", "erase", "lab", target, "--json"], env)
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["faces"] == 1 and _vectors(settings) == before - 1
    again = run_cli(["reindex", "lab", "--json"], env)
    assert again.returncode == 0 and json.loads(again.stdout)["params"]["erased"] == 1
    assert _vectors(settings) == before - 1
    stranger = run_cli(["gallery", "enrol", "lab", target], env_for(settings, FACEGATE_API_KEY=keys[ARCHIVE]))
    assert stranger.returncode == 2 and "no gallery" in stranger.stderr
    assert run_cli(["gallery", "erase", "lab"], env).returncode == 2  # nothing named: a one-line error
