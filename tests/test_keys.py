"""API keys: a token maps to its organisation; only a hash is stored; bad, unknown and revoked keys are refused."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from facegate.db import engine_for
from scheduler.keys import AuthenticationError, KeyStore, KeyStoreError, Principal


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path}/db.sqlite"


@pytest.fixture
def store(db_url):
    keys = KeyStore(db_url)
    keys.add_organisation("photo-archive-example", "Example Photo Archive", "photo_archive", jurisdiction="GB")
    return keys


def _secret_of(token: str) -> str:
    return token.split("_", 2)[2]


def test_token_authenticates_to_its_organisation(store):
    created = store.create_key("photo-archive-example", label="nightly search")
    assert created.secret_token.startswith(f"fg_{created.key_id}_")
    assert len(created.key_id) == 12
    assert created.secret_token not in repr(created)

    assert store.authenticate(created.secret_token) == Principal("photo-archive-example", created.key_id)
    (listed,) = store.list_keys()
    assert listed.last_used_at is not None


def test_stored_row_holds_no_secret(store, db_url):
    created = store.create_key("photo-archive-example")
    secret = _secret_of(created.secret_token)
    with engine_for(db_url).connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": created.key_id}).mappings().one()
    for column, value in row.items():
        assert secret not in str(value), f"column {column} holds the secret"
        assert created.secret_token not in str(value), f"column {column} holds the token"


def test_wrong_secret_is_refused(store):
    created = store.create_key("photo-archive-example")
    secret = _secret_of(created.secret_token)
    forged = f"fg_{created.key_id}_{'A' * len(secret)}"
    with pytest.raises(AuthenticationError, match=f"wrong secret for API key {created.key_id}"):
        store.authenticate(forged)


@pytest.mark.parametrize("token", ["", "not-a-key", "fg_", "fg_0123456789ab", "fg_XYZ_secret", "xx_0123456789ab_" + "a" * 43])
def test_malformed_token_is_refused(store, token):
    with pytest.raises(AuthenticationError, match="malformed API key"):
        store.authenticate(token)


def test_unknown_key_id_is_refused(store):
    created = store.create_key("photo-archive-example")
    unknown_id = "0" * 12 if created.key_id != "0" * 12 else "1" * 12
    with pytest.raises(AuthenticationError, match=f"unknown API key id {unknown_id}"):
        store.authenticate(f"fg_{unknown_id}_{_secret_of(created.secret_token)}")


def test_revoked_key_is_refused(store):
    created = store.create_key("photo-archive-example")
    other = store.create_key("photo-archive-example")
    assert store.revoke(created.key_id) is True
    assert store.revoke(created.key_id) is False  # already revoked
    with pytest.raises(AuthenticationError, match=f"key {created.key_id} was revoked at "):
        store.authenticate(created.secret_token)
    # Revoking one key leaves the organisation's other keys working.
    assert store.authenticate(other.secret_token).key_id == other.key_id
    with pytest.raises(KeyStoreError, match="no key with id"):
        store.revoke("ffffffffffff")


def test_list_keys_shows_no_secrets(store):
    store.add_organisation("child-safety-example", "Example Child Safety NGO", "child_safety")
    first = store.create_key("photo-archive-example", label="first")
    second = store.create_key("child-safety-example", label="second")
    listed = store.list_keys()
    assert {key.key_id for key in listed} == {first.key_id, second.key_id}
    for key in listed:
        assert not hasattr(key, "key_hash") and not hasattr(key, "secret_token")
        for created in (first, second):
            assert _secret_of(created.secret_token) not in repr(key)
    assert [key.key_id for key in store.list_keys("child-safety-example")] == [second.key_id]
    assert all(key.active for key in listed)


def test_key_for_unknown_organisation_is_refused(store):
    with pytest.raises(KeyStoreError, match="organisation 'nobody-example' does not exist"):
        store.create_key("nobody-example")
    assert store.list_keys() == []


def test_organisations_are_recorded_once(store):
    with pytest.raises(KeyStoreError, match="already exists"):
        store.add_organisation("photo-archive-example", "Again", "photo_archive")
    with pytest.raises(KeyStoreError, match="unknown sector"):
        store.add_organisation("typo-example", "Typo", "polise")
    (organisation,) = store.list_organisations()
    assert (organisation.id, organisation.sector, organisation.jurisdiction) == ("photo-archive-example", "photo_archive", "GB")
    assert organisation.created_at.tzinfo is not None
