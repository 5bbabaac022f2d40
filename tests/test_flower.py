"""Flower for FaceGate: authenticated, read-only, and never showing a ticket, pixels, embeddings or matches.

The end-to-end test runs a real worker and `python -m cli.flower` against the real Redis (database 11) and
reads Flower's API; the others check the redaction and the command's refusals without starting anything.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from cli.flower import (
    FlowerConfigError,
    display_args,
    display_kwargs,
    display_result,
    flower_argv,
    flower_command,
    parse_basic_auth,
    redact_text,
    scrub_event,
    scrub_inspection,
)
from facegate.messages import INDEX_CHUNK_TASK, chunk_task_id
from facegate.redaction import HIDDEN, redacted
from facegate.redaction import task_display  # what every send carries as argsrepr: the real one, not a copy
from facegate.settings import reset_settings_cache
from policy import TicketClaims, sign_ticket
from tests.conftest import FIXTURES, PHOTOS, make_settings
from tests.e2e import ROOT, WorkerProcess, env_for, free_port


def _ticket(settings, job_id: str, org: str = "city-police-example", purpose: str = "criminal-investigation",
            chunk_no: int = 1) -> str:
    # Correctly signed with the worker's secret, for exactly the work of `_message(job_id, chunk_no)`: a real
    # bearer credential. The registry then refuses it (the moratorium), so the task finishes without
    # touching a face.
    from facegate.messages import IndexChunk, work_binding

    work = work_binding(IndexChunk.model_validate(_message(job_id, chunk_no, None)))
    claims = TicketClaims(organisation_id=org, capability="index", purpose=purpose, registry_hash="r",
                          expires_at=int(time.time()) + 600, **work)
    return sign_ticket(claims, settings.resolved_ticket_secret())


def _message(job_id: str, chunk_no: int, ticket: str | None) -> dict:
    return {"kind": "index", "job_id": job_id, "chunk_no": chunk_no, "gallery": "flowertest",
            "paths": [str(p) for p in PHOTOS[:3]], "ticket": ticket}


# Redaction, without Flower ------------------------------------------------------------------------------


TICKET = "eyJ2IjoxLCJqb2JfaWQiOiJqb2IxIn0.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtYWJjZGVmZ2g"


def test_chunk_arguments_become_the_display_whatever_sent_them():
    message = {"kind": "search", "job_id": "job1", "chunk_no": 3, "gallery": "g", "paths": ["/p/a.jpg"] * 16,
               "top_k": 5, "threshold": 0.8, "ticket": TICKET}
    # As a retried task's events carry it (Celery drops argsrepr on retry): repr of the args tuple.
    shown = display_args(repr((message,)))
    assert shown == task_display(message) == "(job=job1 chunk=3 gallery=g images=16)"
    # Truncated by Celery's saferepr: still the display, with the count marked as a lower bound.
    from celery.utils.saferepr import saferepr

    long = {**message, "paths": [f"/photos/{'x' * 80}{i}.jpg" for i in range(40)]}
    truncated = display_args(saferepr([long], 1024))
    assert truncated.startswith("(job=job1 chunk=3 gallery=g images=") and "+" in truncated
    assert TICKET not in truncated and "/photos/" not in truncated
    # Arguments that cannot be read back into values are hidden.
    assert display_args("[{'job_id': 'job1', 'chunk_no': 3, 'paths': ['/a.jpg', <object>], 'ticket': '"
                        + TICKET + "'}]") == HIDDEN
    # The scheduler's display passes through unchanged.
    assert display_args("(job=job1 chunk=3 gallery=g images=16)") == "(job=job1 chunk=3 gallery=g images=16)"


def test_tickets_are_redacted_anywhere():
    # Free text (exceptions, tracebacks): by the ticket's shape.
    assert TICKET not in redact_text(f"ValidationError: input_value={{'ticket': '{TICKET}', 'x': 1}}")
    assert redact_text(f"token {TICKET} end") == "token <redacted> end"
    # Values: every ticket field, however deep and whatever it holds; the rest as it was.
    assert redacted({"ticket": "abc", "job_id": "j", "more": [{"ticket": "x"}, ("y",)]}) == \
        {"ticket": "<redacted>", "job_id": "j", "more": [{"ticket": "<redacted>"}, ("y",)]}
    assert redacted({"ticket": None}) == {"ticket": None}
    # An event's reprs are read back into values first; one cut off so that it cannot be is hidden.
    assert display_kwargs("{'ticket': 'abc', 'job_id': 'j'}") == "{'ticket': '<redacted>', 'job_id': 'j'}"
    assert display_kwargs("{'ticket': 'abc...") == HIDDEN and display_kwargs("{}") == "{}"
    assert display_args("[{'ticket': 'abc', 'x': 1}]") == "({'ticket': '<redacted>', 'x': 1},)"


def test_every_send_carries_the_display_whatever_the_caller_passed(tmp_path):
    from facegate.queue import make_celery

    app = make_celery(make_settings(tmp_path, broker_url="redis://127.0.0.1:1/11"))  # never contacted
    message = _message("job1", 3, TICKET)
    # None: as Celery's retry re-sends a task; the other: a caller that wrote the ticket in.
    for argsrepr in (None, repr((message,))):
        created = app.amqp.create_task_message("t1", INDEX_CHUNK_TASK, [message], {"note": {"ticket": TICKET}},
                                               argsrepr=argsrepr, create_sent_event=True)
        assert created.headers["argsrepr"] == task_display(message) == "(job=job1 chunk=3 gallery=flowertest images=3)"
        assert created.headers["kwargsrepr"] == "{'note': {'ticket': '<redacted>'}}"
        assert created.sent_event["args"] == created.headers["argsrepr"]
        assert TICKET not in json.dumps([created.headers, created.sent_event])
        assert created.body[0] == [message]  # the worker still gets its ticket
    app.close()


def test_the_worker_shows_a_message_from_elsewhere_as_its_display(tmp_path):
    from celery import Celery
    from kombu import Message

    from facegate.queue import make_celery
    from workers.tasks import ChunkRequest

    message = _message("job1", 3, TICKET)
    elsewhere = Celery("elsewhere", set_as_current=False)  # a plain Celery app writes repr(args)
    created = elsewhere.amqp.create_task_message("t1", INDEX_CHUNK_TASK, [message], {})
    assert TICKET in created.headers["argsrepr"]
    delivered = Message(body=json.dumps(created.body), headers=created.headers, properties=created.properties,
                        content_type="application/json", content_encoding="utf-8", delivery_info={})
    app = make_celery(make_settings(tmp_path, broker_url="redis://127.0.0.1:1/11"))  # never contacted
    request = ChunkRequest(delivered, app=app, task=app.tasks[INDEX_CHUNK_TASK])
    assert request.argsrepr == request.info(safe=True)["args"] == task_display(message)
    assert TICKET not in repr(request) and TICKET not in json.dumps(request.info(safe=True), default=str)
    assert request.args == [message]  # the task still gets its ticket
    app.close()
    elsewhere.close()


def test_results_are_reduced_to_counts():
    result = {"job_id": "job1", "chunk_no": 0, "kind": "search", "model_version": "inception-resnet-v1:abcd",
              "untrained": False,
              "items": [{"path": "/probes/secret-person.jpg", "ok": True, "faces": 2, "reason": None},
                        {"path": "/probes/bad.jpg", "ok": False, "faces": 0, "reason": "cannot decode it"}],
              "probes": [{"path": "/probes/secret-person.jpg", "face_no": 0, "box": [1, 2, 3, 4], "probability": 0.99,
                          "matches": [{"face_id": "f1", "image_path": "/gallery/jane-doe.jpg", "image_sha256": "ab",
                                       "similarity": 0.91, "box": [0, 0, 9, 9]}]}],
              "error": None, "refused": None}
    shown = display_result(repr(result))
    assert shown == ("(job=job1 chunk=0 kind=search items=2 failed=1 faces=2 probe_faces=1 matches=1 "
                     "model=inception-resnet-v1:abcd)")
    refused = display_result(repr({**result, "items": [], "probes": [], "refused": "refused at execution: no ticket"}))
    assert "refused='refused at execution: no ticket'" in refused
    event = scrub_event({"type": "task-succeeded", "uuid": "u", "hostname": "w", "result": repr(result)})
    assert "jane-doe" not in json.dumps(event) and "0.91" not in json.dumps(event)
    # Non-chunk results are kept, redacted.
    assert display_result("{'model_version': 'x'}") == "{'model_version': 'x'}"


def test_redaction_never_raises_it_hides(monkeypatch):
    # An exception in Flower's event handler would stop its event capture: hide instead.
    def broken(_args):
        raise RuntimeError("boom")

    monkeypatch.setattr("cli.flower.display_args", broken)
    event = scrub_event({"type": "task-received", "uuid": "u", "hostname": "w", "name": INDEX_CHUNK_TASK,
                         "args": f"[{{'ticket': '{TICKET}'}}]", "kwargs": "{}", "result": None})
    assert event["args"] == "<hidden>" and event["kwargs"] == "<hidden>" and event["result"] is None
    assert event["name"] == INDEX_CHUNK_TASK and event["uuid"] == "u"
    assert scrub_inspection("reserved", [{"args": [{"job_id": "j", "chunk_no": 1, "ticket": TICKET}]}]) == []


def test_worker_inspection_is_redacted():
    message = {"kind": "index", "job_id": "j", "chunk_no": 1, "gallery": "g", "paths": ["/a.jpg"], "ticket": TICKET}
    reserved = [{"id": "t", "name": INDEX_CHUNK_TASK, "args": [message], "kwargs": {}}]
    scheduled = [{"eta": None, "priority": 0, "request": {"id": "t", "args": [message], "kwargs": {}}}]
    active = [{"id": "t", "args": repr((message,)), "kwargs": "{}"}]
    for method, response in (("reserved", reserved), ("scheduled", scheduled), ("active", active)):
        scrubbed = scrub_inspection(method, response)
        assert TICKET not in json.dumps(scrubbed) and "/a.jpg" not in json.dumps(scrubbed)
        assert "job=j chunk=1" in json.dumps(scrubbed)
    assert scrub_inspection("stats", {"x": TICKET}) == {"x": TICKET}  # nothing task-shaped there


def test_basic_auth_setting_format():
    assert parse_basic_auth("ops:pw1, admin:p:w2") == ["ops:pw1", "admin:p:w2"]
    assert parse_basic_auth(None) == [] and parse_basic_auth(" ") == []
    for bad in ("nopassword", "ops:", ":pw", "ops:pw,"):
        with pytest.raises(FlowerConfigError) as err:
            parse_basic_auth(bad)
        assert "pw" not in str(err.value).replace("password", "")  # names the entry, never echoes it
    argv = flower_argv(port=1, address="127.0.0.1", basic_auth=["a:b"], persistent_db=Path("/d/flower.db"))
    assert "--basic_auth=a:b" in argv and "--persistent=True" in argv and "--read_only=True" in argv
    assert "--db=/d/flower.db" in argv


def _invoke(monkeypatch, env: dict[str, str], *args: str):
    import typer

    for key in ("FACEGATE_BROKER_URL", "FACEGATE_FLOWER_BASIC_AUTH", "FACEGATE_FLOWER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    app = typer.Typer()
    app.command()(flower_command)
    return CliRunner().invoke(app, list(args))


def test_flower_command_refuses_to_start_without_auth(monkeypatch):
    started = []
    monkeypatch.setattr("cli.flower.run_flower", lambda *a, **kw: started.append(kw) or 0)
    broker = {"FACEGATE_BROKER_URL": "redis://127.0.0.1:1/11"}  # never contacted: run_flower is replaced

    result = _invoke(monkeypatch, {})
    assert result.exit_code == 2 and "FACEGATE_BROKER_URL" in result.output
    result = _invoke(monkeypatch, broker)
    assert result.exit_code == 2 and "FACEGATE_FLOWER_BASIC_AUTH" in result.output and "--no-auth" in result.output
    result = _invoke(monkeypatch, {**broker, "FACEGATE_FLOWER_BASIC_AUTH": "justaname"})
    assert result.exit_code == 2 and "user:password" in result.output
    assert started == []

    # --no-auth: only on loopback (run_flower enforces it; here the command passes it on).
    result = _invoke(monkeypatch, broker, "--no-auth")
    assert result.exit_code == 0 and started[-1]["basic_auth"] == [] and started[-1]["allow_no_auth"]
    result = _invoke(monkeypatch, {**broker, "FACEGATE_FLOWER_BASIC_AUTH": "ops:pw", "FACEGATE_FLOWER_PORT": "5601"},
                     "--", "--url_prefix=flower")
    assert result.exit_code == 0
    call = started[-1]
    assert call["basic_auth"] == ["ops:pw"] and call["port"] == 5601 and call["address"] == "127.0.0.1"
    assert call["read_only"] and call["extra_args"] == ["--url_prefix=flower"]
    assert call["persistent_db"].parts[-2:] == ("flower", "flower.db")


def test_run_flower_refuses_no_auth_off_loopback(tmp_path):
    from cli.flower import run_flower

    settings = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/11")  # refused before any connection
    with pytest.raises(FlowerConfigError, match="basic auth"):
        run_flower(settings, port=1, address="127.0.0.1", basic_auth=[], persistent_db=tmp_path / "f.db")
    with pytest.raises(FlowerConfigError, match="loopback"):
        run_flower(settings, port=1, address="0.0.0.0", basic_auth=[], persistent_db=tmp_path / "f.db",
                   allow_no_auth=True)


# Flower, a worker and Redis, for real -------------------------------------------------------------------


class FlowerProcess:
    """`python -m cli.flower` (the command `facegate flower` runs) as its own process."""

    def __init__(self, settings, log: Path, basic_auth: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = env_for(settings, FACEGATE_FLOWER_BASIC_AUTH=basic_auth)
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.flower", "--port", str(self.port),
                                      "--state-save-interval", "1"],
                                     cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.log = log
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("flower exited:\n" + log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.base}/healthcheck", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("flower did not answer:\n" + log.read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: Flower saves its state and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _poll(fn, timeout: float = 60, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    return last


@pytest.mark.slow
def test_flower_lists_the_worker_and_finished_tasks_with_credentials_only(tmp_path, redis_server_url):
    pytest.importorskip("flower")
    from celery import Celery
    from celery.result import AsyncResult

    from facegate.queue import make_celery

    broker = f"{redis_server_url.rstrip('/')}/11"
    redis.Redis.from_url(broker).flushdb()
    settings = make_settings(tmp_path, broker_url=broker)
    password = secrets.token_urlsafe(16)
    auth = ("fg-ops", password)

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    flower = None
    app = make_celery(settings)
    try:
        flower = FlowerProcess(settings, tmp_path / "flower.log", f"fg-ops:{password}")
        client = httpx.Client(base_url=flower.base, timeout=10)

        # Without credentials, or with wrong ones: 401. /healthcheck (and /metrics) answer anyway.
        for path in ("/api/workers", "/api/tasks", "/api/task/info/x", "/", "/tasks"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, auth=("fg-ops", "wrong")).status_code == 401, path
        assert client.get("/healthcheck").text == "OK"

        # Flower hears the worker's events (heartbeats) before any task is sent: events are not replayed.
        # `facegate worker` names itself facegate@<host>-<pid>.
        name = f"facegate@{socket.gethostname()}-{worker.proc.pid}"
        metrics = _poll(lambda: f'flower_worker_online{{worker="{name}"}} 1.0' in client.get("/metrics").text,
                        timeout=60)
        assert metrics, f"Flower saw no heartbeat of {name}:\n" + flower.log.read_text()[-2000:]

        listed = _poll(lambda: name in client.get("/api/workers", params={"refresh": 1}, auth=auth).json(),
                       timeout=30)
        assert listed, f"Flower does not list {name}"
        assert "facegate" in json.dumps(client.get("/api/workers", auth=auth).json()[name].get("active_queues"))

        job_id = f"flowerjob{secrets.token_hex(4)}"
        no_ticket = _message(job_id, 0, None)
        ticket = _ticket(settings, job_id)
        with_ticket = _message(job_id, 1, ticket)
        legacy = _message(job_id, 2, ticket)
        # `app` sends as the scheduler does. `elsewhere`, a plain Celery app, writes repr(args), ticket
        # included, into the message and its task-sent event: the worker's display and Flower's own
        # redaction must hide it.
        elsewhere = Celery("elsewhere", broker=broker, set_as_current=False)
        elsewhere.conf.update(task_serializer="json", task_send_sent_event=True)
        sent = []
        for message, sender in ((no_ticket, app), (with_ticket, app), (legacy, elsewhere)):
            task_id = chunk_task_id(job_id, message["chunk_no"])
            sender.send_task(INDEX_CHUNK_TASK, args=[message], task_id=task_id, queue="facegate")
            sent.append((task_id, message))
        elsewhere.close()
        for task_id, _ in sent:
            result = AsyncResult(task_id, app=app).get(timeout=120)
            assert result["refused"], result
        assert "no ticket" in AsyncResult(sent[0][0], app=app).result["refused"]
        assert "moratorium" in AsyncResult(sent[1][0], app=app).result["refused"]

        def finished():
            tasks = client.get("/api/tasks", auth=auth).json()
            return tasks if all(tasks.get(t, {}).get("state") == "SUCCESS" for t, _ in sent) else None

        tasks = _poll(finished, timeout=60)
        assert tasks, f"Flower did not see the tasks finish: {client.get('/api/tasks', auth=auth).text[:2000]}"
        raw = json.dumps(tasks)
        assert ticket not in raw and ticket.split(".")[1] not in raw
        for task_id, message in sent:
            shown = tasks[task_id]
            assert shown["name"] == INDEX_CHUNK_TASK and shown["worker"] == name
            assert shown["args"] == task_display(message) == f"(job={job_id} chunk={message['chunk_no']} " \
                                                             "gallery=flowertest images=3)"
            assert "refused=" in shown["result"] and f"job={job_id}" in shown["result"]
            info = client.get(f"/api/task/info/{task_id}", auth=auth)
            assert info.status_code == 200 and info.json()["uuid"] == task_id
            assert ticket not in info.text
            for path in message["paths"]:
                assert path not in info.text and Path(path).name not in info.text
            # Flower has no result backend: full results (a search's matches) are not served.
            assert client.get(f"/api/task/result/{task_id}", auth=auth).status_code == 503
        # Read-only: no control actions through Flower.
        assert client.post(f"/api/task/revoke/{sent[0][0]}", auth=auth).status_code == 403
    finally:
        app.close()
        if flower is not None:
            flower.stop()
        worker.stop()

    # The state Flower saved for its next start holds no ticket either.
    state_files = list((settings.data_dir / "flower").glob("flower.db*"))
    assert state_files, "Flower saved no state"
    for file in state_files:
        assert ticket.encode() not in file.read_bytes()
    assert FIXTURES.exists()
