"""Database engine and sessions: a SQLite file by default, PostgreSQL (or any SQLAlchemy URL) by setting."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from datetime import datetime, timezone

import logging

from sqlalchemy import Column, DateTime, Table, create_engine, event, inspect, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.schema import CreateColumn
from sqlalchemy.sql.schema import CallableColumnDefault, ScalarElementColumnDefault
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    """Declarative base for every table FaceGate owns."""


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, _dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, _dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class DatabaseUnavailable(RuntimeError):
    """The job database cannot be used just now: locked by another process, its disk full, read-only, or out of
    reach. The message is a sentence naming the database and the cause; workers retry it, the API answers 503."""


# What the drivers say (SQLite, psycopg), and the sentence a person reads.
_UNAVAILABLE = (
    (("database is locked", "database table is locked", "database is busy"), "is locked by another process"),
    (("database or disk is full", "no space left on device", "disk full"), "cannot be written: its disk is full"),
    (("readonly database", "read-only", "read only"), "is read-only"),
    (("unable to open database", "disk i/o error"), "cannot be opened or read"),
    (("could not connect", "connection refused", "server closed the connection", "connection timed out",
      "the database system is starting up", "the database system is shutting down", "terminating connection"),
     "is not reachable"),
)


def _where(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    return make_url(url).render_as_string(hide_password=True)


def _raise_unavailable(url: str, context) -> None:
    """handle_error hook: a database that cannot be used now becomes DatabaseUnavailable, with its sentence."""
    text = str(context.original_exception).strip()
    for needles, why in _UNAVAILABLE:
        if any(n in text.lower() for n in needles):
            raise DatabaseUnavailable(f"the job database {_where(url)} {why} ({text.splitlines()[0]})") \
                from context.original_exception


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    engine = _create_engine(url)
    event.listen(engine, "handle_error", lambda context: _raise_unavailable(url, context))
    return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets the CLI read job progress while another process writes it.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


log = logging.getLogger(__name__)


class SchemaTooOld(RuntimeError):
    """The database lacks a column this version needs and cannot add on its own."""


def create_schema(url: str) -> None:
    """Create missing tables, then add the columns a newer FaceGate gave to tables that already exist.

    Only additive changes are made (a column that may be empty, or has a constant default); anything else
    stops with a sentence naming the table and column instead of failing later on a query.
    """
    engine = engine_for(url)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)


def _add_missing_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                _add_column(engine, table, column)


def _add_column(engine: Engine, table: Table, column: Column) -> None:
    default = column.default
    if default is None and not column.nullable and column.server_default is None:
        raise SchemaTooOld(
            f"the database's table {table.name!r} has no column {column.name!r}, which this version of "
            "FaceGate needs and cannot fill for existing rows; upgrade it by hand or start a new database")
    # Added as nullable so that every backend accepts it on a table with rows; the rows then get the
    # value a new row would get from the ORM, through the column's own type.
    added = column._copy()
    added.nullable = True
    ddl = CreateColumn(added).compile(dialect=engine.dialect)
    quoted = engine.dialect.identifier_preparer.quote(table.name)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"ALTER TABLE {quoted} ADD COLUMN {ddl}")
    except (OperationalError, ProgrammingError):
        # Another process starting at the same moment may have added it first.
        if column.name in {c["name"] for c in inspect(engine).get_columns(table.name)}:
            return
        raise
    if isinstance(default, (ScalarElementColumnDefault, CallableColumnDefault)):
        # A callable default is called as the ORM would for a new row; ours take no context (SQLAlchemy wraps a
        # no-argument callable to accept one and ignore it), so there is none to pass.
        value = default.arg(None) if isinstance(default, CallableColumnDefault) else default.arg  # type: ignore[arg-type]
        with engine.begin() as connection:
            connection.execute(table.update().where(column.is_(None)).values({column.name: value}))
    with engine.begin() as connection:
        for index in table.indexes:
            if column.name in index.columns:
                index.create(connection, checkfirst=True)
    log.warning("database upgraded: added column %s.%s", table.name, column.name)


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back when it raises."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
