"""The recorded legal authorisations (warrants, court orders, exigent circumstances): one table, read by the
scheduler when a job is submitted and by the worker when it runs (a withdrawn or lapsed authorisation is
refused at execution). Recording, confirming and withdrawing them is scheduler/authorisations.py's job;
deciding whether one is valid is policy/authorisation.py's."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from facegate.db import Base, UTCDateTime, session_scope


class AuthorisationRow(Base):
    __tablename__ = "authorisations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    # The issuing authority's own identifier (warrant or case number).
    reference: Mapped[str] = mapped_column(String(256))
    issuing_authority: Mapped[str] = mapped_column(String(256))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    recorded_by: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the API key
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    withdrawn_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in (
            "id", "organisation_id", "kind", "reference", "issuing_authority", "issued_at", "confirmed_at",
            "withdrawn_at", "withdrawn_reason")}


def read_authorisation(db_url: str, authorisation_id: str) -> dict | None:
    """The recorded authorisation's fields (as policy.authorisation.AuthorisationRecord takes them), or None."""
    with session_scope(db_url) as s:
        row = s.get(AuthorisationRow, authorisation_id)
        return row.as_dict() if row is not None else None
