"""A job database that cannot be used (disk full, locked by another process) is a sentence naming it and the
cause: DatabaseUnavailable in code, 503 from the API, one line and exit code 1 from the CLI; never a traceback."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine, event, text

from facegate.db import DatabaseUnavailable, _raise_unavailable, create_schema, engine_for
from scheduler.keys import KeyStore
from tests.conftest import make_settings, register


def _fill_the_disk(url: str) -> None:
    """From now on the database file cannot grow: SQLite's own 'database or disk is full'."""
    engine = engine_for(url)

    def cap(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count={pages}")
        cursor.close()

    event.listen(engine, "connect", cap)
    engine.dispose()


@pytest.fixture
def full(tmp_path):
    settings = make_settings(tmp_path)
    url = settings.resolved_database_url
    create_schema(url)
    from scheduler.api import create_app

    create_app(settings, None, collect_every_s=None)  # every table the API needs, while there is room
    principal, token = register(settings)
    _fill_the_disk(url)
    yield settings, principal, token
    engine_for.cache_clear()


def _write_a_lot(store: KeyStore) -> None:
    for n in range(200):  # far more than the free space left in the last page
        store.add_organisation(f"org-{n}-" + "x" * 40, "An organisation with a long name " * 8, "research")


def test_a_full_disk_is_a_sentence_naming_the_database(full):
    settings, _, _ = full
    with pytest.raises(DatabaseUnavailable) as raised:
        _write_a_lot(KeyStore(settings.resolved_database_url))
    message = str(raised.value)
    assert message.startswith(f"the job database {settings.data_dir / 'facegate.db'} cannot be written: its disk "
                              "is full"), message


def test_the_api_answers_503_with_the_sentence(full):
    from fastapi.testclient import TestClient

    from scheduler.api import create_app
    from tests.e2e import api_headers

    settings, _, token = full
    with TestClient(create_app(settings, None, collect_every_s=None)) as api:
        for n in range(200):
            folder = settings.gallery_roots[1] / f"f{n}"
            folder.mkdir()
            answer = api.post("/v1/galleries", headers=api_headers(token),
                              json={"name": f"g{n}" + "x" * 50, "purpose": "research",
                                    "folder": str(folder)})
            if answer.status_code != 201:
                break
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.headers["retry-after"] == "30"
        assert "its disk is full" in answer.json()["detail"]


def test_the_cli_says_so_in_one_line_and_exits_1(full, monkeypatch, capsys):
    from cli import app as cli_app
    from facegate.settings import get_settings

    settings, _, _ = full
    monkeypatch.setenv("FACEGATE_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    monkeypatch.setattr("sys.argv", ["facegate", "org", "add", "an-org", "--sector", "research",
                                     "--name", "n" * 20000])  # more than a page: the file must grow
    with pytest.raises(SystemExit) as exited:
        cli_app.main()
    get_settings.cache_clear()
    assert exited.value.code == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "error: the job database" in said and "its disk is full" in said and "Traceback" not in said


def test_a_locked_database_is_named_as_locked(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    holder = sqlite3.connect(tmp_path / "locked.db")
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    # FaceGate's own engine waits 30 s for a lock; the same hook on an engine that waits a tenth of a second.
    engine = create_engine(url, connect_args={"timeout": 0.1})
    event.listen(engine, "handle_error", lambda context: _raise_unavailable(url, context))
    with pytest.raises(DatabaseUnavailable, match="is locked by another process"):
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))
    holder.rollback()
    holder.close()
