"""Queue overhead: Celery and Redis per chunk, and the share of a real index job spent outside the models.

    python -m bench.queue                       # 200 trivial chunks, then a real index job of 96 images
    python -m bench.queue --chunks 50 --index-images 32

Part 1 sends a job of trivial chunks through a real Redis and a real Celery worker process, configured
exactly as FaceGate's (facegate.queue.make_celery: acks_late, prefetch 1, task events, JSON, threads
pool, concurrency 1). The task is a bench-only no-op taking a chunk-sized message, so the time per chunk
is the queue's own cost: send, deliver, ack, store the result, fetch it.

Part 2 runs a real index job through JobService (policy gate, signed ticket, `facegate worker`, Milvus
Lite file) on a generated gallery, at the default chunk size, and reads the worker's log: the
pipeline logs each chunk's detection and embedding seconds, Celery each task's duration. The share of
the job's wall time outside detection and embedding is everything else (decoding not hidden behind the
models, Milvus upserts, the queue, the scheduler's polling, start-up of the first chunk).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOOP_TASK = "bench.noop_chunk"
QUEUE = "facegate_bench"


def _app(broker_url: str):
    from facegate.queue import make_celery
    from facegate.settings import Settings

    app = make_celery(Settings(broker_url=broker_url, data_dir=Path(tempfile.gettempdir()) / "facegate-bench"))

    @app.task(name=NOOP_TASK)
    def noop_chunk(message: dict) -> dict:
        # What a chunk returns, minus the work: one outcome per path.
        return {"job_id": message["job_id"], "chunk_no": message["chunk_no"],
                "items": [{"path": p, "ok": True, "faces": 0} for p in message["paths"]]}

    return app


def serve_noop(broker_url: str) -> None:
    app = _app(broker_url)
    app.worker_main(["worker", "--loglevel=WARNING", "--pool=threads", "--concurrency=1", "--without-gossip",
                     "--without-mingle", "-Q", QUEUE, "-n", f"bench-noop@%h-{os.getpid()}"])


def _wait_for_worker(app, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("worker exited:\n" + log.read_text()[-3000:])
        if app.control.ping(timeout=0.5):
            return
    raise RuntimeError("worker did not answer:\n" + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def trivial_overhead(broker_url: str, chunks: int, chunk_size: int, tmp: Path) -> dict:
    import redis

    redis.Redis.from_url(broker_url).flushdb()
    log = tmp / "noop-worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "bench.queue", "--serve-noop", broker_url],
                            cwd=Path(__file__).resolve().parent.parent, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    app = _app(broker_url)
    try:
        _wait_for_worker(app, proc, log)
        paths = [f"/gallery/img{n:05d}.jpg" for n in range(chunk_size)]
        message = lambda n: {"job_id": "bench", "chunk_no": n, "gallery": "bench", "paths": paths,  # noqa: E731 -- a one-line helper, clearer inline
                             "ticket": "x" * 200}
        # Warm-up.
        app.send_task(NOOP_TASK, args=[message(0)], queue=QUEUE).get(timeout=60)
        # A job: every chunk queued at once (as JobService does), then every result collected.
        started = time.perf_counter()
        results = [app.send_task(NOOP_TASK, args=[message(n)], queue=QUEUE, task_id=f"bench-{n:05d}")
                   for n in range(chunks)]
        sent = time.perf_counter()
        for r in results:
            r.get(timeout=600)
        job_s = time.perf_counter() - started
        # Latency: one chunk at a time, send then wait.
        latencies = []
        for n in range(min(chunks, 50)):
            t = time.perf_counter()
            app.send_task(NOOP_TASK, args=[message(n)], queue=QUEUE).get(timeout=60)
            latencies.append(time.perf_counter() - t)
        return {"chunks": chunks, "job_s": job_s, "send_s": sent - started, "per_chunk_s": job_s / chunks,
                "latency_s": sorted(latencies)[len(latencies) // 2]}
    finally:
        app.close()
        _stop(proc)
        redis.Redis.from_url(broker_url).flushdb()


ANALYSED = re.compile(r"analysed (\d+) images, (\d+) faces in ([\d.]+) s: detect ([\d.]+) s, embed ([\d.]+) s, "
                      r"detect or embed ([\d.]+) s, decode ([\d.]+) s \(threads\), crop ([\d.]+) s \(threads\), waiting for decode ([\d.]+) s")
SUCCEEDED = re.compile(r"Task facegate\.index_chunk\[[^\]]+\] succeeded in ([\d.]+)s")


def real_index_job(broker_url: str, images: int, tmp: Path, chunk_size: int | None) -> dict:
    import redis

    from cli.embedded import settings_to_env
    from facegate.queue import make_celery
    from facegate.settings import Settings
    from policy import load_registry
    from scheduler.dispatch import CeleryTaskQueue
    from scheduler.keys import KeyStore
    from scheduler.service import JobService

    from bench.common import make_gallery

    redis.Redis.from_url(broker_url).flushdb()
    galleries = tmp / "galleries"
    make_gallery(galleries / "bench", images)
    extra = {"index_chunk_size": chunk_size} if chunk_size else {}
    settings = Settings(data_dir=tmp / "data", gallery_roots=[galleries], broker_url=broker_url,
                        milvus_uri=str(tmp / "milvus.db"), weights="untrained", **extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    env.update(settings_to_env(settings))
    log = tmp / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "cli.app", "worker", "--loglevel", "INFO"],
                            cwd=Path(__file__).resolve().parent.parent, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    app = make_celery(settings)
    try:
        _wait_for_worker(app, proc, log)
        service = JobService(settings, CeleryTaskQueue(app))
        keys = KeyStore(settings.resolved_database_url)
        org = "university-lab-example"  # in the shipped registry: purpose `research` is allowed
        listed = load_registry(settings.policy_registry).organisation(org)
        keys.add_organisation(org, listed.name if listed else org, listed.sector if listed else "commercial")
        principal = keys.authenticate(keys.create_key(org, "bench").secret_token)
        started = time.perf_counter()
        job = service.submit_index(galleries / "bench", "benchq", principal, "research")
        done = service.wait(job.id, timeout_s=3600, poll_s=0.05)
        job_s = time.perf_counter() - started
        assert done.state == "done", (done.state, done.errors)
        time.sleep(0.5)
        text = log.read_text()
    finally:
        app.close()
        _stop(proc)
        redis.Redis.from_url(broker_url).flushdb()
    chunks = [tuple(float(v) for v in m.groups()) for m in ANALYSED.finditer(text)]
    tasks = [float(m.group(1)) for m in SUCCEEDED.finditer(text)]
    return {"images": done.total_items, "faces": done.faces, "chunks": len(tasks), "chunk_size": settings.index_chunk_size,
            "job_s": job_s, "detect_s": sum(c[3] for c in chunks), "embed_s": sum(c[4] for c in chunks),
            "models_s": sum(c[5] for c in chunks),
            "analyse_s": sum(c[2] for c in chunks), "tasks_s": sum(tasks), "untrained": done.untrained}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (default: local 6379)")
    parser.add_argument("--db", type=int, default=12, help="Redis database number, flushed before and after")
    parser.add_argument("--chunks", type=int, default=200, help="trivial chunks in the job (default 200)")
    parser.add_argument("--index-images", type=int, default=96, help="images in the real index job (0: skip)")
    parser.add_argument("--chunk-size", type=int, default=None, help="images per chunk (default: the setting)")
    parser.add_argument("--serve-noop", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return

    from facegate.settings import Settings

    from bench.common import UNTRAINED_BANNER, command_line, machine, table

    if args.index_images:
        print(UNTRAINED_BANNER)
    print(f"# {command_line()}")
    print(f"machine: {machine()}")
    broker = f"{args.redis.rstrip('/')}/{args.db}"
    chunk_size = args.chunk_size or Settings().index_chunk_size
    with tempfile.TemporaryDirectory(prefix="facegate-bench-queue-") as tmp_name:
        tmp = Path(tmp_name)
        trivial = trivial_overhead(broker, args.chunks, chunk_size, tmp)
        print()
        print(table(["trivial job", "chunks", "job seconds", "queue seconds per chunk (job / chunks)",
                     "round trip per chunk, one at a time (median)", "sending all chunks"],
                    [["no-op chunks, real Redis + Celery worker", trivial["chunks"], trivial["job_s"],
                      f"{trivial['per_chunk_s'] * 1e3:.1f} ms", f"{trivial['latency_s'] * 1e3:.1f} ms",
                      f"{trivial['send_s']:.2f} s"]]))
        if not args.index_images:
            return
        real = real_index_job(broker, args.index_images, tmp, args.chunk_size)
    per_chunk_job = real["job_s"] / real["chunks"]
    models = real["models_s"]  # detection and embedding may overlap: their union
    print()
    print(table(["real index job", "images", "faces", "chunks x size", "job wall s", "task time s (sum)",
                 "analyse s (sum)", "detect s", "embed s", "detect or embed s", "share outside detect+embed",
                 "queue overhead per chunk / chunk time"],
                [["JobService -> Redis -> facegate worker -> Milvus Lite", real["images"], real["faces"],
                  f"{real['chunks']} x {real['chunk_size']}", real["job_s"], real["tasks_s"], real["analyse_s"],
                  real["detect_s"], real["embed_s"], real["models_s"], f"{100 * (1 - models / real['job_s']):.1f}%",
                  f"{100 * trivial['per_chunk_s'] / per_chunk_job:.2f}%"]]))
    print(f"\nqueue overhead = {trivial['per_chunk_s'] * 1e3:.1f} ms per chunk (trivial job) against "
          f"{per_chunk_job:.2f} s per chunk of {real['chunk_size']} images (real job): "
          f"{100 * trivial['per_chunk_s'] / per_chunk_job:.2f}% (target < 5%)")
    print(f"outside detection and embedding: {real['job_s'] - models:.2f} s of {real['job_s']:.2f} s "
          f"({100 * (1 - models / real['job_s']):.1f}%); of it, outside the Celery tasks: "
          f"{real['job_s'] - real['tasks_s']:.2f} s, inside tasks but outside analyse() (Milvus upserts, "
          f"ticket check, result): {real['tasks_s'] - real['analyse_s']:.2f} s")


if __name__ == "__main__":
    main()
