"""The scheduler's side of the queue: send a chunk by task name, read its state and result back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from celery import Celery, states
from celery.result import AsyncResult

from facegate.vocabulary import PROGRESS


@dataclass(frozen=True)
class ChunkStatus:
    state: str  # a Celery state (celery.states), or PROGRESS while a worker reports how far it got
    result: dict | None = None
    progress_done: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in (states.SUCCESS, states.FAILURE)


def task_display(message: dict) -> str:
    """What monitoring (Flower, logs) shows of a chunk: which job and chunk, never the ticket or the paths."""
    parts = [f"job={message.get('job_id')}", f"chunk={message.get('chunk_no')}", f"gallery={message.get('gallery')}"]
    if message.get("generation"):
        parts.append(f"generation={message['generation']}")
    if "paths" in message:
        parts.append(f"images={len(message['paths'])}")
    if "pairs" in message:
        parts.append(f"pairs={len(message['pairs'])}")
    return "(" + " ".join(parts) + ")"


class TaskQueue(Protocol):
    def send(self, task_name: str, message: dict, task_id: str, queue: str | None = None) -> None: ...

    def status(self, task_id: str) -> ChunkStatus: ...

    def forget(self, task_id: str) -> None: ...

    def revoke(self, task_ids: list[str]) -> None: ...


class CeleryTaskQueue:
    """Sends by name only: the scheduler never imports the worker code."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, task_name: str, message: dict, task_id: str, queue: str | None = None) -> None:
        self.app.send_task(task_name, args=[message], task_id=task_id, queue=queue or "facegate",
                           argsrepr=task_display(message), kwargsrepr="{}")

    def status(self, task_id: str) -> ChunkStatus:
        res = AsyncResult(task_id, app=self.app)
        state = res.state
        if state == states.SUCCESS:
            return ChunkStatus(state, result=res.result)
        if state == states.FAILURE:
            # The worker's own sentence where it gave one; the exception's name alone rather than an empty repr.
            text = str(res.result).strip()
            return ChunkStatus(state, error=f"{type(res.result).__name__}: {text}" if text else type(res.result).__name__)
        if state == PROGRESS and isinstance(res.info, dict):
            return ChunkStatus(state, progress_done=int(res.info.get("done", 0)))
        return ChunkStatus(state)

    def forget(self, task_id: str) -> None:
        AsyncResult(task_id, app=self.app).forget()

    def revoke(self, task_ids: list[str]) -> None:
        # Workers drop revoked tasks still in the queue; a chunk already running finishes.
        self.app.control.revoke(task_ids)
