"""Compare two images (POST /v1/compare): the similarity of their best pair of faces and what it means
(the false-match rate at that similarity for the model version's calibration).

Through the same gate as everything else (capability `compare`, audited), a signed ticket, the queue and a
worker (`facegate.compare_pairs` with `best_pair`), within a time limit. Only the similarity comes back."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from facegate.calibration import CalibrationStore
from facegate.files import sha256_file
from facegate.messages import COMPARE_PAIRS_TASK, ChunkResult, CompareChunk, chunk_task_id
from facegate.vocabulary import AuditEvent
from scheduler.reading import JobDenied, JobRefused, _false_match_rate
from scheduler.keys import Principal
from scheduler.submission import GENERAL_QUEUE


class CompareDenied(PermissionError):
    def __init__(self, reason: str, rule_ids: list[str], registry_hash: str, job_id: str) -> None:
        super().__init__(reason)
        self.reason, self.rule_ids, self.registry_hash, self.job_id = reason, rule_ids, registry_hash, job_id


class CompareTimeout(TimeoutError):
    def __init__(self, job_id: str, timeout_s: float) -> None:
        super().__init__(f"compare {job_id} did not finish within {timeout_s:g} s")
        self.job_id = job_id


@dataclass
class Comparison:
    job_id: str
    similarity: float | None
    reason: str | None
    faces: tuple[int, int] | None
    model_version: str | None
    untrained: bool
    false_match_rate: float | None
    false_match_rate_below_limit: bool | None
    images: list[dict]


def compare_images(jobs, principal: Principal, first: Path, second: Path, purpose: str, *,
                   timeout_s: float) -> Comparison:
    """Gate, send, wait. `jobs` is the JobService (its settings, queue, gate and audit)."""
    if jobs.queue is None:
        raise RuntimeError("comparing needs a task queue")
    job_id = f"cmp-{uuid.uuid4().hex}"
    admission = jobs.gate.admit(principal, "compare", purpose, job_id=job_id, gallery="compare")
    decision = admission.decision
    facts = dict(organisation_id=principal.organisation_id, **principal.actor, job_id=job_id,
                 capability="compare", purpose=purpose, registry_hash=decision.registry_hash)
    images = [{"name": p.name.split("-", 1)[-1], "sha256": sha256_file(p)} for p in (first, second)]
    if not admission.allowed:
        jobs.audit.append(AuditEvent.JOB_REFUSED, **facts, rule_ids=list(decision.rule_ids), allowed=False,
                          detail={"reason": decision.reason, "images": images})
        raise CompareDenied(decision.reason, list(decision.rule_ids), decision.registry_hash, job_id)
    message = CompareChunk(job_id=job_id, chunk_no=0, pairs=[(str(first), str(second))], best_pair=True)
    message.ticket = admission.ticket_for(message)
    task_id = chunk_task_id(job_id, 0)
    jobs.audit.append(AuditEvent.JOB_SUBMITTED, **facts, rule_ids=list(decision.rule_ids), allowed=True,
                      detail={"images": images, "timeout_s": timeout_s})
    jobs.queue.send(COMPARE_PAIRS_TASK, message.model_dump(mode="json"), task_id=task_id, queue=GENERAL_QUEUE)
    deadline = time.monotonic() + timeout_s
    while True:
        status = jobs.queue.status(task_id)
        if status.finished:
            break
        if time.monotonic() > deadline:
            jobs.queue.revoke([task_id])
            jobs.audit.append(AuditEvent.JOB_CANCELLED, **facts, detail={"reason": f"no answer within {timeout_s:g} s"})
            raise CompareTimeout(job_id, timeout_s)
        time.sleep(0.2)
    jobs.queue.forget(task_id)
    if status.result is None:
        jobs.audit.append(AuditEvent.JOB_FINISHED, **facts, detail={"state": "failed", "error": status.error})
        raise JobRefused(f"the compare failed in the worker: {status.error}")
    result = ChunkResult.model_validate(status.result)
    if result.refused:
        jobs.audit.append(AuditEvent.JOB_REFUSED_AT_EXECUTION, **facts, detail={"reason": result.refused})
        raise CompareDenied(result.refused, [], decision.registry_hash, job_id)
    score = result.scores[0] if result.scores else None
    similarity = score.similarity if score else None
    calibration = (CalibrationStore(jobs.settings.resolved_calibration_dir).get(result.model_version)
                   if similarity is not None and result.model_version else None)
    fmr = _false_match_rate(calibration, similarity) if similarity is not None else \
        {"false_match_rate": None, "false_match_rate_below_limit": None}
    reason = score.reason if score else (result.error or "no score came back")
    if reason:
        # Name the images as the caller sent them, never the upload folder they were kept in.
        reason = reason.replace(str(first), images[0]["name"]).replace(str(second), images[1]["name"])
    jobs.audit.append(AuditEvent.JOB_FINISHED, **facts, detail={
        "state": "done" if similarity is not None else "failed", "similarity": similarity, "reason": reason,
        "model_version": result.model_version, "untrained": result.untrained, **fmr})
    return Comparison(job_id=job_id, similarity=similarity, reason=reason, faces=score.faces if score else None,
                      model_version=result.model_version, untrained=result.untrained, images=images, **fmr)


__all__ = ["CompareDenied", "CompareTimeout", "Comparison", "JobDenied", "compare_images"]
