"""Submitting a job: check the request, ask the gate, record the job and its chunks, send each chunk
with its own signed ticket to the queue its model version needs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


from facegate.db import session_scope
from facegate.messages import (
    ChunkMessage,
    ERASE_CHUNK_TASK,
    INDEX_CHUNK_TASK,
    SEARCH_CHUNK_TASK,
    EraseChunk,
    IndexChunk,
    ItemOutcome,
    SearchChunk,
    chunk_task_id,
    model_queue,
    validate_gallery_name,
)
from facegate.paths import PathRefused
from facegate.settings import Settings
from facegate.vocabulary import AuditEvent, ChunkKind
from policy import ERASE_CAPABILITY
from scheduler.access import Access, Action
from scheduler.audit import AuditLog
from scheduler.dispatch import BROKER_ERRORS, TaskQueue
from scheduler.gate import SubmissionGate
from scheduler.inventory import erased_boxes_for, folder_claims, leave_out_erased
from scheduler.keys import Principal
from scheduler.labels import LabelsRefused, check_label, labels_for, read_sidecar, store_labels
from scheduler.models import (
    NOT_SENT,
    Gallery,
    Job,
    JobChunk,
    JobItem,
    JobKind,
    JobState,
    utcnow,
)

from scheduler.reading import JobDenied, JobRefused, JobView

GENERAL_QUEUE = "facegate"
# The rule ids policy/authorisation.py denies with all start so; a worker's refusal that names one means
# the job's authorisation lapsed or was withdrawn.
AUTHORISATION_DENIAL = "deny.authorisation-"



@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of a job: its task, its paths, and which generation of the gallery it addresses."""

    task: ChunkKind
    paths: list[str]
    generation: int = 0
    whole_gallery: bool = False
    # Set for a rebuild: only workers of this model version may fill the new generation.
    model_version: str | None = None
    # An erasure of single faces, by id.
    face_ids: tuple[str, ...] | list[str] = ()


class JobSubmission:
    """JobService's submitting half."""

    settings: Settings
    queue: TaskQueue | None
    db_url: str
    audit: AuditLog
    gate: SubmissionGate

    # Submission ---------------------------------------------------------------------------------

    def submit_index(self, directory: str | Path, gallery: str, principal: Principal, purpose: str, *,
                     quality_filter: str | None = None, external_ids: dict[str, str] | None = None) -> JobView:
        """Index a folder into a gallery; `quality_filter` (a name in the registry's `quality_filters`)
        leaves out faces below it, and the gallery keeps it for its reindexing."""
        gallery = self._gallery(gallery)
        if quality_filter is not None:
            known = self.gate.quality_filters()
            if quality_filter not in known:
                raise JobRefused(f"quality filter {quality_filter!r} is not in the registry "
                                 f"(known: {', '.join(sorted(known)) or 'none'})")
        job_id = uuid.uuid4().hex
        access = self.gate.access.authorize(principal, Action.INDEX, gallery, purpose=purpose, job_id=job_id,
                                            raise_on_denial=False)
        label, gallery = gallery, access.gallery  # the caller's name for it; the store's key
        if not access.allowed:  # denied: recorded as a refused job, and no path of the request is read
            return self.queue_job(JobKind.INDEX, gallery, principal, purpose, {"directory": str(directory)}, [],
                                  capability="index", access=access, job_id=job_id, label=label)
        images = self._readable(principal, [directory], Action.INDEX, directory=True)
        if not images:
            raise JobRefused(f"no images found under {directory} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff)")
        params: dict = {"directory": str(Path(directory).expanduser().resolve())}
        if quality_filter is not None:
            params["quality_filter"] = quality_filter
        # The folder's sidecar file, then the request's mapping (which wins): kept with the images from now on.
        try:
            labels = read_sidecar(params["directory"], self.settings.roots_for(principal.organisation_id))
        except LabelsRefused as exc:
            raise JobRefused(str(exc)) from None
        if external_ids:
            labels.update(self._external_ids(external_ids, Path(params["directory"]), images))
        # Erased images stay erased: each is an item saying so, never sent to a worker, until re-enrolled.
        with session_scope(self.db_url) as s:
            kept, erased = leave_out_erased(s, gallery, label, [str(p) for p in images])
        if erased:
            params["erased"] = len(erased)
        return self._create_and_queue(JobKind.INDEX, gallery, principal, purpose, params, [Path(p) for p in kept],
                                      self.settings.index_chunk_size, access, job_id, label, not_sent=erased,
                                      labels=labels)

    def submit_search(self, paths: Sequence[str | Path], gallery: str, principal: Principal, purpose: str, *,
                      top_k: int | None = None, threshold: float | None = None, aligned: bool = False,
                      upload_folder: Path | None = None, authorisation: str | None = None) -> JobView:
        """Search probes against a gallery. `authorisation` names the recorded legal authorisation the
        search stands on (scheduler/authorisations.py), required when the purpose asks for one."""
        gallery = self._gallery(gallery)
        if not paths:
            raise JobRefused("a search job needs at least one probe file or folder")
        images = self._readable(principal, paths, Action.SEARCH)
        if not images:
            raise JobRefused("no probe images found in " + ", ".join(str(p) for p in paths))
        job_id = uuid.uuid4().hex
        access = self.gate.access.authorize(principal, Action.SEARCH, gallery, purpose=purpose, job_id=job_id,
                                            raise_on_denial=False)
        label, gallery = gallery, access.gallery
        top_k = top_k if top_k is not None else self.settings.default_top_k
        if threshold is None:
            # Unset: the purpose's floor for this gallery's model, never a number the policy would refuse.
            floor = self.gate.floor_for(purpose, access.model_version)
            threshold = max(self.settings.default_threshold_for(access.model_version), floor if floor is not None else -1.0)
        if not 1 <= top_k <= 1000:
            raise JobRefused(f"top-k must be between 1 and 1000, got {top_k}")
        if not -1.0 <= threshold <= 1.0:
            raise JobRefused(f"threshold is a cosine similarity between -1 and 1, got {threshold}")
        params = {"probes": [str(p) for p in paths], "top_k": top_k, "threshold": threshold, "aligned": aligned}
        if upload_folder is not None:
            params["upload_folder"] = str(upload_folder)
        if authorisation:
            params["authorisation"] = authorisation
        return self._create_and_queue(JobKind.SEARCH, gallery, principal, purpose, params, images,
                                      self.settings.search_chunk_size, access, job_id, label)

    @staticmethod
    def _external_ids(given: dict[str, str], directory: Path, images: list[Path]) -> dict[str, str]:
        """The caller's external id of each image, keyed by its resolved path (a key is a path, absolute or
        relative to the folder); a key that names no image of the folder is refused, naming it."""
        found = {str(p): p for p in images}
        resolved: dict[str, str] = {}
        unknown = []
        for key, label in given.items():
            try:
                label = check_label(label, repr(key))
            except LabelsRefused as exc:
                raise JobRefused(str(exc)) from None
            path = Path(key).expanduser()
            real = str((path if path.is_absolute() else directory / path).resolve())
            if real in found:
                resolved[real] = label
            else:
                unknown.append(key)
        if unknown:
            raise JobRefused(f"external_ids name images that are not in {directory}: "
                             + ", ".join(repr(u) for u in unknown[:5]) + (" …" if len(unknown) > 5 else ""))
        return resolved

    def _readable(self, principal: Principal, paths: Sequence[str | Path], action: Action, *,
                  directory: bool = False) -> list[Path]:
        try:
            return self.gate.access.readable_paths(principal, paths, action=action, directory=directory)
        except PathRefused as exc:
            self.audit.append(AuditEvent.ACCESS_REFUSED, organisation_id=principal.organisation_id,
                              **principal.actor, capability=action.value, allowed=False,
                              rule_ids=["deny.path-not-readable"], detail={"reason": str(exc)})
            raise JobRefused(str(exc)) from None

    @staticmethod
    def _gallery(name: str) -> str:
        try:
            return validate_gallery_name(name)
        except ValueError as exc:
            raise JobRefused(str(exc)) from None

    def _create_and_queue(self, kind: JobKind, gallery: str, principal: Principal, purpose: str, params: dict,
                          images: list[Path], chunk_size: int, access: Access, job_id: str,
                          label: str | None = None, not_sent: list[ItemOutcome] | None = None,
                          labels: Mapping[str, str] | None = None) -> JobView:
        task = ChunkKind.SEARCH if kind is JobKind.SEARCH else ChunkKind.INDEX
        with session_scope(self.db_url) as s:
            known = s.get(Gallery, gallery)
            generation = known.generation if known else 0
        specs = [ChunkSpec(task, [str(p) for p in images[i : i + chunk_size]], generation)
                 for i in range(0, len(images), chunk_size)]
        return self.queue_job(kind, gallery, principal, purpose, params, specs, capability=kind.value,
                              access=access, job_id=job_id, label=label, not_sent=not_sent, labels=labels)

    def queue_job(self, kind: JobKind, gallery: str, principal: Principal, purpose: str, params: dict,
                  specs: list["ChunkSpec"], *, capability: str, access: Access | None = None,
                  job_id: str | None = None, label: str | None = None,
                  not_sent: list[ItemOutcome] | None = None, labels: Mapping[str, str] | None = None) -> JobView:
        """Gate, record and queue a job made of chunk specs; a denied job is recorded and never queued.

        `access` is the access rule's answer for this request (taken here when not given); `not_sent` are
        items decided here (erased images, not indexed), recorded as the job's and never sent to a worker;
        `labels` are external ids given with the request, kept (scheduler/labels.py) once the job is allowed.
        Every index chunk carries the stored labels of its images, however the job came."""
        if self.queue is None:
            raise RuntimeError("this JobService has no task queue: it can read jobs but not run them")
        job_id = job_id or uuid.uuid4().hex
        with session_scope(self.db_url) as s:
            known = s.get(Gallery, gallery)
            model_version = known.model_version if known else None
            current_generation = known.generation if known else 0
            label = label or (known.label if known else None) or gallery
        not_sent = not_sent or []
        total_items = sum(1 if spec.whole_gallery else len(spec.paths) + len(spec.face_ids)
                          for spec in specs) + len(not_sent)
        if capability == ERASE_CAPABILITY:
            admission = self.gate.admit_erasure(principal, job_id=job_id, gallery=gallery, access=access)
        else:
            if access is None:
                action = Action.REINDEX if kind is JobKind.REINDEX else Action(capability)
                access = self.gate.access.authorize(principal, action, gallery, purpose=purpose, job_id=job_id,
                                                    raise_on_denial=False)
            admission = self.gate.admit(principal, capability, purpose, job_id=job_id, gallery=gallery,
                                        threshold=params.get("threshold"), model_version=model_version,
                                        access=access, authorisation=params.get("authorisation"))
        decision = admission.decision
        job = Job(id=job_id, kind=kind, submitter=principal.organisation_id, api_key_id=principal.key_id,
                  username=principal.user, purpose=purpose, gallery=gallery, gallery_label=label, params=params, total_items=total_items,
                  registry_hash=decision.registry_hash, decision_rule_ids=list(decision.rule_ids),
                  decision_reason=decision.reason, review_required=admission.review_required,
                  reviewers_required=admission.reviewers_required,
                  authorisation_id=params.get("authorisation"))
        if not admission.allowed:
            job.state, job.error, job.finished_at = JobState.REFUSED, decision.reason, utcnow()
            with session_scope(self.db_url) as s:
                s.add(job)
            owner = access.owner if access is not None else None
            self.audit.append(AuditEvent.JOB_REFUSED, organisation_id=principal.organisation_id, **principal.actor,
                              job_id=job_id, capability=capability, purpose=purpose, gallery=gallery,
                              registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=False,
                              detail={"reason": decision.reason, "items": total_items,
                                      **({"on_behalf_of": owner} if owner and owner != principal.organisation_id
                                         else {})})
            self._remove_uploads(job, "refused")
            raise JobDenied(self.get(job_id))

        job.state, job.total_chunks, job.done_items = JobState.QUEUED, len(specs), len(not_sent)
        if not specs:  # nothing to do (a reindex that found no change): done, and recorded as such
            job.state, job.started_at, job.finished_at = JobState.DONE, utcnow(), utcnow()
        with session_scope(self.db_url) as s:
            row = s.get(Gallery, gallery)
            if kind in (JobKind.INDEX, JobKind.REINDEX) and row is None:
                row = Gallery(name=gallery, label=label, owner=principal.organisation_id, purpose=purpose)
                s.add(row)
            elif kind is JobKind.INDEX and row is not None and row.purpose is None:
                row.purpose = purpose
            if kind is JobKind.INDEX and row.folder is None and params.get("directory"):
                # A gallery made by an index job keeps the folder it came from, so it can be reindexed,
                # unless that folder overlaps another gallery's (already read and confined above).
                directory = Path(params["directory"])
                if not folder_claims(s, directory, exclude=gallery):
                    row.folder = str(directory)
            if kind is JobKind.INDEX and params.get("quality_filter"):
                row.quality_filter = params["quality_filter"]
            store_labels(s, gallery, labels or {}, by=principal.organisation_id)
            indexed = [p for spec in specs if spec.task is ChunkKind.INDEX for p in spec.paths]
            known_labels = labels_for(s, gallery, indexed) if indexed else {}
            erased_faces = erased_boxes_for(s, gallery, indexed) if indexed else {}
            if known_labels:
                job.params = params = {**params, "external_ids": len(known_labels)}
            s.add(job)
            s.flush()
            s.add_all(JobItem(job_id=job_id, chunk_no=NOT_SENT, path=i.path, ok=i.ok, reason=i.reason, faces=i.faces,
                              image_sha256=i.image_sha256) for i in not_sent)
            s.add_all(JobChunk(job_id=job_id, chunk_no=n, paths=spec.paths, task=spec.task,
                               generation=spec.generation, whole_gallery=spec.whole_gallery)
                      for n, spec in enumerate(specs))
        self.audit.append(AuditEvent.JOB_SUBMITTED, organisation_id=principal.organisation_id, **principal.actor,
                          job_id=job_id, capability=capability, purpose=purpose, gallery=gallery,
                          registry_hash=decision.registry_hash, rule_ids=list(decision.rule_ids), allowed=True,
                          detail={"items": total_items, "chunks": len(specs), "generation": current_generation,
                                  **({"on_behalf_of": access.owner} if access is not None and access.owner
                                     and access.owner != principal.organisation_id else {}),
                                  **{k: v for k, v in params.items()
                                     if k not in ("probes", "paths", "authorisation")},
                                  **self._authorisation_detail(params)})
        erasure = None
        outgoing: list[tuple[int, str, dict, str]] = []
        for n, spec in enumerate(specs):
            signer = admission
            if spec.task is ChunkKind.ERASE and capability != ERASE_CAPABILITY:
                # A reindex also removes deleted files: that part runs under an erasure ticket of its own.
                erasure = erasure or self.gate.admit_erasure(principal, job_id=job_id, gallery=gallery)
                signer = erasure
            task_name, message = self._message(job_id, n, gallery, spec, params, known_labels, erased_faces)
            message.ticket = signer.ticket_for(message)
            outgoing.append((n, task_name, message.model_dump(mode="json"), self._route(spec, model_version, known)))
        # Recorded before it is sent: whatever happens to the broker, the reconciler can send it again as it was.
        with session_scope(self.db_url) as s:
            for n, task_name, body, queue in outgoing:
                chunk = s.get(JobChunk, (job_id, n))
                assert chunk is not None
                chunk.task_name, chunk.message, chunk.queue, chunk.sends, chunk.sent_at = (
                    task_name, body, queue, 1, utcnow())
        for index, (n, task_name, body, queue) in enumerate(outgoing):
            try:
                self.queue.send(task_name, body, task_id=chunk_task_id(job_id, n), queue=queue)
            except BROKER_ERRORS as exc:
                # Recorded, so not lost: the reconciler sends the rest once the broker answers again.
                self._not_sent(job_id, [c for c, *_ in outgoing[index:]], exc)
                break
        return self.get(job_id)

    def _not_sent(self, job_id: str, chunk_nos: list[int], exc: Exception) -> None:
        at = utcnow()
        with session_scope(self.db_url) as s:
            for n in chunk_nos:
                chunk = s.get(JobChunk, (job_id, n))
                assert chunk is not None
                chunk.sends, chunk.sent_at, chunk.unplaced_since = 0, None, at
            job = s.get(Job, job_id)
            assert job is not None
            chunks = f"chunk {chunk_nos[0]}" if len(chunk_nos) == 1 else f"chunks {chunk_nos[0]}-{chunk_nos[-1]}"
            job.notes = [*(job.notes or []), f"the broker was not reachable at {at:%H:%M} UTC ({exc}): {chunks} "
                                             "will be sent as soon as it answers again"]

    @staticmethod
    def _route(spec: "ChunkSpec", model_version: str | None, gallery: Gallery | None) -> str:
        """Searches, and indexing into a gallery's current generation, go to workers of its model version."""
        if spec.model_version is not None:
            return model_queue(spec.model_version)
        if spec.task is ChunkKind.ERASE or model_version is None or gallery is None:
            return GENERAL_QUEUE
        if spec.generation == gallery.generation:
            return model_queue(model_version)
        return GENERAL_QUEUE  # a rebuild's new generation: any worker, whose model the rebuild adopts

    @staticmethod
    def _message(job_id: str, chunk_no: int, gallery: str, spec: "ChunkSpec",
                 params: dict, labels: Mapping[str, str],
                 erased_faces: Mapping[str, list[list[float]]]) -> tuple[str, ChunkMessage]:
        common = dict(job_id=job_id, chunk_no=chunk_no, gallery=gallery, generation=spec.generation)
        if spec.task is ChunkKind.INDEX:
            return INDEX_CHUNK_TASK, IndexChunk(paths=spec.paths, quality_filter=params.get("quality_filter"),
                                                external_ids={p: labels[p] for p in spec.paths if p in labels},
                                                erased_boxes={p: erased_faces[p] for p in spec.paths
                                                              if p in erased_faces},
                                                **common)
        if spec.task is ChunkKind.ERASE:
            return ERASE_CHUNK_TASK, EraseChunk(paths=spec.paths, whole_gallery=spec.whole_gallery,
                                                face_ids=list(spec.face_ids), **common)
        return SEARCH_CHUNK_TASK, SearchChunk(paths=spec.paths, top_k=params["top_k"], threshold=params["threshold"],
                                              aligned=params.get("aligned", False), **common)
