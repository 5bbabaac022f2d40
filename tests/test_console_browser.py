"""The console in a real browser: headless Chromium from the OS packages (apt-get install chromium), driven by
Playwright, against `facegate api`'s app served by uvicorn, with a real worker, Redis and Milvus Lite store.

Sign in, open a finished search, every crop loads, two reviewers confirm, the audit page shows both; another
organisation's user cannot open the job or its crops, also by URL; a form posted without its CSRF token is
refused."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from facegate.queue import make_celery
from policy import load_registry
from scheduler.api import create_app
from scheduler.dispatch import CeleryTaskQueue
from tests.conftest import PHOTOS, USER_PASSWORD, add_user, make_settings, redis_client, register
from tests.e2e import MilvusLiteServer, WorkerProcess, free_port

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ORG, OTHER = "icmec", "photo-archive-example"
PURPOSE = "missing-children"


def _reviewers_needed(settings) -> int:
    """How many different reviewers the registry asks for before a match of PURPOSE is confirmed."""
    return load_registry(settings.policy_registry).purpose(PURPOSE).reviewers_required


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server_url):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: uv sync")
    import uvicorn

    tmp = tmp_path_factory.mktemp("console")
    milvus = MilvusLiteServer(tmp / "milvus")
    settings = make_settings(tmp, broker_url=f"{redis_server_url.rstrip('/')}/13", milvus_uri=milvus.uri)
    redis_client(settings.broker_url).flushdb()
    folder = tmp / "galleries" / "cases"
    folder.mkdir(parents=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    worker = WorkerProcess(settings, tmp / "worker.log")
    celery = make_celery(settings)
    app = create_app(settings, CeleryTaskQueue(celery), collect_every_s=0.5)
    _, key = register(settings, ORG)
    for name, roles in (("ana", ["reviewer"]), ("ben", ["reviewer"]), ("audrey", ["auditor"])):
        add_user(settings, ORG, name, *roles)
    add_user(settings, OTHER, "olga", "reviewer", "submitter", "auditor")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    import httpx

    api = httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30)
    try:
        indexed = api.post("/v1/jobs", json={"kind": "index", "gallery": "cases", "purpose": PURPOSE,
                                             "folder": str(folder)})
        assert indexed.status_code == 202, indexed.text
        _wait(api, indexed.json()["id"])
        # The probe is one of the gallery's own photos: found at similarity 1, above the purpose's floor.
        search = api.post("/v1/jobs", json={"kind": "search", "gallery": "cases", "purpose": PURPOSE,
                                            "probes": [str(folder / PHOTOS[1].name)], "top_k": 2})
        assert search.status_code == 202, search.text
        job = _wait(api, search.json()["id"])
        assert job["state"] == "done" and job["review_required"], job
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            yield base, browser, job, settings, api
            browser.close()
    finally:
        api.close()
        server.should_exit = True
        thread.join(timeout=15)
        worker.stop()
        celery.close()
        milvus.stop()


def _wait(api, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.3)
    raise TimeoutError(job)


def _sign_in(browser, base: str, username: str, next_path: str):
    context = browser.new_context(base_url=base)
    page = context.new_page()
    page.goto(next_path)
    assert page.url.startswith(f"{base}/sign-in"), page.url  # not signed in yet: sent to sign in first
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", USER_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{next_path}")
    return context, page


def _review_state(page) -> str:
    return page.locator(".match").first.locator('[data-field="review"]').inner_text().strip()


def test_two_reviewers_confirm_in_the_browser_and_the_auditor_sees_both(served):
    base, browser, job, settings, api = served
    path = f"/jobs/{job['id']}"
    context, page = _sign_in(browser, base, "ana", path)
    # Every crop, the probe's and each candidate's, loaded as an image.
    matches = api.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]["matches"]
    assert matches and page.locator("img.crop").count() == 1 + len(matches)
    page.wait_for_function("() => [...document.querySelectorAll('img.crop')].every(i => i.complete)")
    widths = page.eval_on_selector_all("img.crop", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 1 + len(matches) and all(w > 0 for w in widths), widths
    assert page.locator(".gone").count() == 0
    assert _review_state(page) == "unconfirmed"
    similarity = float(page.locator(".match").first.locator(".similarity").inner_text())
    assert similarity > 0.99

    needed = _reviewers_needed(settings)
    first = page.locator(".match").first
    first.locator("button.confirm").click()
    first.locator(".review-message").filter(has_text="recorded").wait_for()
    after_one = "unconfirmed" if needed >= 2 else "confirmed"
    assert _review_state(page) == after_one
    # What the page shows is what the API has (and survives a reload).
    results = api.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]["matches"][0]
    assert results["review"] == after_one
    page.reload()
    assert _review_state(page) == after_one and "confirmed by ana" in first.inner_text()

    ben_context, ben_page = _sign_in(browser, base, "ben", path)
    ben_first = ben_page.locator(".match").first
    ben_first.locator("button.confirm").click()
    ben_first.locator(".review-message").filter(has_text="recorded").wait_for()
    assert _review_state(ben_page) == "confirmed"
    ben_page.reload()
    assert "confirmed by ana" in ben_first.inner_text() and "confirmed by ben" in ben_first.inner_text()

    audit_context, audit_page = _sign_in(browser, base, "audrey", "/audit?event=review.confirmed")
    rows = audit_page.locator("tr.audit-row")
    text = " ".join(rows.all_inner_texts())
    assert rows.count() == 2 and "ana" in text and "ben" in text, text
    assert "Hash chain intact" in audit_page.locator('[data-field="chain"]').inner_text()
    for c in (context, ben_context, audit_context):
        c.close()


def test_another_organisation_cannot_open_the_job_or_its_crops_and_forms_need_their_token(served):
    base, browser, job, _, api = served
    probe = api.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]
    crop_urls = [f"/v1/jobs/{job['id']}/results/{probe['id']}/crop",
                 f"/v1/jobs/{job['id']}/results/{probe['id']}/matches/{probe['matches'][0]['face_id']}/crop"]
    context, page = _sign_in(browser, base, "olga", "/jobs")
    assert job["id"][:12] not in page.content()
    opened = page.goto(f"/jobs/{job['id']}")
    assert opened is not None and opened.status == 404
    for url in crop_urls:  # typed into the address bar
        answer = page.goto(url)
        assert answer is not None and answer.status == 404, url
    context.close()

    context, page = _sign_in(browser, base, "ana", f"/jobs/{job['id']}")
    for url in crop_urls:  # ana may see them
        assert page.goto(url).status == 200
    form_url = f"/jobs/{job['id']}/results/{probe['id']}/reviews"
    refused = context.request.post(form_url, form={"face_id": probe["matches"][0]["face_id"], "decision": "rejected"})
    assert refused.status == 403 and "CSRF" in refused.text()
    still = api.get(f"/v1/jobs/{job['id']}/results").json()["items"][0]["matches"][0]
    assert "rejected" not in [still["review"]]
    context.close()
    # The sign-in form too: posted without the token it was given, nobody is signed in.
    fresh = browser.new_context(base_url=base)
    answer = fresh.request.post("/sign-in", form={"username": "ana", "password": USER_PASSWORD})
    assert answer.status == 403 and re.search("CSRF", answer.text())
    fresh.close()
