"""What an index chunk costs in the store, and what an in-process Milvus Lite holds as the gallery grows.

    python -m bench.store_writes                 # 6,000 faces already stored, then 3 chunks of 16 images
    python -m bench.store_writes --rows 2000 --memory-chunks 100

`run_index_chunk` makes two store calls per chunk: `GalleryStore.upsert_faces` (one batched upsert) and
`delete_stale_versions` (one `image_path in [...]` query for the chunk's paths, then a delete by
primary key of the stale rows, if any). Both are timed on a Milvus Lite file holding `--rows` faces,
against the way the store removed stale faces before: one filtered delete per image, each a scan.

`--memory-chunks N` then writes N more chunks in this process, with and without the stale-face query,
and prints the process RSS every 25 chunks: what Milvus Lite keeps in the worker's memory when the
store is a file opened in the worker (the embedded default), as rows accumulate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FACES_PER_IMAGE = 3


def _records(lo: int, hi: int, rng: np.random.Generator):
    from index import FaceRecord

    return [FaceRecord(gallery="g", image_path=f"/g/{i // FACES_PER_IMAGE:06d}.jpg",
                       image_sha256=f"{i // FACES_PER_IMAGE:064x}", face_no=i % FACES_PER_IMAGE,
                       box=(0.0, 0.0, 1.0, 1.0), probability=0.99, landmarks=((0.0, 0.0),) * 5, model_version="v",
                       vector=rng.standard_normal(512).astype(np.float32))
            for i in range(lo, hi)]


def _memory_child(chunks: int, images: int, stale_query: bool) -> None:
    """Runs in a fresh process: chunk after chunk into a new Lite file; prints (chunks, RSS MiB) pairs."""
    import psutil

    from index import GalleryStore

    proc, rng = psutil.Process(), np.random.default_rng(1)
    tmp = tempfile.mkdtemp(prefix="facegate-bench-store-mem-")
    try:
        store = GalleryStore(os.path.join(tmp, "milvus.db"))
        store.ensure_gallery("g", "v")
        faces = FACES_PER_IMAGE * images
        trace = [(0, proc.memory_info().rss >> 20)]
        for n in range(chunks):
            batch = _records(n * faces, (n + 1) * faces, rng)
            store.upsert_faces(batch)
            if stale_query:
                store.delete_stale_versions("g", {r.image_path: r.image_sha256 for r in batch})
            if (n + 1) % 25 == 0:
                trace.append((n + 1, proc.memory_info().rss >> 20))
        store.close()
        print(json.dumps(trace))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6000, help="faces already in the gallery")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--images", type=int, default=16, help=f"images per chunk ({FACES_PER_IMAGE} faces each)")
    parser.add_argument("--memory-chunks", type=int, default=0, help="chunks for the RSS trace (0: skip)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        _memory_child(args.memory_chunks, args.images, args.memory_child == "stale")
        return

    from bench.common import command_line, machine, table
    from index import GalleryStore
    from index.store import _quote

    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="facegate-bench-store-")
    rows = []
    try:
        store = GalleryStore(os.path.join(tmp, "milvus.db"))
        store.ensure_gallery("g", "v")
        for s in range(0, args.rows, 8192):
            store.upsert_faces(_records(s, min(args.rows, s + 8192), rng))
        faces = FACES_PER_IMAGE * args.images
        client = store._client
        for n in range(args.chunks):
            lo = args.rows + n * faces
            batch = _records(lo, lo + faces, rng)
            current = {r.image_path: r.image_sha256 for r in batch}
            started = time.perf_counter()
            store.upsert_faces(batch)
            upsert_s = time.perf_counter() - started
            started = time.perf_counter()
            stale = store.delete_stale_versions("g", current)
            query_s = time.perf_counter() - started
            started = time.perf_counter()
            for path, sha in current.items():
                client.delete("facegate_g", filter=f"image_path == {_quote(path)} and image_sha256 != {_quote(sha)}")
            per_image_s = time.perf_counter() - started
            rows.append([n, store.count("g"), faces, upsert_s * 1e3, query_s * 1e3, per_image_s * 1e3,
                         per_image_s / query_s, stale])
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["chunk", "rows in gallery", "faces upserted", "upsert_faces ms (one call)",
                 "delete_stale_versions ms (one query)", f"one filtered delete per image ms ({args.images})",
                 "per-image / query", "stale rows"], rows))

    if args.memory_chunks:
        traces = {}
        for mode in ("upsert", "stale"):
            out = subprocess.run([sys.executable, "-m", "bench.store_writes", "--memory-child", mode,
                                  "--memory-chunks", str(args.memory_chunks), "--images", str(args.images)],
                                 capture_output=True, text=True, check=True)
            traces[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\nRSS of a process writing {args.memory_chunks} chunks of {args.images} images "
              f"({FACES_PER_IMAGE} faces each) into a Milvus Lite file it holds:")
        print(table(["chunks written", "rows stored", "upsert only: RSS MiB", "upsert + stale-face query: RSS MiB"],
                    [[c, c * args.images * FACES_PER_IMAGE, a, b]
                     for (c, a), (_, b) in zip(traces["upsert"], traces["stale"])]))


if __name__ == "__main__":
    main()
