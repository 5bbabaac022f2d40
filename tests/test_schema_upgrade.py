"""An existing database from an older FaceGate gains the columns a newer one added, keeping its rows."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, select

from facegate.db import Base, SchemaTooOld, create_schema, engine_for, session_scope
from scheduler.models import Gallery


def _drop_column(url: str, table: str, column: str) -> None:
    with engine_for(url).begin() as connection:
        connection.exec_driver_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')


def test_a_column_added_since_the_database_was_made_is_added_with_its_default(any_database_url):
    url = any_database_url
    create_schema(url)
    with session_scope(url) as session:
        session.add(Gallery(name="acme/archive", label="archive", owner="acme", folder=None))
    # The database as an older FaceGate left it: no `nightly`, no `label`.
    _drop_column(url, "galleries", "nightly")
    with engine_for(url).begin() as connection:
        connection.exec_driver_sql('DROP INDEX "ix_galleries_label"')
    _drop_column(url, "galleries", "label")
    assert "nightly" not in {c["name"] for c in inspect(engine_for(url)).get_columns("galleries")}

    create_schema(url)

    columns = {c["name"] for c in inspect(engine_for(url)).get_columns("galleries")}
    assert {"nightly", "label"} <= columns
    assert "ix_galleries_label" in {i["name"] for i in inspect(engine_for(url)).get_indexes("galleries")}
    with session_scope(url) as session:
        gallery = session.execute(select(Gallery)).scalar_one()
        assert gallery.name == "acme/archive"
        assert gallery.nightly is False          # the ORM's default, given to the existing row
        assert gallery.label is None
    create_schema(url)                           # a second start changes nothing


def test_a_required_column_without_a_default_is_named_instead_of_failing_later(tmp_path, monkeypatch):
    metadata = MetaData()
    Table("widgets", metadata, Column("id", Integer, primary_key=True))
    url = f"sqlite:///{tmp_path / 'old.db'}"
    metadata.create_all(engine_for(url))
    newer = Table("widgets", Base.metadata, Column("id", Integer, primary_key=True),
                  Column("colour", String(8), nullable=False))
    try:
        with pytest.raises(SchemaTooOld, match="'widgets' has no column 'colour'"):
            create_schema(url)
    finally:
        Base.metadata.remove(newer)
