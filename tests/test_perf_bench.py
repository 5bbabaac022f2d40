"""The benchmarks' own helpers: the generated gallery and the face matching (no timings are asserted)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.common import make_gallery, table
from bench.ingest import Run, match
from bench.search import exact_topk, recall, unit


def test_generated_gallery_is_deterministic_mixed_and_bounded(tmp_path):
    a = make_gallery(tmp_path / "a", 8, seed=3, max_side=900)
    b = make_gallery(tmp_path / "b", 8, seed=3, max_side=900)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    sizes = [Image.open(p).size for p in a]
    assert all(max(s) <= 900 for s in sizes) and len(set(sizes)) > 1
    assert all(Image.open(p).format == "JPEG" for p in a)


def test_match_counts_naive_faces_found_by_iou():
    box = lambda *v: np.asarray(v, dtype=float)  # noqa: E731 -- a one-line helper, clearer inline
    naive, ours = Run("naive"), Run("ours")
    naive.boxes = {"x": [(box(0, 0, 10, 10), 0.99), (box(50, 50, 60, 60), 0.95), (box(80, 80, 84, 84), 0.8)]}
    naive.vectors = {"x": np.eye(3, 512, dtype=np.float32)}
    ours.boxes = {"x": [(box(1, 1, 10, 10), 0.99)]}
    ours.vectors = {"x": np.eye(1, 512, dtype=np.float32)}
    m = match(naive, ours, 0.9)
    assert (m["found_strong"], m["strong"], m["found_all"], m["total"]) == (1, 2, 1, 3)
    assert m["cosine_mean"] == 1.0


def test_exact_topk_and_recall():
    rng = np.random.default_rng(0)
    gallery = unit(rng.standard_normal((500, 512)).astype(np.float32))
    truth = exact_topk(gallery, gallery[:20], 5)
    assert (truth[:, 0] == np.arange(20)).all()
    assert recall(truth.tolist(), truth) == 1.0
    assert recall([row[:4] + [-1] for row in truth.tolist()], truth) == pytest.approx(0.8)


def test_table_renders():
    out = table(["a", "b"], [[1, 2.5], ["x", 1234.0]])
    assert out.splitlines()[0] == "| a | b     |" and "1,234" in out
