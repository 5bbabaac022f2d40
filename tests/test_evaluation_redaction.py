"""An evaluation's compare tasks are sent the scheduler's way: their task events carry the redacted display
as their arguments, never the signed ticket each message holds (nor the image paths), and Flower's view
of those events (cli.flower.scrub_event, what Flower keeps) shows neither. A real worker process, a real Redis, Celery's own event receiver."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time

import pytest

from cli.flower import scrub_event
from evaluation.runner import admit_evaluation, plan_evaluation, run_evaluation
from facegate.messages import COMPARE_PAIRS_TASK
from facegate.queue import make_celery
from tests.conftest import PHOTOS, make_settings, redis_client, register
from tests.e2e import WorkerProcess
from tests.test_evaluation_e2e import _augmentations

pytestmark = pytest.mark.slow


class _TaskEvents:
    """Every task event on the broker while it runs, as Celery's event receiver hands them over."""

    def __init__(self, app) -> None:
        self.events: list[dict] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._keep})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"limit": None, "wakeup": False},
                                        daemon=True)

    def _keep(self, event: dict) -> None:
        if str(event.get("type", "")).startswith("task-"):
            self.events.append(event)

    def __enter__(self) -> _TaskEvents:
        self._thread.start()
        time.sleep(1.0)  # bound to the event exchange before anything is sent: events are not replayed
        return self

    def __exit__(self, *_exc) -> None:
        time.sleep(1.0)  # the last task-succeeded event is on its way
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.release()


def _dataset(root):
    for source in PHOTOS[:3]:
        folder = root / f"person_{source.stem}"
        folder.mkdir(parents=True)
        for name, image in list(_augmentations(source).items())[:2]:
            image.save(folder / f"{folder.name}_{name}.jpg", quality=92)
    return root


def test_compare_task_events_and_their_flower_view_show_no_ticket(tmp_path, redis_server_url):
    settings = make_settings(tmp_path, broker_url=f"{redis_server_url.rstrip('/')}/12")
    redis_client(settings.broker_url).flushdb()
    dataset = _dataset(tmp_path / "galleries" / "three")
    principal, _ = register(settings)
    plan = plan_evaluation(dataset, chunk_pairs=4, identification=False)
    admitted = admit_evaluation(settings, plan, principal, "research")
    tickets: list[str] = []

    def signed(message):
        tickets.append(admitted.ticket_for(message))
        return tickets[-1]

    app = make_celery(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        with _TaskEvents(app) as seen:
            run_evaluation(settings, dataset, principal, out_dir=tmp_path / "report", plan=plan, identification=False,
                           admitted=dataclasses.replace(admitted, ticket_for=signed), calibrate=False,
                           timeout_s=240, celery_app=app)
    finally:
        worker.stop()
        app.close()

    assert len(tickets) == len(plan.chunks) >= 2
    received = [e for e in seen.events if e["type"] == "task-received" and e.get("name") == COMPARE_PAIRS_TASK]
    assert len(received) == len(plan.chunks), [e["type"] for e in seen.events]
    for event in received:
        # The scheduler's display of the chunk, as argsrepr: which job and chunk, how many pairs.
        assert re.fullmatch(rf"\(job={admitted.job_id} chunk=\d+ gallery=None pairs=[1-4]\)", event["args"]), event["args"]
    raw = json.dumps(seen.events)
    flower = json.dumps([scrub_event(e) for e in seen.events])
    for ticket in tickets:
        assert ticket not in raw and ticket.split(".")[1] not in raw
        assert ticket not in flower
    # The result events do name the images compared (the scheduler reads them back); Flower shows counts.
    for image in dataset.glob("*/*.jpg"):
        assert str(image) not in json.dumps(received) and str(image) not in flower
