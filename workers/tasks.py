"""Thin Celery tasks: validate the message, run the plain chunk function, return a typed result."""

from __future__ import annotations

from typing import Callable, TypeVar

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_ready
from celery.worker.request import Request
from pymilvus.exceptions import ConnectError, MilvusUnavailableException
from redis.exceptions import ConnectionError as RedisConnectionError

from datetime import datetime, timezone

from facegate.db import DatabaseUnavailable
from facegate.redaction import args_display, kwargs_display
from facegate.vocabulary import PROGRESS
from facegate.messages import (
    COMPARE_PAIRS_TASK,
    ERASE_CHUNK_TASK,
    INDEX_CHUNK_TASK,
    MODEL_INFO_TASK,
    SEARCH_CHUNK_TASK,
    ChunkMessage,
    ChunkResult,
    CompareChunk,
    EraseChunk,
    IndexChunk,
    SearchChunk,
    collection_key,
)
from index import GalleryNotFound, StoreUnavailable, store_errors
from policy.quality import floor_from_claim, stricter
from workers.chunks import run_erase_chunk, run_index_chunk, run_search_chunk
from workers.compare import run_compare_chunk
from workers.weights import resolve_model
from workers.gate import ExecutionRefused, Permit
from workers.runtime import get_runtime

# Worth another try later: the store or the broker was briefly out of reach. Bad images are not
# exceptions at all (they fail as items), so nothing else is retried.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, RedisConnectionError, ConnectError, MilvusUnavailableException,
                    StoreUnavailable, DatabaseUnavailable)


class ChunkRequest(Request):
    """The worker's record of a delivered chunk, shown as the message itself says, not as its sender wrote.

    Our senders already put the display in `argsrepr` (facegate/queue.py); a message put on the broker by
    anyone else carries whatever they wrote there, ticket included. Task events, `inspect active` and the
    worker log read these two fields.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr = args_display(self._args)
        self._kwargsrepr = kwargs_display(self._kwargs)


class ChunkTask(Task):
    Request = ChunkRequest


RETRY = dict(base=ChunkTask, autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, retry_backoff_max=300,
             retry_jitter=True, max_retries=8)


def _progress(task: Task, total: int):
    def report(done: int) -> None:
        if task.request.id:
            # The hostname tells the reconciler which worker holds the chunk, as Celery's STARTED meta does.
            task.update_state(state=PROGRESS, meta={"done": done, "total": total,
                                                    "hostname": task.request.hostname})
    return report


def _refused(chunk: ChunkMessage, reason: str) -> dict:
    now = datetime.now(timezone.utc)
    return ChunkResult(job_id=chunk.job_id, chunk_no=chunk.chunk_no, kind=chunk.kind, refused=reason,
                       started_at=now, finished_at=now).model_dump(mode="json")


_Chunk = TypeVar("_Chunk", IndexChunk, SearchChunk, EraseChunk, CompareChunk)
_Body = Callable[[Task, _Chunk, Permit], ChunkResult]


def chunk_task(name: str, model: type[_Chunk]) -> Callable[[_Body[_Chunk]], Task]:
    """Declare a chunk task around `body(task, chunk, permit)`, the same wrapper for every one: validate the
    message, take the worker's policy check before any work, run the body, return its result as JSON.

    A refusal, the gate's or the body's own (it raises `ExecutionRefused` for what only it can check, such as
    a search's threshold), comes back as the chunk's refused result, the same for every task.
    """
    def declare(body: _Body[_Chunk]) -> Task:
        def run(self: Task, message: dict) -> dict:
            chunk = model.model_validate(message)
            try:
                permit = get_runtime().gate().admit(chunk)
                return body(self, chunk, permit).model_dump(mode="json")
            except ExecutionRefused as exc:
                return _refused(chunk, str(exc))

        # Not functools.wraps: Celery checks a call's arguments against the signature it would expose.
        run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return shared_task(name=name, bind=True, **RETRY)(run)
    return declare


# Module-level tasks, as Celery's own layouts declare them: every app made by facegate.queue.make_celery in a
# process that imports this module (the worker's, workers/app.py) has them. Each body runs the plain function
# of workers/chunks.py or workers/compare.py on what the permit allows.

@chunk_task(INDEX_CHUNK_TASK, IndexChunk)
def index_chunk(task: Task, chunk: IndexChunk, permit: Permit) -> ChunkResult:
    runtime = get_runtime()
    quality_filter = None
    if chunk.quality_filter is not None:
        quality_filter = permit.registry.quality_filters.get(chunk.quality_filter)
        if quality_filter is None:
            raise ExecutionRefused(f"refused at execution: quality filter {chunk.quality_filter!r} is not in "
                                   f"the registry (known: {', '.join(permit.registry.quality_filters) or 'none'})")
    # Only what the ticket's organisation may read: the shared roots and its own uploads.
    with store_errors(runtime.settings.resolved_milvus_uri):
        return run_index_chunk(chunk, runtime.pipeline(), runtime.store(),
                               runtime.settings.roots_for(permit.claims.organisation_id),
                               on_progress=_progress(task, len(chunk.paths)), quality_filter=quality_filter)


@chunk_task(SEARCH_CHUNK_TASK, SearchChunk)
def search_chunk(task: Task, chunk: SearchChunk, permit: Permit) -> ChunkResult:
    runtime = get_runtime()
    # The floor is per model version: the gallery's, read from its collection, not a vector.
    try:
        with store_errors(runtime.settings.resolved_milvus_uri):
            model_version = runtime.store().model_version(collection_key(chunk.gallery, chunk.generation))
    except GalleryNotFound:
        model_version = None  # run_search_chunk reports the missing gallery as the chunk's error
    if model_version is not None:
        runtime.gate().check_threshold(permit, chunk, chunk.threshold, model_version)
    # The probe quality floor: the one the ticket states (the gate's, at admission) and the purpose's in
    # the registry now, whichever is stricter: a floor raised while the job waited applies.
    purpose = permit.registry.purpose(permit.claims.purpose)
    floor = stricter(floor_from_claim(permit.claims.min_quality), purpose.min_quality if purpose else None)
    with store_errors(runtime.settings.resolved_milvus_uri):
        return run_search_chunk(chunk, runtime.pipeline(), runtime.store(),
                                runtime.settings.roots_for(permit.claims.organisation_id),
                                on_progress=_progress(task, len(chunk.paths)), quality_floor=floor,
                                floor_owner=f"purpose {permit.claims.purpose}")


@chunk_task(ERASE_CHUNK_TASK, EraseChunk)
def erase_chunk(task: Task, chunk: EraseChunk, permit: Permit) -> ChunkResult:
    runtime = get_runtime()
    with store_errors(runtime.settings.resolved_milvus_uri):
        return run_erase_chunk(chunk, runtime.store())


@chunk_task(COMPARE_PAIRS_TASK, CompareChunk)
def compare_pairs(task: Task, chunk: CompareChunk, permit: Permit) -> ChunkResult:
    """Pair comparisons (evaluation's, and POST /v1/compare's): the policy check first, then the plain function."""
    runtime = get_runtime()
    distinct = len({path for pair in chunk.pairs for path in pair})
    # The shared roots, and the ticket's organisation's own uploads (POST /v1/compare), no one else's.
    return run_compare_chunk(chunk, runtime.pipeline(), runtime.settings.roots_for(permit.claims.organisation_id),
                             on_progress=_progress(task, distinct))


@shared_task(name=MODEL_INFO_TASK)
def model_info() -> dict:
    """Which model this worker embeds with: lets the scheduler notice a model change without torch."""
    weights = resolve_model(get_runtime().settings)
    return {"model_version": weights.model_version, "untrained": weights.untrained}


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
