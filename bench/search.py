"""Batched search: time per probe in Milvus Lite against a numpy matrix product on the same vectors.

    python -m bench.search                         # galleries of 10k and 100k faces, 1,000 probes
    python -m bench.search --sizes 10000 --probes 200

Synthetic unit vectors (512-d): a gallery of random directions, and probes that are noisy copies of
random gallery faces (so each probe has a true near neighbour, like a search for a known person).
The baseline is exact: one float32 matrix product of all probes against the gallery and a top-k
per row (numpy, the same thread count). Recall@k is measured against that exact answer.

Rows measured per gallery size, all in the same run on the same vectors:
- numpy exact                  the baseline;
- GalleryStore.search          FaceGate's search path (FLAT index, inner product of unit vectors, plain
                               top-k, the three fields a match needs, probes batched up to 4,096 per
                               call), straight after the writes: with 1, 16 and all probes per call;
- range search                 the call the store made before: a range search (radius = threshold) with
                               the probes as lists, on the same collection;
- HNSW (M, efConstruction, ef) optional (--hnsw): a collection the benchmark creates itself with an HNSW
                               index (recall and time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(gallery: np.ndarray, probes: np.ndarray, k: int, block: int = 1000) -> np.ndarray:
    """Exact top-k ids per probe by cosine (= inner product of unit vectors), best first."""
    out = np.empty((len(probes), k), dtype=np.int64)
    for s in range(0, len(probes), block):
        sims = probes[s : s + block] @ gallery.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def best_of(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


_PROFILE: dict = {}


def _server_profiler():
    """Profile Milvus Lite's Collection.search, which runs in the in-process server's thread."""
    import cProfile

    import milvus_lite.engine.collection as engine

    original = engine.Collection.search
    profiler = cProfile.Profile()

    def profiled(self, *args, **kwargs):
        profiler.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            profiler.disable()

    _PROFILE["restore"] = lambda: setattr(engine.Collection, "search", original)
    engine.Collection.search = profiled
    return profiler


def _print_profile(profiler, title: str) -> None:
    import io
    import pstats

    _PROFILE.pop("restore")()
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(12)
    print(f"\ncProfile: {title} (all repeats)")
    print("\n".join(line for line in buf.getvalue().splitlines()[2:] if line.strip()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="gallery sizes (faces), comma-separated")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.8, help="probe = unit(face + noise * unit gaussian / sqrt(d))")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (best is reported)")
    parser.add_argument("--hnsw", default="",
                        help="HNSW configurations M:efConstruction:ef to evaluate, e.g. 16:200:64 (default: none; "
                             "in Milvus Lite HNSW measured slower than FLAT, bench/README.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the Milvus Lite server thread during the batched GalleryStore search")
    args = parser.parse_args(argv)

    from pymilvus import DataType, MilvusClient

    from bench.common import command_line, machine, table
    from index import FaceRecord, GalleryStore
    from index.store import EMBEDDING_DIM

    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    print(f"{args.probes} probes per batch, top-{args.top_k}, synthetic unit vectors ({EMBEDDING_DIM}-d); "
          "time per probe = time of the whole batch / probes")
    rng = np.random.default_rng(args.seed)
    tmp = tempfile.mkdtemp(prefix="facegate-bench-search-")
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            gallery = unit(rng.standard_normal((size, EMBEDDING_DIM), dtype=np.float32))
            picks = rng.integers(0, size, args.probes)
            noise = rng.standard_normal((args.probes, EMBEDDING_DIM), dtype=np.float32) / np.sqrt(EMBEDDING_DIM)
            probes = unit(gallery[picks] + args.noise * noise)
            t_np, truth = best_of(lambda: exact_topk(gallery, probes, args.top_k), args.repeats)
            rows.append([size, "numpy exact (baseline)", "-", t_np / args.probes * 1e3, 1.0, 1.0, "-"])

            # FaceGate's store, searched straight after its writes (it flushes Milvus Lite itself).
            store = GalleryStore(os.path.join(tmp, f"store-{size}.db"))
            name = f"bench{size}"
            store.ensure_gallery(name, "bench-synthetic")
            started = time.perf_counter()
            for s in range(0, size, 8192):
                store.upsert_faces([
                    FaceRecord(gallery=name, image_path=f"/gallery/{i:07d}.jpg", image_sha256=f"{i:064x}", face_no=0,
                               box=(0.0, 0.0, 100.0, 100.0), probability=0.99,
                               landmarks=((30.0, 40.0), (70.0, 40.0), (50.0, 60.0), (35.0, 80.0), (65.0, 80.0)),
                               model_version="bench-synthetic", vector=gallery[i])
                    for i in range(s, min(size, s + 8192))])
            insert_s = time.perf_counter() - started
            assert store.count(name) == size
            ids = {f"{i:064x}": i for i in range(size)}

            def store_search(n: int):
                return store.search(name, probes[:n], model_version="bench-synthetic", top_k=args.top_k,
                                    threshold=-1.0)

            started = time.perf_counter()
            store_search(1)  # the first search after the writes flushes them
            first_s = time.perf_counter() - started
            for n in (1, 16):
                t_n, _ = best_of(lambda: store_search(n), args.repeats)
                rows.append([size, f"GalleryStore.search, {n} probe(s) per call", "-", t_n / n * 1e3,
                             t_n / n / (t_np / args.probes), "-", "-"])
            profiler = _server_profiler() if args.profile else None
            t_store, hits = best_of(lambda: store_search(args.probes), args.repeats)
            if profiler:
                _print_profile(profiler, f"Milvus Lite server side of GalleryStore.search, {size} faces")
            r_store = recall([[ids[m.image_sha256] for m in h] for h in hits], truth)
            rows.append([size, f"GalleryStore.search, {args.probes} probes per call",
                         f"insert {size / insert_s:,.0f} rows/s; first search (flush) {first_s:.2f} s",
                         t_store / args.probes * 1e3, t_store / t_np, r_store, "yes" if t_store <= 2 * t_np else "no"])

            # What the store's search was before: a range search (radius = threshold) with the probes as
            # lists. Milvus Lite fetches several times top-k hits per probe for a range search.
            client = store._client
            collection = "facegate_" + name
            metric = client.describe_index(collection, "vector")["metric_type"]

            def range_search():
                return client.search(collection, data=probes.tolist(), limit=args.top_k,
                                     output_fields=["image_path", "image_sha256", "box"], anns_field="vector",
                                     search_params={"metric_type": metric,
                                                    "params": {"radius": -1.0 - 1e-6, "range_filter": 1.0 + 1e-6}})

            range_search()
            t_range, range_hits = best_of(range_search, args.repeats)
            r_range = recall([[ids[h["entity"]["image_sha256"]] for h in q] for q in range_hits], truth)
            rows.append([size, f"range search, probes as lists (the store's call before), {args.probes} per call",
                         f"metric {metric}", t_range / args.probes * 1e3, t_range / t_np, r_range,
                         "yes" if t_range <= 2 * t_np else "no"])
            store.close()

            # HNSW, in a collection created here with the same schema idea (id, vector).
            for spec in [s for s in args.hnsw.split(",") if s]:
                m, efc, ef = (int(v) for v in spec.split(":"))
                # A fresh store per configuration (a reopened Milvus Lite HNSW store gave erratic recall).
                client = MilvusClient(os.path.join(tmp, f"hnsw-{size}-{m}-{efc}-{ef}.db"))
                cname = "hnsw"
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.INT64, is_primary=True)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=EMBEDDING_DIM)
                index_params = client.prepare_index_params()
                index_params.add_index("vector", index_type="HNSW", metric_type="COSINE",
                                       params={"M": m, "efConstruction": efc})
                started = time.perf_counter()
                client.create_collection(cname, schema=schema, index_params=index_params)
                for s in range(0, size, 8192):
                    client.insert(cname, [{"id": i, "vector": gallery[i]} for i in range(s, min(size, s + 8192))])
                client.flush(cname)
                client.load_collection(cname)
                build_s = time.perf_counter() - started

                def hnsw_search():
                    return client.search(cname, data=probes, limit=args.top_k, output_fields=[],
                                         search_params={"metric_type": "COSINE", "params": {"ef": ef}},
                                         anns_field="vector")

                hnsw_search()
                t_h, h_hits = best_of(hnsw_search, args.repeats)
                r_h = recall([[int(h["id"]) for h in q] for q in h_hits], truth)
                rows.append([size, f"HNSW M={m} efC={efc} ef={ef} (bench collection)",
                             f"insert+build {size / build_s:,.0f} rows/s", t_h / args.probes * 1e3, t_h / t_np, r_h,
                             "yes" if t_h <= 2 * t_np and r_h >= 0.99 else "no"])
                client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["gallery faces", "method", "notes", "ms per probe", "x numpy time", f"recall@{args.top_k}",
                 "meets 2x and recall>=0.99"], rows))


if __name__ == "__main__":
    main()
