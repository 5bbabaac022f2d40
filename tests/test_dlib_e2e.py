"""dlib-resnet-v1 through FaceGate's whole pipeline: real photos of the same person found across photos,
other people kept below the floor, in a plain chunk and through the real queue and worker."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facegate.embedding_models import DLIB_RESNET_V1, DLIB_SHAPE_PREDICTOR_FILE, dlib_file, family_of
from facegate.messages import IndexChunk, SearchChunk
from index import GalleryStore
from policy import effective_floor, load_registry
from scheduler.dispatch import CeleryTaskQueue
from scheduler.service import JobService
from tests.conftest import FIXTURES, MULTIFACE, NOISE, PHOTOS, make_settings, redis_client, register
from workers.chunks import run_index_chunk, run_search_chunk
from workers.pipeline import FacePipeline

dlib = pytest.importorskip("dlib", reason="dlib-bin (a dev dependency) is dlib's own reference")

ALL_FIXTURES = FIXTURES.parent  # shared/fixtures: faces/ and identities/
IDENTITIES = sorted((ALL_FIXTURES / "identities").glob("*/*.jpg"))
OBAMA = [p for p in IDENTITIES if p.parent.name == "barack_obama"]
# Every fixture photo, and the source photos of the aligned crops (faces/photos): one identity per file
# name stem, the group photo's six faces each their own.
GALLERY = [*IDENTITIES, *PHOTOS, MULTIFACE, NOISE]
PURPOSE = "missing-children"


def identity(path: str) -> str:
    return "barack_obama" if "barack_obama" in path else path


@pytest.fixture(scope="module")
def dlib_pipeline(tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("dlib")
    return FacePipeline.from_settings(make_settings(tmp, model=DLIB_RESNET_V1, embed_precision="fp32"))


@pytest.fixture(scope="module")
def analysed(dlib_pipeline):
    images, outcomes = dlib_pipeline.analyse([str(p) for p in GALLERY])
    assert all(o.ok for o in outcomes)
    return images


def test_the_pipeline_is_dlibs_model(dlib_pipeline, analysed):
    assert family_of(dlib_pipeline.model_version) == DLIB_RESNET_V1 and not dlib_pipeline.untrained
    assert dlib_pipeline.dimension == 128
    assert all(img.embeddings.shape == (len(img.faces), 128) for img in analysed)
    assert sum(len(img.faces) for img in analysed) == len(IDENTITIES) + len(PHOTOS) + 6


def test_every_face_lies_within_006_of_dlibs_reference_pipeline(analysed):
    """dlib's reference: its 5-point landmarks on the same (MTCNN) box, get_face_chip, compute_face_descriptor."""
    predictor = dlib.shape_predictor(str(dlib_file(DLIB_SHAPE_PREDICTOR_FILE)))
    model = dlib.face_recognition_model_v1(str(dlib_file()))
    worst = 0.0
    for img in analysed:
        pixels = np.asarray(Image.open(img.path).convert("RGB"))
        for face, ours in zip(img.faces, img.embeddings):
            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            chip = dlib.get_face_chip(pixels, predictor(pixels, dlib.rectangle(x1, y1, x2, y2)), size=150, padding=0.25)
            reference = np.asarray(model.compute_face_descriptor(chip))
            worst = max(worst, float(np.linalg.norm(ours - reference / np.linalg.norm(reference))))
    assert worst < 0.06


def _check_obama_search(matches_of, floor: float) -> None:
    """For each Obama photo: the other Obama photo is the best match that is not the probe itself, above
    the floor, and no other identity's face reaches the floor."""
    for probe in OBAMA:
        matches = [m for m in matches_of(probe) if m["image_path"] != str(probe)]
        other = next(p for p in OBAMA if p != probe)
        assert matches[0]["image_path"] == str(other), matches[:3]
        assert matches[0]["similarity"] >= floor
        strangers = [m for m in matches if identity(m["image_path"]) != "barack_obama"]
        assert strangers and max(m["similarity"] for m in strangers) < floor, strangers[:3]


def test_obama_is_found_across_photos_and_nobody_else_is_above_the_floor(tmp_path, dlib_pipeline):
    store = GalleryStore(str(tmp_path / "milvus.db"))
    try:
        index = IndexChunk(job_id="j", chunk_no=0, gallery="people", paths=[str(p) for p in GALLERY])
        result = run_index_chunk(index, dlib_pipeline, store, [ALL_FIXTURES])
        assert all(o.ok for o in result.items) and store.dimension("people") == 128
        floor = effective_floor(PURPOSE, dlib_pipeline.model_version, load_registry())
        assert floor == pytest.approx(0.95)

        def matches_of(probe):
            msg = SearchChunk(job_id="s", chunk_no=0, gallery="people", paths=[str(probe)], top_k=50, threshold=-1.0)
            found = run_search_chunk(msg, dlib_pipeline, store, [ALL_FIXTURES])
            assert found.error is None and len(found.probes) == 1
            return [m.model_dump() for m in found.probes[0].matches]

        _check_obama_search(matches_of, floor)
    finally:
        store.close()


@pytest.mark.slow
def test_obama_through_the_queue_and_a_dlib_worker(tmp_path, redis_server_url):
    from facegate.queue import make_celery
    from tests.e2e import MilvusLiteServer, WorkerProcess

    milvus = MilvusLiteServer(tmp_path / "milvus")
    settings = make_settings(tmp_path, broker_url=f"{redis_server_url.rstrip('/')}/12", milvus_uri=milvus.uri,
                             model=DLIB_RESNET_V1, gallery_roots=[ALL_FIXTURES, tmp_path / "galleries"])
    redis_client(settings.broker_url).flushdb()
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    app = make_celery(settings)
    try:
        service = JobService(settings, CeleryTaskQueue(app))
        icmec, _ = register(settings, "icmec")
        job = service.wait(service.submit_index(ALL_FIXTURES, "people", icmec, PURPOSE).id, timeout_s=600)
        assert job.state == "done", job.errors
        assert family_of(job.model_version) == DLIB_RESNET_V1 and not job.untrained
        floor = service.gate.floor_for(PURPOSE, job.model_version)
        assert floor == pytest.approx(0.95)
        # No threshold given: the search runs at the purpose's floor for this model.
        search = service.wait(service.submit_search([str(p) for p in OBAMA], "people", icmec, PURPOSE,
                                                    top_k=50).id, timeout_s=600)
        assert search.state == "done", search.errors
        results = {r["path"]: r["matches"] for r in service.probe_results(search.id)}
        assert set(results) == {str(p) for p in OBAMA}
        for probe in OBAMA:
            found = [m for m in results[str(probe)] if m["image_path"] != str(probe)]
            other = next(p for p in OBAMA if p != probe)
            # Only the other photo of the same person is above the floor (the probe's own photo aside).
            assert [m["image_path"] for m in found] == [str(other)]
            assert found[0]["similarity"] >= floor
    finally:
        worker.stop()
        app.close()
        milvus.stop()


def test_galleries_of_each_model_side_by_side_and_no_probe_crosses(tmp_path, dlib_pipeline, pipeline):
    """One store, a 128-d dlib gallery beside a 512-d gallery of the other network: each searched by its
    own model, and a probe of either refused against the other's gallery, before any probe is embedded."""
    store = GalleryStore(str(tmp_path / "milvus.db"))
    try:
        for name, model in (("dlib", dlib_pipeline), ("other", pipeline)):
            index = IndexChunk(job_id=name, chunk_no=0, gallery=name, paths=[str(p) for p in PHOTOS])
            assert all(o.ok for o in run_index_chunk(index, model, store, [FIXTURES]).items)
        assert (store.dimension("dlib"), store.dimension("other")) == (128, 512)
        assert store.model_version("dlib") == dlib_pipeline.model_version != store.model_version("other")
        for gallery, model in (("dlib", dlib_pipeline), ("other", pipeline)):
            msg = SearchChunk(job_id="s", chunk_no=0, gallery=gallery, paths=[str(PHOTOS[0])], top_k=1, threshold=0.0)
            found = run_search_chunk(msg, model, store, [FIXTURES])
            assert found.error is None and found.probes[0].matches[0].image_path == str(PHOTOS[0])
        for gallery, model in (("dlib", pipeline), ("other", dlib_pipeline)):
            msg = SearchChunk(job_id="s", chunk_no=0, gallery=gallery, paths=[str(PHOTOS[0])], top_k=1, threshold=0.0)
            refused = run_search_chunk(msg, model, store, [FIXTURES])
            assert refused.probes == [] and "not compared" in refused.error
            assert store.model_version(gallery) in refused.error and model.model_version in refused.error
        # Nor can a worker of one model write into the other's gallery.
        index = IndexChunk(job_id="x", chunk_no=0, gallery="dlib", paths=[str(PHOTOS[0])])
        crossed = run_index_chunk(index, pipeline, store, [FIXTURES])
        assert not crossed.items[0].ok and "holds vectors of model version" in crossed.items[0].reason
        assert store.count("dlib") == len(PHOTOS)
    finally:
        store.close()
