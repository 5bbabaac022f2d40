"""The scheduler's side of the queue: send a chunk by task name, read its state and result back."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

from celery import Celery, states
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from facegate.redaction import task_display  # noqa: F401 - where the scheduler's callers have read it from
from facegate.vocabulary import PROGRESS

log = logging.getLogger(__name__)
# What a broker that is away raises (a refused or dropped connection, a timeout), from redis-py or kombu.
BROKER_ERRORS = (ConnectionError, TimeoutError, RedisError, OperationalError)
# Kombu's Redis transport keeps a delivered, unacknowledged message in this hash (and its delivery tag in
# the sorted set) until the worker acks it, or the visibility timeout gives it to another worker.
UNACKED_HASH, UNACKED_INDEX = "unacked", "unacked_index"
# Kombu's key for a queue's priority levels other than 0: NAME + "\x06\x16" + level.
_PRIORITY_SEP = "\x06\x16"


@dataclass(frozen=True)
class ChunkStatus:
    state: str  # a Celery state (celery.states), or PROGRESS while a worker reports how far it got
    result: dict | None = None
    progress_done: int = 0
    error: str | None = None
    worker: str | None = None  # the worker that said it started the task (Celery's STARTED or our PROGRESS meta)

    @property
    def finished(self) -> bool:
        return self.state in (states.SUCCESS, states.FAILURE)


@dataclass(frozen=True)
class BrokerSnapshot:
    """Where every task is, seen at one moment: waiting in a queue, delivered but not acknowledged, or held
    by a worker that answered (active, reserved, or scheduled for a retry). `workers` are those that answered:
    Celery's remote control is answered by every live worker, busy or not (threads and prefork pools)."""

    queued: frozenset[str]
    unacked: dict[str, str]  # task id -> kombu delivery tag
    active: dict[str, str]  # task id -> worker hostname
    held: dict[str, str]  # active, reserved or scheduled: task id -> worker hostname
    workers: frozenset[str] = field(default_factory=frozenset)


class TaskQueue(Protocol):
    def send(self, task_name: str, message: dict, task_id: str, queue: str | None = None) -> None: ...

    def status(self, task_id: str) -> ChunkStatus: ...

    def forget(self, task_id: str) -> None: ...

    def revoke(self, task_ids: list[str]) -> None: ...

    def observe(self, queues: set[str], task_ids: set[str]) -> BrokerSnapshot | None:
        """Where these tasks are now; None where the broker cannot be looked into (only Redis can)."""
        ...

    def drop_unacked(self, delivery_tags: list[str]) -> None:
        """Forget deliveries to workers that are gone, so that the visibility timeout never runs them again."""
        ...


class CeleryTaskQueue:
    """Sends by name only: the scheduler never imports the worker code."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, task_name: str, message: dict, task_id: str, queue: str | None = None) -> None:
        # The app (facegate.queue.make_celery) writes the message's display, not its ticket, as argsrepr.
        self.app.send_task(task_name, args=[message], task_id=task_id, queue=queue or "facegate")

    def status(self, task_id: str) -> ChunkStatus:
        res = AsyncResult(task_id, app=self.app)
        state = res.state
        if state == states.SUCCESS:
            return ChunkStatus(state, result=res.result)
        if state == states.FAILURE:
            # The worker's own sentence where it gave one; the exception's name alone rather than an empty repr.
            text = str(res.result).strip()
            return ChunkStatus(state, error=f"{type(res.result).__name__}: {text}" if text else type(res.result).__name__)
        info = res.info if isinstance(res.info, dict) else {}
        worker = info.get("hostname") if state in (states.STARTED, PROGRESS) else None
        if state == PROGRESS:
            return ChunkStatus(state, progress_done=int(info.get("done", 0)), worker=worker)
        return ChunkStatus(state, worker=worker)

    def forget(self, task_id: str) -> None:
        AsyncResult(task_id, app=self.app).forget()

    def revoke(self, task_ids: list[str]) -> None:
        # Workers drop revoked tasks still in the queue; a chunk already running finishes.
        self.app.control.revoke(task_ids)

    # Looking into the broker and the workers (the reconciler's eyes) ---------------------------------------

    def observe(self, queues: set[str], task_ids: set[str],
                reply_timeout_s: float = 1.5) -> BrokerSnapshot | None:
        if not str(self.app.conf.broker_url or "").startswith(("redis://", "rediss://", "redis+socket://")):
            return None
        try:
            return self._observe(queues, task_ids, reply_timeout_s)
        except BROKER_ERRORS:
            # A connection of a broker that just restarted fails once: once more, on a new one.
            try:
                return self._observe(queues, task_ids, reply_timeout_s)
            except BROKER_ERRORS as exc:
                log.warning("the broker could not be looked into (%s): nothing reconciled this time", exc)
                return None

    def _observe(self, queues: set[str], task_ids: set[str], reply_timeout_s: float) -> BrokerSnapshot:
        # Workers first, then the broker: a task moves queue -> unacked -> a worker's hands, so one that
        # finishes or is taken between the two looks is seen in a later place or finished, never missed twice.
        # One broadcast: every live worker answers with which of these tasks it holds, and in what state.
        with self.app.connection_for_write() as conn:  # a new connection, not a pooled one that may be dead
            replies = self.app.control.inspect(timeout=reply_timeout_s, connection=conn).query_task(
                *sorted(task_ids)) or {}
        active: dict[str, str] = {}
        held: dict[str, str] = {}
        for hostname, tasks in replies.items():
            for task_id, (where, _info) in (tasks or {}).items():
                held[task_id] = hostname
                if where == "active":
                    active[task_id] = hostname
        with self.app.connection_for_read() as conn:
            client = conn.default_channel.client
            queued: set[str] = set()
            for queue in queues:
                keys = [queue] + [f"{queue}{_PRIORITY_SEP}{level}" for level in range(1, 10)]
                for key in keys:
                    for raw in client.lrange(key, 0, -1):
                        if task_id := _task_id(raw):
                            queued.add(task_id)
            unacked: dict[str, str] = {}
            for tag, raw in (client.hgetall(UNACKED_HASH) or {}).items():
                if task_id := _task_id(raw, wrapped=True):
                    unacked[task_id] = tag.decode() if isinstance(tag, bytes) else str(tag)
        return BrokerSnapshot(frozenset(queued), unacked, active, held, frozenset(replies))

    def drop_unacked(self, delivery_tags: list[str]) -> None:
        if not delivery_tags:
            return
        with self.app.connection_for_write() as conn:
            client = conn.default_channel.client
            client.hdel(UNACKED_HASH, *delivery_tags)
            client.zrem(UNACKED_INDEX, *delivery_tags)


def _task_id(raw: bytes | str, *, wrapped: bool = False) -> str | None:
    """The Celery task id of a message as kombu stores it (the unacked hash wraps it with exchange and key)."""
    try:
        payload = json.loads(raw)
        if wrapped:
            payload = payload[0]
        headers = payload.get("headers") or {}
        return headers.get("id") or (payload.get("properties") or {}).get("correlation_id")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        log.warning("a message in the broker could not be read; the reconciler ignores it")
        return None
