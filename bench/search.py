"""Search at scale: FaceGate's store on Milvus Lite and on a Milvus server (FLAT and HNSW), against exact
baselines measured in the same run on the same vectors.

    python -m bench.search                                   # 20k faces: a minute or two on 2 cores
    python -m bench.search --sizes 100000 --single 20
    python -m bench.search --sizes 1000000 --engines numpy,faiss,server-flat,server-hnsw

Two kinds of synthetic unit vectors (512-d):
- random     uniform random directions; each probe is a noisy copy of one gallery face (its one mate).
             The worst case for an ANN index: no structure to exploit.
- clustered  like real faces: identities with several faces each (a face = its identity's centre plus
             noise), probes are new noisy views of an enrolled identity; its mates are that identity's faces.

Baselines: the exact float32 matrix product with a top-k per row (numpy, all threads), and FAISS's exact
flat inner-product index (faiss-cpu). Engines: GalleryStore on a Milvus Lite file; GalleryStore on a Milvus
standalone server (the `milvus` package's 2.3.5, started here on free ports, or --server-uri) with FLAT,
then the same collection given HNSW by the store's own index policy (GalleryStore.fit_index).

Per engine: time per probe in a batch of --probes (one call; the store splits it as it must), time of a
single-probe call (mean of --single calls), recall@k against the exact answer, the share of true mates
found at or above --threshold within the top-k (numpy's row is the ceiling), insert rate, index build +
load time. Times are best of --repeats; ratios are against numpy in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIM = 512
MODEL = "bench-synthetic"
ENGINES = ("numpy", "faiss", "lite", "server-flat", "server-hnsw")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(gallery: np.ndarray, probes: np.ndarray, k: int, block: int | None = None) -> np.ndarray:
    """Exact top-k ids per probe by cosine (= inner product of unit vectors), best first.

    Probes go in blocks of about 10^8 similarities (100 probes at 1M faces): a 1,000 x 1M block and its
    argpartition would hold 12 GB."""
    block = block or max(1, min(1000, 10**8 // max(1, len(gallery))))
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


@dataclass
class Data:
    kind: str
    gallery: np.ndarray
    probes: np.ndarray
    mates: list[set[int]]  # per probe: the gallery ids of its true mates


def make_data(kind: str, size: int, probes: int, rng: np.random.Generator, *, per_identity: int,
              spread: float, noise: float) -> Data:
    if kind == "random":
        gallery = unit(rng.standard_normal((size, DIM), dtype=np.float32))
        picks = rng.integers(0, size, probes)
        jitter = rng.standard_normal((probes, DIM), dtype=np.float32) / np.sqrt(DIM)
        return Data(kind, gallery, unit(gallery[picks] + noise * jitter), [{int(p)} for p in picks])
    identities = -(-size // per_identity)
    centres = unit(rng.standard_normal((identities, DIM), dtype=np.float32))
    gallery = np.empty((size, DIM), dtype=np.float32)
    for s in range(0, size, 100_000):  # in blocks: whole-gallery temporaries would be several GB at 1M
        owner = np.arange(s, min(size, s + 100_000)) // per_identity
        noise = rng.standard_normal((len(owner), DIM), dtype=np.float32)
        gallery[s : s + len(owner)] = unit(centres[owner] + spread * noise / np.sqrt(DIM))
    picks = rng.integers(0, identities, probes)
    views = unit(centres[picks] + spread * rng.standard_normal((probes, DIM), dtype=np.float32) / np.sqrt(DIM))
    mates = [set(range(int(p) * per_identity, min(size, (int(p) + 1) * per_identity))) for p in picks]
    return Data(kind, gallery, views, mates)


def mates_found(ids: list[list[int]], sims: list[list[float]], mates: list[set[int]], threshold: float) -> float:
    """Share of all true mates that come back within the top-k at or above the threshold."""
    found = sum(len({i for i, s in zip(row, srow) if s >= threshold} & m) for row, srow, m in zip(ids, sims, mates))
    return found / sum(len(m) for m in mates)


class Engine:
    """An engine holding one data set: batch search, single search, each -> (ids, sims)."""

    name = ""
    notes = ""

    def batch(self, probes: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NumpyExact(Engine):
    name = "numpy exact (baseline)"

    def __init__(self, data: Data) -> None:
        self.gallery = data.gallery

    def batch(self, probes, k):
        top = exact_topk(self.gallery, probes, k)
        return top.tolist(), np.einsum("ij,ikj->ik", probes, self.gallery[top]).tolist()


class FaissFlat(Engine):
    name = "faiss IndexFlatIP (exact)"

    def __init__(self, data: Data) -> None:
        import faiss

        started = time.perf_counter()
        self.index = faiss.IndexFlatIP(DIM)
        self.index.add(data.gallery)
        self.notes = f"add {len(data.gallery) / (time.perf_counter() - started):,.0f} rows/s"

    def batch(self, probes, k):
        sims, ids = self.index.search(probes, k)
        return ids.tolist(), sims.tolist()


class Store(Engine):
    """FaceGate's GalleryStore, searched the way a search chunk does (many probes per call, threshold after)."""

    def __init__(self, name: str, store, gallery: str, notes: str = "") -> None:
        self.name, self.store, self.gallery, self.notes = name, store, gallery, notes

    def batch(self, probes, k):
        hits = self.store.search(self.gallery, probes, model_version=MODEL, top_k=k, threshold=-1.0)
        return ([[int(m.image_sha256, 16) for m in h] for h in hits], [[m.similarity for m in h] for h in hits])

    def strong(self, probes, k) -> None:
        """The store's search call at Strong consistency, as the store makes it within BOUNDED_AFTER_S of a
        write: it waits for the server's next time tick (200 ms)."""
        self.store._search("facegate_" + self.gallery, probes, k, -1.0, ["image_path", "image_sha256", "box"],
                           "Strong")

    def settle(self) -> float:
        """Wait until the gallery's last write is old enough for the store's Bounded reads; seconds waited."""
        from index.store import BOUNDED_AFTER_S, WRITTEN_AT_PROPERTY

        written = float(self.store._properties(self.gallery).get(WRITTEN_AT_PROPERTY, 0))
        wait = max(0.0, written + BOUNDED_AFTER_S + 0.1 - time.time())
        time.sleep(wait)
        return wait


def fill(store, gallery: str, data: Data) -> float:
    """A fresh gallery written the way index chunks write it (upsert_faces, 8,192 faces a call); seconds taken."""
    from index import FaceRecord

    store.drop_gallery(gallery)
    store.ensure_gallery(gallery, MODEL)
    landmarks = ((30.0, 40.0), (70.0, 40.0), (50.0, 60.0), (35.0, 80.0), (65.0, 80.0))
    started = time.perf_counter()
    for s in range(0, len(data.gallery), 8192):
        store.upsert_faces([
            FaceRecord(gallery=gallery, image_path=f"/gallery/{i:07d}.jpg", image_sha256=f"{i:064x}", face_no=0,
                       box=(0.0, 0.0, 100.0, 100.0), probability=0.99, landmarks=landmarks, model_version=MODEL,
                       vector=data.gallery[i])
            for i in range(s, min(len(data.gallery), s + 8192))])
    seconds = time.perf_counter() - started
    assert store.count(gallery) == len(data.gallery)
    return seconds


def _server(args, tmp: Path):
    """(uri, stop) of the Milvus server: --server-uri, or the `milvus` package's started here."""
    if args.server_uri:
        return args.server_uri, lambda: None
    from tests.milvus_server import MilvusStandalone

    server = MilvusStandalone(tmp / "milvus-server")
    started = time.perf_counter()
    server.start()
    print(f"Milvus standalone (milvus package) started in {time.perf_counter() - started:.1f} s at {server.uri}")
    return server.uri, server.stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000", help="gallery sizes (faces), comma-separated")
    parser.add_argument("--data", default="random,clustered", help="random, clustered or both")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"any of {', '.join(ENGINES)}")
    parser.add_argument("--probes", type=int, default=1000, help="probes in the batched call")
    parser.add_argument("--single", type=int, default=20, help="single-probe calls timed (mean reported)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.5, help="similarity a mate must reach to count")
    parser.add_argument("--noise", type=float, default=0.8, help="random: probe = unit(face + noise * g / sqrt(d))")
    parser.add_argument("--per-identity", type=int, default=5, help="clustered: faces per identity")
    parser.add_argument("--spread", type=float, default=0.7,
                        help="clustered: face or probe = unit(centre + spread * g / sqrt(d)) (0.7: cosine ~0.67 "
                             "between two views of one identity)")
    parser.add_argument("--hnsw", default="16:200", help="M:efConstruction of the server's HNSW index")
    parser.add_argument("--ef", default="128,256,512", help="HNSW search beams to measure on that index")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of the batch (best is reported)")
    parser.add_argument("--server-uri", default="", help="a Milvus server to use instead of starting one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}: choose from {', '.join(ENGINES)}")

    from bench.common import command_line, machine, table
    from index import GalleryStore, IndexPolicy

    m, efc = (int(v) for v in args.hnsw.split(":"))
    efs = [int(v) for v in args.ef.split(",") if v]
    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    print(f"batch of {args.probes} probes per call, {args.single} single-probe calls, top-{args.top_k}, "
          f"mates counted at similarity >= {args.threshold}; {DIM}-d unit vectors")
    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="facegate-bench-search-"))
    uri, stop = _server(args, tmp) if any(e.startswith("server") for e in engines) else ("", lambda: None)
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            for kind in [k.strip() for k in args.data.split(",") if k.strip()]:
                data = make_data(kind, size, args.probes, rng, per_identity=args.per_identity, spread=args.spread,
                                 noise=args.noise)
                truth = exact_topk(data.gallery, data.probes, args.top_k)
                t_np = None

                def measure(engine: Engine, extra: str = "") -> None:
                    nonlocal t_np
                    engine.batch(data.probes[:1], args.top_k)  # warm: first call after the writes
                    t_batch, (ids, sims) = best_of(lambda: engine.batch(data.probes, args.top_k), args.repeats)
                    server = isinstance(engine, Store) and not engine.store.is_milvus_lite
                    if server:
                        engine.settle()  # single probes of a gallery not written in the last BOUNDED_AFTER_S
                    started = time.perf_counter()
                    for i in range(args.single):
                        engine.batch(data.probes[i : i + 1], args.top_k)
                    t_single = (time.perf_counter() - started) / max(1, args.single)
                    t_strong = None
                    if server:
                        started = time.perf_counter()
                        for i in range(args.single):
                            engine.strong(data.probes[i : i + 1], args.top_k)
                        t_strong = (time.perf_counter() - started) / max(1, args.single) * 1e3
                    if t_np is None:
                        t_np = t_batch
                    rows.append([size, kind, engine.name, "; ".join(n for n in (engine.notes, extra) if n),
                                 t_batch / len(data.probes) * 1e3, t_batch / t_np, t_single * 1e3,
                                 "-" if t_strong is None else t_strong,
                                 recall(ids, truth), mates_found(ids, sims, data.mates, args.threshold)])
                    print("  " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1]),
                          flush=True)  # each row as it comes: a long run stopped early keeps what it measured

                measure(NumpyExact(data))
                if "faiss" in engines:
                    measure(FaissFlat(data))
                if "lite" in engines:
                    store = GalleryStore(str(tmp / f"lite-{size}-{kind}.db"))
                    insert_s = fill(store, "bench", data)
                    measure(Store("Milvus Lite FLAT (GalleryStore)", store, "bench",
                                  f"insert {size / insert_s:,.0f} rows/s"))
                    store.close()
                if "server-flat" in engines or "server-hnsw" in engines:
                    store = GalleryStore(uri, policy=IndexPolicy(ann_min_faces=10**12))  # FLAT at any size
                    insert_s = fill(store, "bench", data)
                    if "server-flat" in engines:
                        measure(Store("Milvus server FLAT (GalleryStore)", store, "bench",
                                      f"insert {size / insert_s:,.0f} rows/s"))
                    if "server-hnsw" in engines:
                        # The same collection, given HNSW by the store's own policy (what a write passing
                        # FACEGATE_MILVUS_ANN_MIN_FACES does): flush, build, load.
                        for n, ef in enumerate(efs):
                            ann = GalleryStore(uri, policy=IndexPolicy(ann_min_faces=1, hnsw_m=m,
                                                                       hnsw_ef_construction=efc, hnsw_ef=ef))
                            started = time.perf_counter()
                            info = ann.fit_index("bench")  # builds once; then only the search beam changes
                            build_s = time.perf_counter() - started
                            assert info["type"] == "HNSW", info
                            measure(Store(f"Milvus server HNSW M={m} efC={efc} ef={ef} (GalleryStore)", ann, "bench",
                                          "" if n else f"flush + build + load {build_s:.1f} s"))
                            ann.close()
                    store.drop_gallery("bench")
                    store.close()
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["faces", "data", "engine", "notes", f"ms/probe, batch {args.probes}", "x numpy",
                 "ms, 1-probe call", "ms, 1-probe Strong", f"recall@{args.top_k}", f"mates >= {args.threshold}"],
                rows))


if __name__ == "__main__":
    main()
