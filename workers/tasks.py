"""Thin Celery tasks: validate the message, run the plain chunk function, return a typed result."""

from __future__ import annotations

from celery import Celery, Task
from celery.signals import worker_process_init, worker_ready
from pymilvus.exceptions import ConnectError, MilvusUnavailableException
from redis.exceptions import ConnectionError as RedisConnectionError

from facegate.messages import INDEX_CHUNK_TASK, SEARCH_CHUNK_TASK, IndexChunk, SearchChunk
from workers.chunks import run_index_chunk, run_search_chunk
from workers.runtime import get_runtime

# Worth another try later: the store or the broker was briefly out of reach. Bad images are not
# exceptions at all (they fail as items), so nothing else is retried.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, RedisConnectionError, ConnectError, MilvusUnavailableException)
RETRY = dict(autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, retry_backoff_max=300, retry_jitter=True,
             max_retries=8)


def _progress(task: Task, total: int):
    def report(done: int) -> None:
        if task.request.id:
            task.update_state(state="PROGRESS", meta={"done": done, "total": total})
    return report


def register_tasks(app: Celery) -> None:
    @app.task(name=INDEX_CHUNK_TASK, bind=True, **RETRY)
    def index_chunk(self: Task, message: dict) -> dict:
        chunk = IndexChunk.model_validate(message)
        runtime = get_runtime()
        result = run_index_chunk(chunk, runtime.pipeline(), runtime.store(), runtime.roots,
                                 on_progress=_progress(self, len(chunk.paths)))
        return result.model_dump(mode="json")

    @app.task(name=SEARCH_CHUNK_TASK, bind=True, **RETRY)
    def search_chunk(self: Task, message: dict) -> dict:
        chunk = SearchChunk.model_validate(message)
        runtime = get_runtime()
        result = run_search_chunk(chunk, runtime.pipeline(), runtime.store(), runtime.roots,
                                  on_progress=_progress(self, len(chunk.paths)))
        return result.model_dump(mode="json")


def _warm_up() -> None:
    get_runtime().pipeline().warm_up()


@worker_ready.connect
def _load_models_in_main_process(**_kwargs) -> None:
    # threads and solo pools run tasks in the main process: load the model there, once, at start.
    # A prefork pool loads in each child instead: CUDA must never be initialised before a fork.
    if get_runtime().settings.worker_pool in ("threads", "solo"):
        _warm_up()


@worker_process_init.connect
def _load_models_in_child(**_kwargs) -> None:
    if get_runtime().settings.worker_pool == "prefork":
        _warm_up()
