"""Thin Celery tasks: validate the message, run the plain chunk function, return a typed result."""

from __future__ import annotations

from typing import Callable

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_ready
from pymilvus.exceptions import ConnectError, MilvusUnavailableException
from redis.exceptions import ConnectionError as RedisConnectionError

from datetime import datetime, timezone

from facegate.db import DatabaseUnavailable
from facegate.vocabulary import PROGRESS
from facegate.messages import (
    COMPARE_PAIRS_TASK,
    ERASE_CHUNK_TASK,
    INDEX_CHUNK_TASK,
    MODEL_INFO_TASK,
    SEARCH_CHUNK_TASK,
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


class ChunkTask(Task):
    """Keeps the scheduler's `argsrepr` when Celery re-sends a task for a retry.

    Celery's retry re-sends with repr(args) otherwise, and monitoring (Flower, logs) would then show
    the signed ticket and the paths.
    """

    def signature_from_request(self, request=None, args=None, kwargs=None, queue=None, **extra_options):
        request = self.request if request is None else request
        extra_options.setdefault("argsrepr", getattr(request, "argsrepr", None) or "(hidden)")
        extra_options.setdefault("kwargsrepr", getattr(request, "kwargsrepr", None) or "{}")
        return super().signature_from_request(request, args, kwargs, queue, **extra_options)


RETRY = dict(base=ChunkTask, autoretry_for=TRANSIENT_ERRORS, retry_backoff=True, retry_backoff_max=300,
             retry_jitter=True, max_retries=8)


def _progress(task: Task, total: int):
    def report(done: int) -> None:
        if task.request.id:
            # The hostname tells the reconciler which worker holds the chunk, as Celery's STARTED meta does.
            task.update_state(state=PROGRESS, meta={"done": done, "total": total,
                                                    "hostname": task.request.hostname})
    return report


def _refused(chunk: IndexChunk | SearchChunk | EraseChunk | CompareChunk, reason: str) -> dict:
    now = datetime.now(timezone.utc)
    return ChunkResult(job_id=chunk.job_id, chunk_no=chunk.chunk_no, kind=chunk.kind, refused=reason,
                       started_at=now, finished_at=now).model_dump(mode="json")


def admitted(chunk: IndexChunk | SearchChunk | EraseChunk | CompareChunk,
             then: Callable[[Permit], None] | None = None) -> tuple[Permit | None, dict | None]:
    """The worker's policy check before any work, for every task: (permit, None) to go on, else (None, the
    refused result). `then` checks more of the permit (a search's threshold) and refuses the same way."""
    try:
        permit = get_runtime().gate().admit(chunk)
        if then is not None:
            then(permit)
        return permit, None
    except ExecutionRefused as exc:
        return None, _refused(chunk, str(exc))


# Module-level tasks, as Celery's own layouts declare them: every app made by facegate.queue.make_celery in a
# process that imports this module (the worker's, workers/app.py) has them. Each is a thin wrapper: validate
# the message, take the policy check, run the plain function of workers/chunks.py or workers/compare.py.

@shared_task(name=INDEX_CHUNK_TASK, bind=True, **RETRY)
def index_chunk(self: Task, message: dict) -> dict:
    chunk = IndexChunk.model_validate(message)
    runtime = get_runtime()
    permit, refusal = admitted(chunk)
    if refusal is not None:
        return refusal
    assert permit is not None
    quality_filter = None
    if chunk.quality_filter is not None:
        quality_filter = permit.registry.quality_filters.get(chunk.quality_filter)
        if quality_filter is None:
            return _refused(chunk, f"refused at execution: quality filter {chunk.quality_filter!r} is not in "
                                   f"the registry (known: {', '.join(permit.registry.quality_filters) or 'none'})")
    # Only what the ticket's organisation may read: the shared roots and its own uploads.
    with store_errors(runtime.settings.resolved_milvus_uri):
        result = run_index_chunk(chunk, runtime.pipeline(), runtime.store(),
                                 runtime.settings.roots_for(permit.claims.organisation_id),
                                 on_progress=_progress(self, len(chunk.paths)), quality_filter=quality_filter)
    return result.model_dump(mode="json")


@shared_task(name=SEARCH_CHUNK_TASK, bind=True, **RETRY)
def search_chunk(self: Task, message: dict) -> dict:
    chunk = SearchChunk.model_validate(message)
    runtime = get_runtime()

    def threshold_allowed(permit: Permit) -> None:
        # The floor is per model version: the gallery's, read from its collection, not a vector.
        try:
            with store_errors(runtime.settings.resolved_milvus_uri):
                model_version = runtime.store().model_version(collection_key(chunk.gallery, chunk.generation))
        except GalleryNotFound:
            return  # run_search_chunk reports the missing gallery as the chunk's error
        runtime.gate().check_threshold(permit, chunk, chunk.threshold, model_version)

    permit, refusal = admitted(chunk, threshold_allowed)
    if refusal is not None:
        return refusal
    assert permit is not None
    # The probe quality floor: the one the ticket states (the gate's, at admission) and the purpose's in
    # the registry now, whichever is stricter: a floor raised while the job waited applies.
    purpose = permit.registry.purpose(permit.claims.purpose)
    floor = stricter(floor_from_claim(permit.claims.min_quality), purpose.min_quality if purpose else None)
    with store_errors(runtime.settings.resolved_milvus_uri):
        result = run_search_chunk(chunk, runtime.pipeline(), runtime.store(),
                                  runtime.settings.roots_for(permit.claims.organisation_id),
                                  on_progress=_progress(self, len(chunk.paths)), quality_floor=floor,
                                  floor_owner=f"purpose {permit.claims.purpose}")
    return result.model_dump(mode="json")


@shared_task(name=ERASE_CHUNK_TASK, bind=True, **RETRY)
def erase_chunk(self: Task, message: dict) -> dict:
    chunk = EraseChunk.model_validate(message)
    runtime = get_runtime()
    _, refusal = admitted(chunk)
    if refusal is not None:
        return refusal
    with store_errors(runtime.settings.resolved_milvus_uri):
        return run_erase_chunk(chunk, runtime.store()).model_dump(mode="json")


@shared_task(name=COMPARE_PAIRS_TASK, bind=True, **RETRY)
def compare_pairs(self: Task, message: dict) -> dict:
    """Pair comparisons (evaluation's, and POST /v1/compare's): the policy check first, then the plain function."""
    chunk = CompareChunk.model_validate(message)
    runtime = get_runtime()
    permit, refusal = admitted(chunk)
    if refusal is not None:
        return refusal
    assert permit is not None
    distinct = len({path for pair in chunk.pairs for path in pair})
    # The shared roots, and the ticket's organisation's own uploads (POST /v1/compare), no one else's.
    return run_compare_chunk(chunk, runtime.pipeline(), runtime.settings.roots_for(permit.claims.organisation_id),
                             on_progress=_progress(self, distinct)).model_dump(mode="json")


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
