"""The Celery application both sides use: the scheduler sends by task name, the workers register the tasks."""

from __future__ import annotations

from celery import Celery
from celery.app.amqp import AMQP
from celery.backends.redis import RedisBackend

from facegate.redaction import args_display, kwargs_display
from facegate.settings import Settings


class BrokerNotConfigured(RuntimeError):
    pass


class PolledRedisBackend(RedisBackend):
    """Celery's Redis result backend, without a pub/sub subscription for every task sent.

    FaceGate reads results by polling their keys (scheduler/dispatch.py). The stock backend subscribes to each
    sent task's result channel and only lets go when someone waits on it with get(), so a scheduler that polls
    would hold a subscription per chunk ever sent; and with Redis away, every send would first retry that
    subscription for 20 s and then declare the application broken. AsyncResult.get() still subscribes itself.
    """

    def on_task_call(self, producer, task_id) -> None:
        return None


class RedactingAMQP(AMQP):
    """Celery's message factory, with the task's display made from its arguments on every send.

    Every message of an app made here (the scheduler's sends, evaluation's, a worker's retry, which Celery
    re-sends with repr(args)) carries `args_display(args)` as its `argsrepr`, whatever the caller passed:
    task events, the worker log and Flower then never see a ticket or a path.
    """

    def as_task_v2(self, task_id, name, args=None, kwargs=None, *positional, **options):
        options["argsrepr"] = args_display(args)
        options["kwargsrepr"] = kwargs_display(kwargs)
        return super().as_task_v2(task_id, name, args, kwargs, *positional, **options)


def make_celery(settings: Settings) -> Celery:
    if not settings.broker_url:
        raise BrokerNotConfigured(
            "no broker configured: set FACEGATE_BROKER_URL (e.g. redis://127.0.0.1:6379/0), "
            "or use the CLI, which starts an embedded Redis when none is set"
        )
    app = Celery("facegate", broker=settings.broker_url, backend=settings.resolved_result_backend,
                 amqp=RedactingAMQP, set_as_current=False)
    app.loader.override_backends = {"redis": "facegate.queue:PolledRedisBackend",
                                    "rediss": "facegate.queue:PolledRedisBackend"}
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A chunk is acknowledged only once it is done: a worker that dies loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_default_queue="facegate",
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=settings.result_expires_s,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        enable_utc=True,
    )
    return app
