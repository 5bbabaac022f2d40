"""/v1/search and /v1/compare: one request, the answer in the response (Rekognition's SearchFacesByImage
and CompareFaces). Both go through the same gate, queue, worker and audit as a job, within a time limit."""

from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from scheduler.api.deps import PrincipalDep, ServicesDep
from scheduler.api.problems import Problem
from scheduler.api.routers.jobs import save_uploads
from scheduler.api.routers.jobs import job_out
from scheduler.api.schemas import ItemError, JobOut, ProbeFaceOut
from scheduler.compare import CompareDenied, CompareTimeout, compare_images

router = APIRouter(prefix="/v1", tags=["synchronous"])

TimeoutQuery = Annotated[float | None, Query(gt=0, description="Seconds to wait for the answer (at most "
                                                                "FACEGATE_SYNC_TIMEOUT_S, its default)")]


class SearchOut(BaseModel):
    job: JobOut = Field(description="The search job it ran as (its audit rows name this id)")
    matches: list[ProbeFaceOut] = Field(description="Every face found in the image, with its ranked matches")
    no_face: list[ItemError] = Field(description="Set when no face was found in the image: nothing was searched")


class CompareOut(BaseModel):
    job_id: str
    similarity: float | None = Field(description="Cosine similarity of the best pair of faces, one from each "
                                                 "image; None when an image had no face (see reason)")
    false_match_rate: float | None = Field(description="The false-match rate at this similarity for the model "
                                                       "version's calibration; None when it is not calibrated")
    false_match_rate_below_limit: bool | None
    faces: tuple[int, int] | None = Field(description="Which face of each image (in detection order) it was")
    reason: str | None
    model_version: str | None
    untrained: bool
    images: list[dict]


def _timeout(svc, asked: float | None) -> float:
    limit = svc.settings.sync_timeout_s
    return min(asked, limit) if asked else limit


@router.post("/search", response_model=SearchOut,
             responses={403: {"description": "Denied by the policy gate"},
                        504: {"description": "Not finished in time: the problem names the job to poll"}})
async def search_by_image(
    who: PrincipalDep,
    svc: ServicesDep,
    gallery: Annotated[str, Form()],
    purpose: Annotated[str, Form()],
    file: Annotated[UploadFile, File(description="One probe image")],
    threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
    top_k: Annotated[int | None, Form(ge=1, le=1000)] = None,
    authorisation: Annotated[str | None, Form(max_length=64)] = None,
    timeout: TimeoutQuery = None,
) -> SearchOut:
    """Search a gallery with one uploaded image and get the matches in the response. It runs as a search
    job (gate, queue, worker, audit); past the time limit the answer is a 504 naming the job to poll."""
    folder, saved, _ = await save_uploads(svc, who, [file])
    try:
        view = svc.jobs.submit_search([str(saved[0])], gallery, who, purpose, top_k=top_k, threshold=threshold,
                                      upload_folder=folder, authorisation=authorisation)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    limit = _timeout(svc, timeout)
    try:
        view = await run_in_threadpool(svc.jobs.wait, view.id, timeout_s=limit, poll_s=0.2)
    except TimeoutError:
        raise Problem(504, "Not finished in time", f"search job {view.id} did not finish within {limit:g} s: "
                      f"poll GET /v1/jobs/{view.id} (or ?wait=60), then its results", kind="timeout",
                      job_id=view.id) from None
    return SearchOut(job=job_out(view), matches=[ProbeFaceOut(**p) for p in svc.jobs.probe_results(view.id, 0, 1000)],
                     no_face=[ItemError(**e) for e in view.no_face])


@router.post("/compare", response_model=CompareOut,
             responses={403: {"description": "Denied by the policy gate"},
                        504: {"description": "Not finished in time"}})
async def compare(
    who: PrincipalDep,
    svc: ServicesDep,
    purpose: Annotated[str, Form()],
    first: Annotated[UploadFile, File(description="The first image")],
    second: Annotated[UploadFile, File(description="The second image")],
    timeout: TimeoutQuery = None,
) -> CompareOut:
    """The similarity of the best pair of faces of two uploaded images, and its false-match rate. Decided
    by the policy gate for capability `compare`; the images are deleted when it ends."""
    folder, saved, _ = await save_uploads(svc, who, [first, second])
    limit = _timeout(svc, timeout)
    try:
        result = await run_in_threadpool(compare_images, svc.jobs, who, saved[0], saved[1], purpose, timeout_s=limit)
    except CompareDenied as exc:
        raise Problem(403, "Denied by policy", exc.reason, kind="policy-denied", job_id=exc.job_id,
                      rule_ids=exc.rule_ids, registry_hash=exc.registry_hash) from None
    except CompareTimeout as exc:
        raise Problem(504, "Not finished in time", f"{exc}; nothing was kept", kind="timeout",
                      job_id=exc.job_id) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return CompareOut(**vars(result))
