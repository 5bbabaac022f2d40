"""What an index chunk costs in the store: upsert, and the per-image delete of stale versions.

    python -m bench.store_writes                 # a gallery of 6,000 faces, then 3 chunks of 16 images
    python -m bench.store_writes --rows 2000

`run_index_chunk` calls `GalleryStore.upsert_faces` once per chunk (one batched upsert) and then
`delete_stale_versions`, which sends one filtered delete per image of the chunk. The benchmark times
both on a Milvus Lite file holding `--rows` faces, and the alternative: one query for the chunk's paths
(`image_path in [...]`), after which only stale rows (usually none) need a delete by primary key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6000, help="faces already in the gallery")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--images", type=int, default=16, help="images per chunk (3 faces each)")
    args = parser.parse_args(argv)

    from bench.common import command_line, machine, table
    from index import FaceRecord, GalleryStore

    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    rng = np.random.default_rng(0)

    def records(lo: int, hi: int) -> list[FaceRecord]:
        return [FaceRecord(gallery="g", image_path=f"/g/{i // 3:06d}.jpg", image_sha256=f"{i // 3:064x}",
                           face_no=i % 3, box=(0.0, 0.0, 1.0, 1.0), probability=0.99, landmarks=((0.0, 0.0),) * 5,
                           model_version="v", vector=rng.standard_normal(512).astype(np.float32))
                for i in range(lo, hi)]

    tmp = tempfile.mkdtemp(prefix="facegate-bench-store-")
    rows = []
    try:
        store = GalleryStore(os.path.join(tmp, "milvus.db"))
        store.ensure_gallery("g", "v")
        for s in range(0, args.rows, 8192):
            store.upsert_faces(records(s, min(args.rows, s + 8192)))
        faces = 3 * args.images
        for n in range(args.chunks):
            lo = args.rows + n * faces
            batch = records(lo, lo + faces)
            started = time.perf_counter()
            store.upsert_faces(batch)
            upsert_s = time.perf_counter() - started
            current = {r.image_path: r.image_sha256 for r in batch}
            started = time.perf_counter()
            store.delete_stale_versions("g", current)
            delete_s = time.perf_counter() - started
            started = time.perf_counter()
            found = store._client.query("facegate_g", filter="image_path in " + json.dumps(list(current)),  # noqa: SLF001
                                        output_fields=["image_path", "image_sha256"])
            stale = [r["id"] for r in found if current[r["image_path"]] != r["image_sha256"]]
            query_s = time.perf_counter() - started
            rows.append([n, store.count("g"), faces, upsert_s * 1e3, delete_s * 1e3, query_s * 1e3, len(stale)])
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["chunk", "rows in gallery", "faces upserted", "upsert_faces ms (one call)",
                 f"delete_stale_versions ms ({args.images} deletes)", "one 'image_path in [...]' query ms",
                 "stale rows found"], rows))


if __name__ == "__main__":
    main()
