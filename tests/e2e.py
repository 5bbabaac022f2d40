"""Helpers for end-to-end tests: real worker processes, a real Milvus Lite server, the real CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from facegate.queue import make_celery
from facegate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    from cli.embedded import settings_to_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    env.update(settings_to_env(settings))
    env.update(extra)
    return env


class MilvusLiteServer:
    """`milvus-lite server` on loopback: how several processes share one Milvus Lite store."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """(Again, after stop(): the same data and port, as a restarted server.)"""
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir", str(self.data_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("milvus-lite server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class WorkerProcess:
    """`facegate worker` as its own process, as in production."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.app", "worker", "--loglevel", "INFO"],
                                     cwd=ROOT, env=env_for(settings), stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT)
        app = make_celery(settings)
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("worker exited:\n" + log.read_text()[-3000:])
                if app.control.ping(timeout=0.5):
                    return
            raise RuntimeError("worker did not answer:\n" + log.read_text()[-3000:])
        finally:
            app.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.app", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def api_headers(token: str) -> dict[str, str]:
    return {"X-API-Key": token}


def wait_for_api_job(client, token: str, job_id: str, timeout: float = 300) -> dict:
    """Poll the API until the job leaves queued/running; its last view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=api_headers(token)).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.3)
    raise TimeoutError(job)
