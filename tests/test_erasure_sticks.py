"""Erasure that sticks: an erased image (by path, or a copy by content hash) stays out of every index and
reindex job until its owner re-enrols it, which is the owner's alone and audited.

The chunks are folded here as a worker's results would be (no worker: these tests look at what the
scheduler records and plans); tests/test_erasure_e2e.py walks the same through a real worker and Milvus."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.messages import ChunkResult, ItemOutcome
from facegate.queue import make_celery
from scheduler.access import AccessRefused, GalleryHidden
from scheduler.dispatch import CeleryTaskQueue
from scheduler.galleries import SYSTEM_PRINCIPAL, GalleryService
from scheduler.models import ErasedImage, JobChunk
from scheduler.service import JobRefused, JobService
from tests.conftest import PHOTOS, make_settings, register

LAB, ARCHIVE = "university-lab-example", "photo-archive-example"


@pytest.fixture
def lab_gallery(tmp_path, redis_url):
    """Gallery `lab` of three photos, registered and indexed (its chunks folded as a worker would answer)."""
    settings = make_settings(tmp_path, broker_url=redis_url)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    galleries = GalleryService(service)
    lab = register(settings, LAB)[0]
    folder = tmp_path / "galleries" / "lab"
    folder.mkdir(parents=True)
    for photo in PHOTOS[:3]:
        shutil.copy(photo, folder / photo.name)
    galleries.register(lab, "lab", folder, purpose="research", nightly=True)
    assert _run(service, service.submit_index(folder, "lab", lab, "research")).state == "done"
    yield settings, service, galleries, lab, folder
    app.close()


def _run(service, job):
    """Fold each chunk of `job` with the result a worker gives: one face per image indexed or erased."""
    with session_scope(service.db_url) as s:
        chunks = s.scalars(select(JobChunk).where(JobChunk.job_id == job.id)).all()
    for chunk in chunks:
        if chunk.whole_gallery:
            items = [ItemOutcome(path=f"gallery:{job.gallery}", ok=True, faces=0)]
        else:
            items = [ItemOutcome(path=p, ok=True, faces=1, image_sha256=sha256_file(p) if chunk.task == "index"
                                 else None) for p in chunk.paths]
        result = ChunkResult(job_id=job.id, chunk_no=chunk.chunk_no, kind=chunk.task, items=items,
                             model_version="untrained-seed0")
        service._fold(job.id, chunk.chunk_no, result.model_dump(mode="json"), None)
    return service.get(job.id)


def _reindex(service, galleries, lab):
    return _run(service, galleries.reindex("lab", principal=lab))


def test_an_erased_image_stays_erased_until_its_owner_re_enrols_it(lab_gallery):
    settings, service, galleries, lab, folder = lab_gallery
    erased = str((folder / PHOTOS[0].name).resolve())
    assert _run(service, galleries.erase(lab, "lab", paths=[erased])).state == "done"
    with session_scope(settings.resolved_database_url) as s:
        mark = s.get(ErasedImage, ("lab", erased))
        assert mark.erased_by == LAB and mark.image_sha256 == sha256_file(erased)
    for _ in range(2):  # reindexed twice: still erased
        job = _reindex(service, galleries, lab)
        assert job.state == "done" and (job.params["new"], job.params["erased"]) == (0, 1)
        assert [i["path"] for i in job.not_indexed] == [erased] and not job.errors
        reason = job.not_indexed[0]["reason"]
        assert f"by {LAB}" in reason and "erased on 20" in reason and f"facegate gallery enrol lab {erased}" in reason
    nightly = _run(service, galleries.reindex("lab", principal=SYSTEM_PRINCIPAL))
    assert nightly.params["erased"] == 1 and nightly.params["new"] == 0
    # An index job over the folder leaves it out too: an item that says so, never a chunk's path.
    indexed = service.submit_index(folder, "lab", lab, "research")
    assert indexed.total_items == 3 and indexed.params["erased"] == 1
    with session_scope(settings.resolved_database_url) as s:
        sent = [p for c in s.scalars(select(JobChunk).where(JobChunk.job_id == indexed.id)) for p in c.paths]
    assert erased not in sent and len(sent) == 2
    _run(service, indexed)
    # A copy under another name is the same image: left out by its content hash.
    copy = folder / "renamed.jpg"
    shutil.copy(erased, copy)
    job = _reindex(service, galleries, lab)
    assert job.params["erased"] == 2
    assert "the same image as " + erased in next(i["reason"] for i in job.not_indexed if i["path"] == str(copy))
    info = galleries.show(lab, "lab")
    assert (info.images, info.erased_images) == (2, 1)

    # Another organisation cannot re-enrol, granted or not; every refusal is audited naming it.
    archive = register(settings, ARCHIVE)[0]
    with pytest.raises(GalleryHidden):
        galleries.enrol(archive, "lab", [erased])
    galleries.grant(lab, "lab", ARCHIVE)
    with pytest.raises(AccessRefused, match="re-enrol"):
        galleries.enrol(archive, "lab", [erased])
    refused = [r for r in service.audit.rows(organisation_id=ARCHIVE, event="access.refused")
               if r.detail.get("action") == "enrol"]
    assert len(refused) == 2
    with pytest.raises(JobRefused, match="no erased image"):
        galleries.enrol(lab, "lab", [str(folder / PHOTOS[1].name)])

    # The owner re-enrols it, naming the copy: found by content, audited with organisation and key.
    removed = galleries.enrol(lab, "lab", [str(copy)])
    assert [m["path"] for m in removed] == [erased]
    row = service.audit.rows(event="gallery.reenrolled")[-1]
    assert row.organisation_id == LAB and row.api_key_id == lab.key_id and row.detail["images"][0]["path"] == erased
    decided = [r for r in service.audit.rows(organisation_id=LAB, event="access.decision")
               if r.capability == "enrol"]
    assert decided and decided[-1].allowed and decided[-1].api_key_id == lab.key_id
    back = _reindex(service, galleries, lab)
    assert (back.params["new"], back.params["erased"]) == (2, 0)
    info = galleries.show(lab, "lab")
    assert (info.images, info.erased_images) == (4, 0)


def test_a_whole_gallery_erasure_keeps_every_image_out_and_a_folder_re_enrols_them(lab_gallery):
    settings, service, galleries, lab, folder = lab_gallery
    assert _run(service, galleries.erase(lab, "lab")).state == "done"
    job = _reindex(service, galleries, lab)
    assert (job.params["new"], job.params["erased"]) == (0, 3) and galleries.show(lab, "lab").images == 0
    assert len(galleries.enrol(lab, "lab", [str(folder)])) == 3
    assert _reindex(service, galleries, lab).params["new"] == 3


def test_retiring_a_generation_or_deleting_files_marks_nothing(lab_gallery):
    settings, service, galleries, lab, folder = lab_gallery
    (folder / PHOTOS[0].name).unlink()
    job = _reindex(service, galleries, lab)  # the reindex erases the deleted file's vectors
    assert job.params["deleted"] == 1
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalars(select(ErasedImage)).all() == []
    shutil.copy(PHOTOS[0], folder / PHOTOS[0].name)  # put back: new again, not erased
    assert _reindex(service, galleries, lab).params["new"] == 1


def test_deleting_a_gallery_forgets_its_erased_marks(lab_gallery):
    settings, service, galleries, lab, folder = lab_gallery
    _run(service, galleries.erase(lab, "lab", paths=[str(folder / PHOTOS[0].name)]))
    _run(service, galleries.delete(lab, "lab"))
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalars(select(ErasedImage)).all() == []
