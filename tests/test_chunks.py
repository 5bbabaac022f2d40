"""The work of a chunk, without a broker: real photos, real detection, a real Milvus Lite file."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from facegate.messages import IndexChunk, SearchChunk
from index import GalleryStore
from tests.conftest import ALIGNED, FIXTURES, MULTIFACE, NOISE, PHOTOS
from workers.chunks import run_index_chunk, run_search_chunk

ALL_FIXTURES = [*PHOTOS, *ALIGNED, MULTIFACE, NOISE]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, pipeline):
    store = GalleryStore(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
    chunk = IndexChunk(job_id="j1", chunk_no=0, gallery="fixtures", paths=[str(p) for p in ALL_FIXTURES])
    result = run_index_chunk(chunk, pipeline, store, [FIXTURES])
    yield store, result, chunk
    store.close()


def test_index_counts_every_face(indexed):
    store, result, _ = indexed
    faces = {o.path: o.faces for o in result.items}
    assert all(o.ok for o in result.items)
    assert faces[str(MULTIFACE)] == 6 and faces[str(NOISE)] == 0
    assert all(faces[str(p)] == 1 for p in PHOTOS + ALIGNED)
    assert store.count("fixtures") == len(PHOTOS) + len(ALIGNED) + 6
    assert result.untrained and result.model_version == "untrained-seed0"


def test_same_chunk_twice_leaves_the_same_vector_count(indexed, pipeline):
    store, _, chunk = indexed
    before = store.count("fixtures")
    run_index_chunk(chunk, pipeline, store, [FIXTURES])
    assert store.count("fixtures") == before


@pytest.mark.parametrize("probe", PHOTOS + ALIGNED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_photo_and_crop_finds_itself_top1(indexed, pipeline, probe):
    store, _, _ = indexed
    msg = SearchChunk(job_id="s", chunk_no=0, gallery="fixtures", paths=[str(probe)], top_k=5, threshold=0.0)
    result = run_search_chunk(msg, pipeline, store, [FIXTURES])
    assert len(result.probes) == 1
    best = result.probes[0].matches[0]
    assert best.image_path == str(probe)
    assert best.similarity > 0.99


@pytest.mark.parametrize("crop", ALIGNED, ids=lambda p: p.name)
def test_aligned_probe_mode_finds_the_crop(indexed, pipeline, crop):
    """An aligned crop embedded without detection still finds its own image first."""
    store, _, _ = indexed
    msg = SearchChunk(job_id="s", chunk_no=0, gallery="fixtures", paths=[str(crop)], top_k=3, threshold=0.0,
                      aligned=True)
    result = run_search_chunk(msg, pipeline, store, [FIXTURES])
    assert result.probes[0].matches[0].image_path in (str(crop), str(FIXTURES / "photos" / f"{crop.stem}.jpg"))
    assert result.probes[0].matches[0].similarity > 0.99


def test_search_of_missing_gallery_fails_the_chunk_not_the_worker(indexed, pipeline):
    store, _, _ = indexed
    msg = SearchChunk(job_id="s", chunk_no=0, gallery="nope", paths=[str(PHOTOS[0])], top_k=3, threshold=0.0)
    result = run_search_chunk(msg, pipeline, store, [FIXTURES])
    assert result.error and "does not exist" in result.error and not result.probes


def test_bad_files_fail_one_item_each_and_the_rest_completes(tmp_path, pipeline):
    gallery = tmp_path / "g"
    gallery.mkdir()
    shutil.copy(PHOTOS[0], gallery / "good.jpg")
    shutil.copy(MULTIFACE, gallery / "group.jpg")
    data = PHOTOS[1].read_bytes()
    (gallery / "corrupt.jpg").write_bytes(data[: len(data) // 4])
    (gallery / "text.jpg").write_text("I am a text file wearing a .jpg name\n")
    (gallery / "empty.jpg").write_bytes(b"")
    Image.new("L", (9000, 9000)).save(gallery / "huge.png")
    store = GalleryStore(str(tmp_path / "milvus.db"))
    paths = sorted(str(p) for p in gallery.iterdir())
    result = run_index_chunk(IndexChunk(job_id="j", chunk_no=0, gallery="g", paths=paths), pipeline, store,
                             [tmp_path])
    by_name = {o.path.rsplit("/", 1)[1]: o for o in result.items}
    assert by_name["good.jpg"].ok and by_name["group.jpg"].ok
    assert "corrupt" in by_name["corrupt.jpg"].reason
    assert "not an image" in by_name["text.jpg"].reason
    assert by_name["empty.jpg"].reason == "empty file"
    assert "over the limit" in by_name["huge.png"].reason
    assert store.count("g") == 1 + 6


def test_worker_rechecks_confinement(tmp_path, pipeline):
    store = GalleryStore(str(tmp_path / "milvus.db"))
    outside = str(PHOTOS[0])
    result = run_index_chunk(IndexChunk(job_id="j", chunk_no=0, gallery="g", paths=[outside]), pipeline, store,
                             [tmp_path])
    assert not result.items[0].ok and "outside the gallery roots" in result.items[0].reason
    assert store.count("g") == 0


def test_an_image_too_small_to_hold_a_face_fails_alone(tmp_path, pipeline):
    # MTCNN's smallest face is min_face_size pixels: below that the detector has no scale to run at, and
    # a 1x1 image in a batch used to fail its whole chunk (torch.cat(): expected a non-empty list).
    gallery = tmp_path / "g"
    gallery.mkdir()
    shutil.copy(PHOTOS[0], gallery / "good.jpg")
    Image.new("RGB", (1, 1)).save(gallery / "dot.png")
    Image.new("RGB", (400, 12), (128, 90, 60)).save(gallery / "strip.png")
    store = GalleryStore(str(tmp_path / "milvus.db"))
    paths = sorted(str(p) for p in gallery.iterdir())
    result = run_index_chunk(IndexChunk(job_id="j", chunk_no=0, gallery="g", paths=paths), pipeline, store,
                             [tmp_path])
    by_name = {o.path.rsplit("/", 1)[1]: o for o in result.items}
    assert by_name["good.jpg"].ok and by_name["good.jpg"].faces == 1
    for name, size in (("dot.png", "1x1"), ("strip.png", "400x12")):
        assert not by_name[name].ok
        assert f"image is {size} pixels, too small to hold a face" in by_name[name].reason
    assert store.count("g") == 1


def test_every_image_file_in_a_folder_is_an_item_with_an_outcome(tmp_path, pipeline):
    """Formats FaceGate does not read are refused by name, not skipped; a 16-bit scan is read, not clipped."""
    import numpy as np

    from facegate.paths import confined_images

    gallery = tmp_path / "g"
    gallery.mkdir()
    shutil.copy(PHOTOS[0], gallery / "good.jpg")
    grey = np.asarray(Image.open(PHOTOS[0]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(gallery / "scan16.png")  # mode I;16
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    frames[0].save(gallery / "anim.gif", save_all=True, append_images=frames[1:])
    (gallery / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (gallery / "phone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (gallery / "notes.txt").write_text("not an image, and not listed as one")
    paths = [str(p) for p in confined_images([gallery], [tmp_path])]
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == \
        ["anim.gif", "drawing.svg", "good.jpg", "phone.HEIC", "scan16.png"]
    store = GalleryStore(str(tmp_path / "milvus.db"))
    result = run_index_chunk(IndexChunk(job_id="j", chunk_no=0, gallery="g", paths=paths), pipeline, store,
                             [tmp_path])
    by_name = {o.path.rsplit("/", 1)[1]: o for o in result.items}
    assert set(by_name) == {"anim.gif", "drawing.svg", "good.jpg", "phone.HEIC", "scan16.png"}
    assert by_name["good.jpg"].faces == 1 and by_name["scan16.png"].faces == 1
    for name, kind in (("anim.gif", "GIF"), ("drawing.svg", "SVG"), ("phone.HEIC", "HEIC")):
        assert not by_name[name].ok and by_name[name].reason.startswith(kind)
        assert "not read by FaceGate" in by_name[name].reason
    assert store.count("g") == 2 == sum(o.faces for o in result.items)
