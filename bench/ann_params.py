"""Which ANN index and parameters meet the recall target: IVF_FLAT, IVF_SQ8 and HNSW on a Milvus server,
one collection rebuilt with each, against the exact answer on the same vectors (bench/search.py's data).

    python -m bench.ann_params                                  # 100k clustered faces: ~20 min on 2 cores
    python -m bench.ann_params --variants HNSW:M=16,efConstruction=200:ef=512,1024

Each variant is INDEX:BUILD:SEARCH, BUILD as k=v pairs, SEARCH as one search parameter and its values.
The collection holds ids and vectors only, written with plain inserts (this measures the index, not the
store); searches read Bounded after the flush (the index's own time, no wait for the time tick). Per
setting: seconds per 1,000-probe batch (best of --repeats) and against numpy's exact product in the same
run, a single-probe call (mean of 10), recall@10, and the share of true mates found at similarity >= 0.5.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.search import DIM, exact_topk, make_data, mates_found, recall

DEFAULT_VARIANTS = ("IVF_FLAT:nlist=1024:nprobe=32,128,256", "HNSW:M=16,efConstruction=200:ef=512,1024",
                    "IVF_SQ8:nlist=1024:nprobe=128,256", "HNSW:M=32,efConstruction=300:ef=256,512,1024")


def parse_variant(text: str) -> tuple[str, dict[str, int], str, list[int]]:
    index_type, build, search = text.split(":")
    key, values = search.split("=")
    return (index_type.upper(), {k: int(v) for k, v in (p.split("=") for p in build.split(",") if p)}, key,
            [int(v) for v in values.split(",")])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--data", default="clustered", choices=("clustered", "random"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]

    from pymilvus import DataType, MilvusClient

    from bench.common import command_line, machine
    from tests.milvus_server import MilvusStandalone

    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="facegate-bench-ann-"))
    server = MilvusStandalone(tmp / "milvus-server")
    server.start()
    try:
        data = make_data(args.data, args.size, 1000, np.random.default_rng(args.seed), per_identity=5, spread=0.7,
                         noise=0.8)
        t_np = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            truth = exact_topk(data.gallery, data.probes, 10)
            t_np = min(t_np, time.perf_counter() - started)
        print(f"{args.size} {args.data}: numpy exact {t_np:.2f} s per 1,000 probes", flush=True)
        client = MilvusClient(uri=server.uri)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        params = client.prepare_index_params()
        params.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection("bench", schema=schema, index_params=params)
        started = time.perf_counter()
        for s in range(0, args.size, 8192):
            client.insert("bench", [{"id": i, "vector": data.gallery[i]} for i in range(s, min(args.size, s + 8192))])
        client.flush("bench")
        print(f"insert + flush {time.perf_counter() - started:.1f} s", flush=True)
        for index_type, build, key, values in variants:
            client.release_collection("bench")
            client.drop_index("bench", "vector")
            params = client.prepare_index_params()
            params.add_index("vector", index_type=index_type, metric_type="IP", params=build)
            started = time.perf_counter()
            client.create_index("bench", params)
            client.load_collection("bench")
            print(f"{index_type} {build}: build + load {time.perf_counter() - started:.1f} s", flush=True)
            for value in values:
                search = {"metric_type": "IP", "params": {key: value}}

                def call(probes, search=search):
                    return client.search("bench", data=probes, limit=10, search_params=search,
                                         consistency_level="Bounded")

                call(data.probes[:1])
                best, hits = float("inf"), []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    hits = call(data.probes)
                    best = min(best, time.perf_counter() - started)
                started = time.perf_counter()
                for i in range(10):
                    call(data.probes[i : i + 1])
                single = (time.perf_counter() - started) / 10 * 1e3
                ids = [[h["id"] for h in row] for row in hits]
                sims = [[h["distance"] for h in row] for row in hits]
                print(f"  {index_type} {build} {key}={value}: {best:.2f} s per 1,000 ({best / t_np:.2f}x numpy), "
                      f"single {single:.1f} ms, recall@10 {recall(ids, truth):.3f}, "
                      f"mates {mates_found(ids, sims, data.mates, 0.5):.4f}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
