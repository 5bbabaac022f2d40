"""Labels that stay with their images, and faces deleted by id that stay deleted, through the worker's path:
the scheduler submits (API-less, as every entry point does) and records each chunk's message; the worker's
chunk functions run those very messages (real detection, a real Milvus Lite file); the results are folded.

- An image's external id is kept in the database and carried by every index chunk of it: an image changed and
  reindexed, on demand or by the nightly schedule, still carries it, and so do its matches.
- A folder's sidecar file `external_ids.csv` gives labels to `facegate index` and to reindexing; its paths
  must lie inside the folder.
- A face deleted by id does not come back when its image changes and is reindexed, while its other faces do."""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image
from sqlalchemy import select

from facegate.db import session_scope
from facegate.messages import EraseChunk, IndexChunk, SearchChunk
from facegate.queue import make_celery
from index import GalleryStore
from scheduler.dispatch import CeleryTaskQueue
from scheduler.galleries import SYSTEM_PRINCIPAL, GalleryService
from scheduler.labels import SIDECAR
from scheduler.models import ErasedFace, ImageLabel, JobChunk, JobItem
from scheduler.service import JobRefused, JobService
from tests.conftest import MULTIFACE, PHOTOS, make_settings, register
from workers.chunks import box_iou, run_erase_chunk, run_index_chunk, run_search_chunk

LAB = "university-lab-example"


@pytest.fixture
def lab(tmp_path, redis_url, pipeline):
    settings = make_settings(tmp_path, broker_url=redis_url)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    store = GalleryStore(str(tmp_path / "milvus.db"))
    folder = tmp_path / "galleries" / "lab"
    folder.mkdir(parents=True)
    yield settings, service, GalleryService(service), register(settings, LAB)[0], folder, store, pipeline
    store.close()
    app.close()


def _work(service, job, pipeline, store):
    """Each chunk's recorded message run by the worker's own chunk functions, then folded."""
    with session_scope(service.db_url) as s:
        chunks = [(c.chunk_no, c.message) for c in s.scalars(select(JobChunk).where(JobChunk.job_id == job.id))]
    roots = service.settings.roots_for(job.submitter)
    for chunk_no, message in chunks:
        if message["kind"] == "index":
            result = run_index_chunk(IndexChunk.model_validate(message), pipeline, store, roots)
        elif message["kind"] == "erase":
            result = run_erase_chunk(EraseChunk.model_validate(message), store)
        else:
            result = run_search_chunk(SearchChunk.model_validate(message), pipeline, store, roots)
        service._fold(job.id, chunk_no, result.model_dump(mode="json"), None)
    return service.get(job.id)


def _change(image):
    """New content (a new hash), the same people in the same places: a mark in one corner."""
    with Image.open(image) as opened:
        changed = opened.convert("RGB")
    changed.paste((255, 0, 0), (0, 0, 6, 6))
    changed.save(image, "JPEG", quality=92)


def _faces(store, gallery="lab"):
    return store.list_faces(gallery, limit=100)


def test_a_label_survives_a_changed_image_reindexed_and_comes_with_its_matches(lab, tmp_path):
    settings, service, galleries, principal, folder, store, pipeline = lab
    first, second, third = (folder / p.name for p in PHOTOS[:3])
    shutil.copy(PHOTOS[0], first)
    shutil.copy(PHOTOS[1], second)
    (folder / SIDECAR).write_text(f"path,external_id\n{first.name},case-17\n")
    galleries.register(principal, "lab", folder, purpose="research", nightly=True)
    # The folder's sidecar file and the request's mapping, both.
    job = _work(service, service.submit_index(folder, "lab", principal, "research",
                                              external_ids={second.name: "case-18"}), pipeline, store)
    assert job.state == "done" and job.params["external_ids"] == 2
    assert {f.image_path: f.external_id for f in _faces(store)} == {str(first): "case-17", str(second): "case-18"}
    with session_scope(settings.resolved_database_url) as s:
        assert {r.path: r.external_id for r in s.scalars(select(ImageLabel))} == {
            str(first): "case-17", str(second): "case-18"}

    # Both images change; reindexed on demand, their new faces carry the labels (the sidecar says nothing of
    # the second: its label comes from the database, where the request's mapping left it).
    old_ids = {f.face_id for f in _faces(store)}
    _change(first)
    _change(second)
    job = _work(service, galleries.reindex("lab", principal=principal), pipeline, store)
    assert job.state == "done" and job.params["changed"] == 2
    faces = _faces(store)
    assert not old_ids & {f.face_id for f in faces}
    assert {f.image_path: f.external_id for f in faces} == {str(first): "case-17", str(second): "case-18"}
    probe = tmp_path / "galleries" / "probe.jpg"
    shutil.copy(first, probe)
    found = _work(service, service.submit_search([probe], "lab", principal, "research", threshold=0.9),
                  pipeline, store)
    best = service.probe_results(found.id)[0]["matches"][0]
    assert best["image_path"] == str(first) and best["external_id"] == "case-17"

    # The nightly reindex reads the sidecar too: a new image labelled there is indexed with its label.
    shutil.copy(PHOTOS[2], third)
    (folder / SIDECAR).write_text(f"path,external_id\n{first.name},case-17\n\"{third.name}\",\"case-19, b\"\n")
    nightly = _work(service, galleries.reindex("lab", principal=SYSTEM_PRINCIPAL), pipeline, store)
    assert nightly.state == "done" and nightly.params["new"] == 1
    assert {f.image_path: f.external_id for f in _faces(store)}[str(third)] == "case-19, b"


def test_a_sidecar_path_outside_its_folder_or_a_bad_line_is_refused_naming_it(lab):
    settings, service, galleries, principal, folder, store, pipeline = lab
    shutil.copy(PHOTOS[0], folder / PHOTOS[0].name)
    (folder / SIDECAR).write_text("path,external_id\n../../outside.jpg,x\n")
    with pytest.raises(JobRefused, match=r"line 2: '../../outside.jpg' does not lie inside"):
        service.submit_index(folder, "lab", principal, "research")
    (folder / SIDECAR).write_text(f"path,external_id\n{PHOTOS[0].name},\n")
    with pytest.raises(JobRefused, match="must be 1 to 255 characters"):
        service.submit_index(folder, "lab", principal, "research")
    (folder / SIDECAR).write_text("file,label\n")
    with pytest.raises(JobRefused, match="header `path,external_id`"):
        service.submit_index(folder, "lab", principal, "research")


def test_a_face_deleted_by_id_stays_deleted_when_its_image_changes_and_is_reindexed(lab):
    settings, service, galleries, principal, folder, store, pipeline = lab
    group = folder / MULTIFACE.name
    shutil.copy(MULTIFACE, group)
    shutil.copy(PHOTOS[0], folder / PHOTOS[0].name)
    galleries.register(principal, "lab", folder, purpose="research", nightly=True)
    assert _work(service, service.submit_index(folder, "lab", principal, "research"), pipeline, store).state == "done"
    in_group = sorted((f for f in _faces(store) if f.image_path == str(group)), key=lambda f: f.face_no)
    assert len(in_group) == 6
    deleted = in_group[2]
    erasure = _work(service, galleries.erase_face(principal, "lab", deleted.face_id), pipeline, store)
    assert erasure.state == "done"
    with session_scope(settings.resolved_database_url) as s:
        mark = s.scalars(select(ErasedFace)).one()
        assert (mark.path, mark.face_id, mark.erased_by, mark.job_id) == (str(group), deleted.face_id, LAB,
                                                                           erasure.id)
    audited = [r for r in service.audit.rows(event="job.finished") if r.job_id == erasure.id]
    assert audited and audited[0].organisation_id == LAB

    _change(group)
    for by in (principal, SYSTEM_PRINCIPAL):  # on demand, then nightly (nothing changed then)
        job = _work(service, galleries.reindex("lab", principal=by), pipeline, store)
        assert job.state == "done", job.errors
    again = [f for f in _faces(store) if f.image_path == str(group)]
    # The other five faces are indexed from the new content; the deleted one is not, at any place near it.
    assert len(again) == 5 and deleted.face_id not in {f.face_id for f in again}
    assert all(box_iou(f.box, deleted.box) < 0.5 for f in again)
    with session_scope(settings.resolved_database_url) as s:
        item = s.scalars(select(JobItem).where(JobItem.path == str(group), JobItem.reason.is_not(None))).one()
        # (Detection numbers the faces of the new content afresh: the one left out is the one at that place.)
        assert item.ok and item.faces == 5 and re.fullmatch(r"face \d not indexed: deleted by id before", item.reason)
        chunk = s.scalars(select(JobChunk).where(JobChunk.task == "index").order_by(JobChunk.sent_at.desc())).first()
        assert chunk.message["erased_boxes"] == {str(group): [list(deleted.box)]}
    assert galleries.show(principal, "lab").faces == 6  # five in the group, one in the other photo
