"""Store failures: transient ones are retried by the task, and every one reads as a sentence naming the store."""

from __future__ import annotations

import pytest
from pymilvus.exceptions import ConnectError, ConnectionConfigException, MilvusException

from index import StoreFailed, StoreUnavailable, describe, is_transient, store_errors
from workers.tasks import TRANSIENT_ERRORS


@pytest.mark.parametrize("exc, transient", [
    (ConnectError(message="Fail connecting to server on 127.0.0.1:19530"), True),
    (MilvusException(message="service unavailable: the server is restarting"), True),
    (MilvusException(message="database is locked"), True),
    (MilvusException(code=8, message="rate limit exceeded"), True),
    (MilvusException(message="cannot parse expression: image_path == 'x"), False),
    (ConnectionConfigException(), False),
])
def test_a_store_error_is_transient_only_when_another_try_can_help(exc, transient):
    assert is_transient(exc) is transient


def test_an_empty_exception_still_reads_as_a_sentence_naming_the_store():
    sentence = describe(MilvusException(), "http://u:secret@milvus:19530")
    assert sentence.startswith("the vector store at http://milvus:19530 refused the request: MilvusException")
    assert "no message" in sentence
    assert "MilvusException()" not in sentence and "secret" not in sentence


def test_store_errors_turn_into_retry_or_final_with_the_cause():
    with pytest.raises(StoreUnavailable, match=r"could not be reached: ConnectError.*19530"):
        with store_errors("/data/milvus.db"):
            raise ConnectError(message="Fail connecting to server on 127.0.0.1:19530")
    with pytest.raises(StoreFailed, match=r"refused the request: MilvusException.*cannot parse"):
        with store_errors("/data/milvus.db"):
            raise MilvusException(message="cannot parse expression")
    # Not the store's: passes through untouched (bad images fail as items, not as exceptions).
    with pytest.raises(ValueError):
        with store_errors("/data/milvus.db"):
            raise ValueError("not a store error")


def test_the_tasks_retry_what_the_store_calls_unavailable_and_nothing_final():
    assert issubclass(StoreUnavailable, TRANSIENT_ERRORS)
    assert not issubclass(StoreFailed, TRANSIENT_ERRORS)


def test_a_server_that_is_not_there_is_retried_not_failed():
    # pymilvus raises a bare MilvusException (code 2) here, which the tasks used to fail as items.
    from index import GalleryStore

    with pytest.raises(StoreUnavailable, match=r"at http://127\.0\.0\.1:1 could not be reached: .*server unavailable"):
        with store_errors("http://127.0.0.1:1"):
            GalleryStore("http://127.0.0.1:1").has_gallery("archive")
