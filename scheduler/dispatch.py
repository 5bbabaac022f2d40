"""The scheduler's side of the queue: send a chunk by task name, read its state and result back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from celery import Celery
from celery.result import AsyncResult


@dataclass(frozen=True)
class ChunkStatus:
    state: str  # PENDING, STARTED, PROGRESS, RETRY, SUCCESS, FAILURE
    result: dict | None = None
    progress_done: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE")


class TaskQueue(Protocol):
    def send(self, task_name: str, message: dict, task_id: str) -> None: ...

    def status(self, task_id: str) -> ChunkStatus: ...

    def forget(self, task_id: str) -> None: ...


class CeleryTaskQueue:
    """Sends by name only: the scheduler never imports the worker code."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, task_name: str, message: dict, task_id: str) -> None:
        self.app.send_task(task_name, args=[message], task_id=task_id)

    def status(self, task_id: str) -> ChunkStatus:
        res = AsyncResult(task_id, app=self.app)
        state = res.state
        if state == "SUCCESS":
            return ChunkStatus(state, result=res.result)
        if state == "FAILURE":
            return ChunkStatus(state, error=f"{type(res.result).__name__}: {res.result!r}")
        if state == "PROGRESS" and isinstance(res.info, dict):
            return ChunkStatus(state, progress_done=int(res.info.get("done", 0)))
        return ChunkStatus(state)

    def forget(self, task_id: str) -> None:
        AsyncResult(task_id, app=self.app).forget()
