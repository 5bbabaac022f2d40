"""What a store failure means for the work: worth another try (the store is out of reach) or final, and a
sentence naming the store and the cause, never an empty exception repr such as `MilvusException()`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from pymilvus.exceptions import ConnectError, ErrorCode, MilvusException, MilvusUnavailableException

# Words in a Milvus or gRPC message that mean the server is restarting, overloaded or out of reach,
# or (Milvus Lite) that another process holds its file for a moment.
_TRANSIENT_WORDS = ("unavailable", "connection refused", "deadline exceeded", "not ready", "database is locked",
                    "failed to connect", "server is closing", "too many requests")


class StoreUnavailable(Exception):
    """The store could not be reached now; the task retries with backoff and fails with this sentence."""


class StoreFailed(Exception):
    """The store answered with an error that another try will not change."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectError, MilvusUnavailableException)):
        return True
    if isinstance(exc, MilvusException):
        if getattr(exc, "retriable", False) or exc.code == ErrorCode.RATE_LIMIT:
            return True
        return any(word in (exc.message or "").lower() for word in _TRANSIENT_WORDS)
    return False


def describe(exc: BaseException, store: str) -> str:
    """"the vector store at URI ...: cause", where the cause is the exception's own message if it has one."""
    kind = type(exc).__name__
    message = (exc.message if isinstance(exc, MilvusException) else str(exc)).strip()
    code = f" (code {exc.code})" if isinstance(exc, MilvusException) and exc.code not in (None, 0) else ""
    cause = f"{kind}{code}: {message}" if message else f"{kind}{code}, with no message from the store"
    parts = urlsplit(store)
    store = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never the credentials
    state = "could not be reached" if is_transient(exc) else "refused the request"
    return f"the vector store at {store} {state}: {cause}"


@contextmanager
def store_errors(store: str) -> Iterator[None]:
    """Turns the store's exceptions into StoreUnavailable (retry) or StoreFailed (final), each with a sentence."""
    try:
        yield
    except (StoreUnavailable, StoreFailed):
        raise
    except MilvusException as exc:
        sentence = describe(exc, store)
        if is_transient(exc):
            raise StoreUnavailable(sentence) from exc
        raise StoreFailed(sentence) from exc
