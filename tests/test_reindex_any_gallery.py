"""Every gallery can be reindexed, however it was made: an index job records its folder on a gallery that
has none, and a reindex looks again at every image the gallery holds, wherever it lies."""

from __future__ import annotations

import os
import shutil

import pytest

from facegate.db import session_scope
from facegate.files import sha256_file
from facegate.queue import make_celery
from scheduler.dispatch import CeleryTaskQueue
from scheduler.galleries import GalleryExists, GalleryService
from scheduler.models import Gallery, GalleryImage
from scheduler.service import JobRefused, JobService
from tests.conftest import MULTIFACE, PHOTOS, make_settings, register


@pytest.fixture
def queued(tmp_path, redis_url):
    """A service that queues into a real Redis; no worker: these tests look at what is recorded and planned."""
    settings = make_settings(tmp_path, broker_url=redis_url)
    app = make_celery(settings)
    service = JobService(settings, CeleryTaskQueue(app))
    yield settings, service, register(settings)[0]
    app.close()


def _folder(tmp_path, name, photos):
    folder = tmp_path / "galleries" / name
    folder.mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return folder


def _gallery(settings, key):
    with session_scope(settings.resolved_database_url) as s:
        return s.get(Gallery, key)


def test_an_index_job_records_its_folder_on_a_gallery_that_has_none(tmp_path, queued):
    settings, service, lab = queued
    first = _folder(tmp_path, "first", PHOTOS[:2])
    second = _folder(tmp_path, "second", PHOTOS[2:3])
    service.submit_index(first, "adhoc", lab, "research")
    assert _gallery(settings, "adhoc").folder == str(first.resolve())
    # A second folder indexed into it later does not replace the one it has.
    service.submit_index(second, "adhoc", lab, "research")
    assert _gallery(settings, "adhoc").folder == str(first.resolve())
    # Registering the same name again says how to reindex it instead.
    with pytest.raises(GalleryExists, match="facegate reindex adhoc"):
        GalleryService(service).register(lab, "adhoc", second, purpose="research")


def test_a_folder_inside_another_gallerys_is_not_recorded(tmp_path, queued):
    settings, service, lab = queued
    outer = _folder(tmp_path, "outer", PHOTOS[:1])
    inner = _folder(tmp_path / "galleries" / "outer", "inner", PHOTOS[1:2])
    GalleryService(service).register(lab, "registered", outer, purpose="research")
    service.submit_index(inner, "inside", lab, "research")
    assert _gallery(settings, "inside").folder is None  # one folder, one gallery: left unrecorded
    assert _gallery(settings, "registered").folder == str(outer.resolve())


def _inventory(settings, gallery, path, *, touched=False):
    stat = path.stat()
    with session_scope(settings.resolved_database_url) as s:
        s.add(GalleryImage(gallery=gallery, path=str(path.resolve()), image_sha256=sha256_file(path), faces=1,
                           size=stat.st_size, mtime_ns=stat.st_mtime_ns - (1 if touched else 0)))


def test_a_reindex_without_a_folder_looks_at_the_images_the_gallery_holds(tmp_path, queued):
    settings, service, lab = queued
    folder = _folder(tmp_path, "loose", PHOTOS[:4])
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="loose", label="loose", owner=lab.organisation_id, purpose="research"))
    same, touched, changed, gone = (folder / p.name for p in PHOTOS[:4])
    for path in (same, touched, changed, gone):
        _inventory(settings, "loose", path)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10_000))  # same bytes
    shutil.copy(MULTIFACE, changed)  # other bytes at the same path
    gone.unlink()
    plan = GalleryService(service).plan_reindex("loose", None)
    assert plan.new == [] and plan.changed == [str(changed.resolve())]
    assert plan.deleted == [str(gone.resolve())] and plan.unchanged == 2
    # Through the service: queued as a reindex, not refused for want of a folder.
    job = GalleryService(service).reindex("loose", principal=lab)
    assert job.state == "queued" and (job.params["changed"], job.params["deleted"]) == (1, 1)


def test_a_registered_gallery_also_looks_at_images_indexed_from_elsewhere(tmp_path, queued):
    settings, service, lab = queued
    registered = _folder(tmp_path, "reg", PHOTOS[:2])
    elsewhere = _folder(tmp_path, "elsewhere", PHOTOS[2:4])
    GalleryService(service).register(lab, "reg", registered, purpose="research")
    for path in [*registered.iterdir(), *elsewhere.iterdir()]:
        _inventory(settings, "reg", path)
    plan = GalleryService(service).plan_reindex("reg", None)
    # Before, images outside the registered folder were "deleted" (and erased) by every reindex.
    assert plan.deleted == [] and plan.unchanged == 4 and plan.new == []
    (elsewhere / PHOTOS[2].name).unlink()
    assert GalleryService(service).plan_reindex("reg", None).deleted == [str((elsewhere / PHOTOS[2].name).resolve())]


def test_a_gallery_with_neither_folder_nor_images_says_what_to_do(tmp_path, queued):
    settings, service, lab = queued
    with session_scope(settings.resolved_database_url) as s:
        s.add(Gallery(name="empty", label="empty", owner=lab.organisation_id, purpose="research"))
    with pytest.raises(JobRefused, match="index a folder into it"):
        GalleryService(service).plan_reindex("empty", None)
