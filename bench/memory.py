"""Worker memory: peak RSS while indexing N images, for two gallery sizes; it must not grow with the gallery.

    python -m bench.memory                       # 500 and 2,000 images (longest side 320-1024 px)
    python -m bench.memory --sizes 50,200        # a quick run

Each size runs in a fresh process doing what an index worker does: the pipeline (models loaded once)
and `run_index_chunk` chunk after chunk at the default chunk size, into a Milvus Lite store (a file
opened in the same process, as the embedded worker does; `--store server` puts it in a `milvus-lite
server` process of its own, as several workers share it). Peak RSS is the process's ru_maxrss; RSS
is also sampled every 0.2 s to show where the peak is reached. The images are smaller than the ingest
benchmark's (longest side up to 1024 px by default) so that 2,000 of them index in minutes on a
2-core CPU; the pipeline holds at most `prefetch` decoded images and one embedding batch at a time,
whatever the image size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def child(count: int, gallery: Path, store_uri: str, chunk: int | None) -> None:
    import psutil
    import torch

    from facegate.messages import IndexChunk
    from facegate.settings import Settings
    from index import GalleryStore
    from workers.chunks import run_index_chunk
    from workers.pipeline import FacePipeline

    proc = psutil.Process()
    samples: list[tuple[float, int, int]] = []  # (seconds, images done, rss bytes)
    state = {"done": 0, "stop": False}
    started = time.perf_counter()

    def sample() -> None:
        while not state["stop"]:
            samples.append((time.perf_counter() - started, state["done"], proc.memory_info().rss))
            time.sleep(0.2)

    settings = Settings(weights="untrained", data_dir=Path(tempfile.gettempdir()) / "facegate-bench",
                        **({"index_chunk_size": chunk} if chunk else {}))
    torch.set_num_threads(settings.torch_threads or torch.get_num_threads())
    pipeline = FacePipeline.from_settings(settings)
    pipeline.warm_up()
    store = GalleryStore(store_uri)
    paths = sorted(str(p) for p in gallery.glob("*.jpg"))[:count]
    assert len(paths) == count, f"gallery has {len(paths)} images, {count} asked"
    rss_loaded = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    faces = 0
    size = settings.index_chunk_size
    for n, start in enumerate(range(0, count, size)):
        msg = IndexChunk(job_id="mem", chunk_no=n, gallery="memory", paths=paths[start : start + size])
        result = run_index_chunk(msg, pipeline, store, [gallery])
        faces += sum(o.faces for o in result.items)
        state["done"] = start + len(msg.paths)
    elapsed = time.perf_counter() - started
    state["stop"] = True
    thread.join()
    stored = store.count("memory")
    store.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    # Peak of the sampled RSS once the first 10% of the images are done (after the warm-up of the store).
    later = [rss for _, done, rss in samples if done >= count // 10] or [rss for *_, rss in samples]
    # Peak RSS within each tenth of the images: flat, or climbing with the images indexed?
    by_tenth = [max([rss for _, done, rss in samples if tenth * count // 10 <= done < (tenth + 1) * count // 10] or [0])
                for tenth in range(10)]
    print(json.dumps({"peak_rss_by_tenth_mib": [b >> 20 for b in by_tenth]}))
    print(json.dumps({"images": count, "faces": faces, "stored": stored, "seconds": elapsed, "peak_rss": peak,
                      "rss_after_load": rss_loaded, "peak_rss_after_10pct": max(later),
                      "rss_end": samples[-1][2] if samples else proc.memory_info().rss}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,2000")
    parser.add_argument("--max-side", type=int, default=1024, help="largest generated image side (default 1024)")
    parser.add_argument("--store", choices=["file", "server"], default="file")
    parser.add_argument("--chunk", type=int, default=None, help="images per chunk (default: index_chunk_size)")
    parser.add_argument("--gallery-dir", default=None, help="keep the generated gallery here and reuse it")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gallery", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--uri", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.gallery), args.uri, args.chunk)
        return

    from bench.common import UNTRAINED_BANNER, TempGallery, command_line, machine, table

    print(UNTRAINED_BANNER)
    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, peaks = [], []
    with TempGallery(max(sizes), max_side=args.max_side, keep=args.gallery_dir) as gallery, \
            tempfile.TemporaryDirectory(prefix="facegate-bench-mem-") as tmp:
        print(f"gallery: {gallery.describe()}; store: {args.store}")
        gallery_dir = gallery.paths[0].parent
        for size in sizes:
            server = None
            data = Path(tmp) / f"store-{size}"
            if args.store == "server":
                port = _free_port()
                data.mkdir()
                server = subprocess.Popen([str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir",
                                           str(data), "--host", "127.0.0.1", "--port", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                uri = f"http://127.0.0.1:{port}"
                for _ in range(600):
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                        break
                    except OSError:
                        time.sleep(0.1)
            else:
                uri = str(data / "milvus.db")
            cmd = [sys.executable, "-m", "bench.memory", "--child", str(size), "--gallery", str(gallery_dir),
                   "--uri", uri] + (["--chunk", str(args.chunk)] if args.chunk else [])
            try:
                out = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                                     check=True, env={**os.environ})
            except subprocess.CalledProcessError as exc:
                sys.exit(f"child failed:\n{exc.stderr[-3000:]}")
            finally:
                if server:
                    server.terminate()
                    server.wait(timeout=60)
            lines = out.stdout.strip().splitlines()
            r = json.loads(lines[-1])
            print(f"{size} images, peak RSS MiB in each tenth of the images: {json.loads(lines[-2])['peak_rss_by_tenth_mib']}")
            peaks.append(r["peak_rss"])
            mib = lambda b: b / 2**20  # noqa: E731 -- a one-line helper, clearer inline
            rows.append([r["images"], r["faces"], r["stored"], r["seconds"], r["images"] / r["seconds"],
                         mib(r["rss_after_load"]), mib(r["peak_rss_after_10pct"]), mib(r["peak_rss"]), mib(r["rss_end"]),
                         f"{100 * (r['peak_rss'] / peaks[0] - 1):+.1f}%"])
    print()
    print(table(["images", "faces", "rows stored", "seconds", "images/s", "RSS after model load MiB",
                 "peak RSS after first 10% MiB", "peak RSS MiB", "RSS at end MiB", "peak vs first size"], rows))
    growth = 100 * (peaks[-1] / peaks[0] - 1)
    print(f"\npeak RSS growth from {sizes[0]} to {sizes[-1]} images: {growth:+.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
