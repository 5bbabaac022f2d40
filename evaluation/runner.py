"""Run an evaluation through the queue: a dataset in, a report and a calibration out.

The runner never opens an image. It plans the comparisons (the verification pairs, and every
gallery x probe pair of the identification split), asks the policy gate for a ticket (capability
`compare`), sends the pairs in chunks to the workers as `facegate.compare_pairs` tasks, and collects
one cosine similarity per pair: embeddings never cross the broker. Each worker embeds every distinct
image of its chunk once with the real pipeline (MTCNN detection, the 160x160 crop, the embedding) and
takes the most probable face of each image.

From the similarities it computes every figure of the report (evaluation.report), writes report.json
and report.html, and writes the calibration (similarity -> false-match rate) of the model version the
workers reported into the calibration store, where the policy engine reads it to translate a floor
stated as a false-match rate into a similarity threshold.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facegate.calibration import (
    Calibration,
    CalibrationError,
    CalibrationKept,
    CalibrationStore,
    calibrated_threshold_lookup,
)
from facegate.vocabulary import AuditEvent
from .dataset import (
    Dataset,
    DatasetError,
    IdentificationSplit,
    Pair,
    gallery_probe_split,
    generate_pairs,
    read_group_labels,
    read_pairs_file,
    scan_identity_folders,
)
from .report import (
    DEFAULT_FAR_TARGETS,
    DatasetSummary,
    EvaluationReport,
    GroupTable,
    IdentificationResults,
    NoFaceFound,
    NoFaceGroupRow,
    OpenSetRow,
    OperatingThreshold,
    VerificationResults,
)

if TYPE_CHECKING:
    from celery import Celery

    from facegate.messages import ChunkResult, ItemOutcome
    from facegate.settings import Settings
    from scheduler.keys import Principal

__all__ = [
    "DEFAULT_IDENTIFICATION_IDENTITIES",
    "Admitted",
    "EvaluationError",
    "EvaluationPlan",
    "EvaluationRefused",
    "admit_evaluation",
    "calibrated_threshold_lookup",
    "calibration_dir",
    "check_confined",
    "evaluations_dir",
    "plan_evaluation",
    "run_evaluation",
]

# Identification compares every probe with every enrolled image: quadratic in the dataset. Above this
# many identities it runs on a deterministic sample of identities (said so in the report).
DEFAULT_IDENTIFICATION_IDENTITIES = 300

# (pairs compared so far, pairs in all)
ProgressCallback = Callable[[int, int], None]

MODEL_NAME = "facenet-pytorch MTCNN + InceptionResnetV1"
UNTRAINED_MODEL_NAME = "facenet-pytorch MTCNN + InceptionResnetV1 (untrained)"


class EvaluationError(ValueError):
    """The evaluation cannot run or cannot be completed as asked; the message says why and what to fix."""


class EvaluationRefused(PermissionError):
    """The policy gate refused the evaluation (at submission or in the worker); the message gives its reason."""

    def __init__(self, message: str, rule_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.rule_ids = list(rule_ids)


def calibration_dir(settings: Settings) -> Path:
    """Where calibrations live: one file per model version."""
    return settings.resolved_calibration_dir


def evaluations_dir(settings: Settings) -> Path:
    """Where `facegate evaluate` writes its reports by default (one folder per run), and where the
    accountability report looks for them."""
    return Path(settings.data_dir) / "evaluations"




# Planning ----------------------------------------------------------------------------------------

Comparison = tuple[str, str]  # two image paths, in sorted order: a similarity is symmetric


def _key(first: str | Path, second: str | Path) -> Comparison:
    a, b = str(first), str(second)
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class EvaluationPlan:
    """What an evaluation will compare, decided before anything is queued (so bad input fails fast)."""

    dataset: Dataset
    pairs: list[Pair]  # the verification pairs
    pairs_source: str
    group_labels: dict[str, dict[str, str]] | None
    split: IdentificationSplit | None
    chunks: list[list[Comparison]]  # what each compare task gets, every comparison once
    notes: list[str] = field(default_factory=list)  # limitations known at planning time

    @property
    def comparisons(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def identity_of(self) -> dict[str, str]:
        return {str(path): identity for identity, path in self.dataset.images}


def _identification_sample(dataset: Dataset, limit: int, seed: int) -> tuple[Dataset, str | None]:
    if len(dataset.identities) <= limit:
        return dataset, None
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(dataset.identities, size=limit, replace=False).tolist())
    sample = Dataset(
        root=dataset.root,
        identities=[i for i in dataset.identities if i in chosen],
        images=[(i, p) for i, p in dataset.images if i in chosen],
    )
    return sample, (
        f"Identification was measured on a random sample of {limit} of the {len(dataset.identities)} identities "
        f"(seed {seed}): every probe is compared with every enrolled image, which grows with the square of "
        "the dataset. A larger gallery makes identification harder, so rank-1 on the whole dataset would be lower."
    )


def _tiles(gallery: Sequence[str], probes: Sequence[str], side: int) -> Iterable[list[Comparison]]:
    """Gallery x probe comparisons in blocks, so that a chunk embeds 2 x side images for side^2 pairs."""
    for g in range(0, len(gallery), side):
        for p in range(0, len(probes), side):
            yield [_key(a, b) for a in gallery[g : g + side] for b in probes[p : p + side] if a != b]


def plan_evaluation(
    dataset_dir: str | Path,
    *,
    pairs_file: str | Path | None = None,
    groups_csv: str | Path | None = None,
    allow_unlabelled: bool = False,
    chunk_pairs: int = 64,
    identification_identities: int = DEFAULT_IDENTIFICATION_IDENTITIES,
    identification: bool = True,
    seed: int = 0,
) -> EvaluationPlan:
    """Scan the dataset, read or generate the verification pairs, read the group labels, split for
    identification and cut the comparisons into chunks. Raises DatasetError (a ValueError) naming the
    file or folder at fault: one identity, a label file naming unknown identities, a bad pairs line."""
    if chunk_pairs < 1:
        raise EvaluationError(f"chunk_pairs must be at least 1, not {chunk_pairs}")
    if identification_identities < 2:
        raise EvaluationError(f"identification needs at least 2 identities, not {identification_identities}")
    root = Path(dataset_dir).expanduser()
    if root.is_dir():
        root = root.resolve()
    dataset = scan_identity_folders(root)
    notes: list[str] = []

    if pairs_file is not None:
        pairs = read_pairs_file(pairs_file, dataset)
        with_folds = all(p.fold is not None for p in pairs)
        pairs_source = f"pairs file {Path(pairs_file).expanduser()}" + (
            f" ({len({p.fold for p in pairs})} folds)" if with_folds else " (no folds: accuracy is not cross-validated)"
        )
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pairs = generate_pairs(dataset, n_folds=10, seed=seed)
        notes.extend(str(w.message) for w in caught)
        pairs_source = (
            f"generated by FaceGate (seed {seed}, {len({p.fold for p in pairs})} identity-disjoint folds): "
            "not a published protocol, so the accuracy is not comparable with published figures"
        )
        notes.append(f"Verification pairs were {pairs_source}.")
    if not any(p.is_genuine for p in pairs) or all(p.is_genuine for p in pairs):
        raise EvaluationError(
            f"the verification pairs of {dataset.root} need both same-person and different-person pairs; "
            f"got {sum(p.is_genuine for p in pairs)} same-person of {len(pairs)}"
        )

    group_labels = (
        read_group_labels(groups_csv, dataset, allow_unlabelled=allow_unlabelled) if groups_csv is not None else None
    )

    split: IdentificationSplit | None = None
    if identification:
        sample, sample_note = _identification_sample(dataset, identification_identities, seed)
        try:
            split = gallery_probe_split(sample, seed=seed)
        except DatasetError as problem:
            notes.append(f"Identification was not measured: {problem}.")
        if sample_note and split is not None:
            notes.append(sample_note)
    else:
        notes.append("Identification was not measured (not asked for).")

    chunks: list[list[Comparison]] = []
    planned: set[Comparison] = set()
    if split is not None:
        side = max(2, min(64, round(math.sqrt(chunk_pairs) * 4)))
        gallery = [str(p) for _, p in split.gallery]
        probes = [str(p) for _, p in split.known_probes + split.unknown_probes]
        for tile in _tiles(gallery, probes, side):
            fresh = [c for c in dict.fromkeys(tile) if c not in planned]
            planned.update(fresh)
            if fresh:
                chunks.append(fresh)
    # Sorted, so that pairs sharing an image tend to share a chunk (each chunk embeds an image once).
    verification = sorted({_key(p.first, p.second) for p in pairs} - planned)
    chunks.extend(verification[i : i + chunk_pairs] for i in range(0, len(verification), chunk_pairs))
    return EvaluationPlan(
        dataset=dataset,
        pairs=pairs,
        pairs_source=pairs_source,
        group_labels=group_labels,
        split=split,
        chunks=chunks,
        notes=notes,
    )


# Running -----------------------------------------------------------------------------------------


@dataclass
class _Collected:
    similarity: dict[Comparison, float] = field(default_factory=dict)
    why_missing: dict[Comparison, str] = field(default_factory=dict)
    images: dict[str, ItemOutcome] = field(default_factory=dict)
    model_versions: set[str] = field(default_factory=set)
    untrained: set[bool] = field(default_factory=set)


def check_confined(settings: Settings, root: Path) -> None:
    """Refuse a dataset outside the gallery roots before anything is queued (the workers would refuse
    every image of it)."""
    from facegate.paths import PathRefused, confine

    try:
        confine(root, settings.resolved_gallery_roots)
    except PathRefused as problem:
        raise EvaluationError(
            f"the dataset must lie inside the gallery roots (FACEGATE_GALLERY_ROOTS), where the workers may "
            f"read: {problem}"
        ) from None


@dataclass(frozen=True)
class Admitted:
    """The policy gate's yes for one evaluation: its job id and the signed ticket the workers check."""

    job_id: str
    # Signs each chunk's ticket, bound to that chunk's pairs (scheduler.gate.Admission.ticket_for).
    ticket_for: Callable
    purpose: str
    audit_fields: dict


def admit_evaluation(settings: Settings, plan: EvaluationPlan, principal: Principal, purpose: str) -> Admitted:
    """Ask the policy gate (capability `compare`) for this evaluation; the decision is audited either way.
    Raises EvaluationRefused with the registry's reason and rule ids."""
    from scheduler.audit import AuditLog
    from scheduler.gate import SubmissionGate

    check_confined(settings, plan.dataset.root)
    job_id = f"eval-{uuid.uuid4().hex}"
    gallery = f"evaluation:{plan.dataset.name}"
    admission = SubmissionGate(settings, AuditLog(settings.resolved_database_url)).admit(
        principal, "compare", purpose, job_id=job_id, gallery=gallery
    )
    decision = admission.decision
    if not admission.allowed:
        raise EvaluationRefused(
            f"{decision.reason} (rules {', '.join(decision.rule_ids)}; registry {decision.registry_hash[:12]})",
            decision.rule_ids,
        )
    return Admitted(
        job_id=job_id,
        ticket_for=admission.ticket_for,
        purpose=purpose,
        audit_fields=dict(organisation_id=principal.organisation_id, **principal.actor, job_id=job_id,
                          capability="compare", purpose=purpose, gallery=gallery,
                          registry_hash=decision.registry_hash),
    )


def run_evaluation(
    settings: Settings,
    dataset_dir: str | Path,
    principal: Principal,
    *,
    pairs_file: str | Path | None = None,
    groups_csv: str | Path | None = None,
    purpose: str = "research",
    chunk_pairs: int = 64,
    out_dir: str | Path,
    allow_unlabelled: bool = False,
    identification_identities: int = DEFAULT_IDENTIFICATION_IDENTITIES,
    identification: bool = True,
    seed: int = 0,
    plan: EvaluationPlan | None = None,
    on_progress: ProgressCallback | None = None,
    weights_sha256: str | None = None,
    calibrate: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    max_in_flight: int = 64,
    admitted: Admitted | None = None,
    celery_app: Celery | None = None,
    replace_calibration: bool = False,
    on_calibration: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Evaluate the workers' model on a folder-per-identity dataset, through the queue.

    Raises DatasetError/EvaluationError (bad input, nothing to measure, a chunk that failed) and
    EvaluationRefused (the policy gate said no, before queuing or in the worker). On success the
    report is in `out_dir` (report.json, report.html) and, unless `calibrate=False`, the model
    version's calibration is in `calibration_dir(settings)`, unless the one there rests on more impostor
    pairs and `replace_calibration` is not set (`on_calibration` hears, in a sentence, which way it
    went). `admitted` is the result of an earlier
    `admit_evaluation` for this plan, whose purpose then applies (the CLI asks before it starts an
    embedded broker and worker).
    """
    from facegate.messages import COMPARE_PAIRS_TASK, CompareChunk, chunk_task_id
    from facegate.queue import make_celery
    from scheduler.audit import AuditLog

    if plan is None:
        plan = plan_evaluation(
            dataset_dir,
            pairs_file=pairs_file,
            groups_csv=groups_csv,
            allow_unlabelled=allow_unlabelled,
            chunk_pairs=chunk_pairs,
            identification_identities=identification_identities,
            identification=identification,
            seed=seed,
        )
    check_confined(settings, plan.dataset.root)

    if admitted is None:
        admitted = admit_evaluation(settings, plan, principal, purpose)
    job_id = admitted.job_id
    audit = AuditLog(settings.resolved_database_url)
    audit_fields = admitted.audit_fields
    audit.append(
        AuditEvent.EVALUATION_STARTED,
        **audit_fields,
        detail={"dataset": str(plan.dataset.root), "identities": len(plan.dataset.identities),
                "images": len(plan.dataset.images), "pairs": len(plan.pairs), "comparisons": plan.comparisons,
                "chunks": len(plan.chunks)},
    )

    app = celery_app or make_celery(settings)
    try:
        collected = _collect(
            app, plan, job_id, admitted.ticket_for, COMPARE_PAIRS_TASK, CompareChunk, chunk_task_id,
            on_progress=on_progress, timeout_s=timeout_s, poll_s=poll_s, max_in_flight=max(1, max_in_flight),
        )
        report, calibration = _build_report(settings, plan, collected, weights_sha256)
    except BaseException as problem:
        event = AuditEvent.EVALUATION_REFUSED_AT_EXECUTION if isinstance(problem, EvaluationRefused) else AuditEvent.EVALUATION_FAILED
        audit.append(event, **audit_fields, detail={"reason": str(problem) or type(problem).__name__})
        raise
    finally:
        if celery_app is None:
            app.close()

    out = Path(out_dir).expanduser()
    json_path = report.write_json(out / "report.json")
    html_path = report.write_html(out / "report.html")
    calibration_path = None
    kept = None
    if calibrate:
        calibration = calibration.model_copy(update={
            "run_by": f"{principal.organisation_id} (key {principal.key_id})" if principal.key_id
            else principal.organisation_id,
            "dataset_fingerprint": dataset_fingerprint(plan)})
        try:
            calibration_path = CalibrationStore(calibration_dir(settings)).put(calibration,
                                                                               replace=replace_calibration)
            said = (f"calibration for {calibration.model_version} written: {calibration.n_impostor} impostor "
                    f"pairs, dataset fingerprint {calibration.dataset_fingerprint[:12]}")
        except CalibrationKept as why:
            kept = said = str(why)
        if on_calibration:
            on_calibration(said)
    audit.append(
        AuditEvent.EVALUATION_FINISHED,
        **audit_fields,
        detail={
            "model_version": report.model_version,
            "untrained": report.untrained,
            "dataset": str(plan.dataset.root),
            "identities": report.dataset.identities,
            "images": report.dataset.images,
            "pairs": report.dataset.pairs,
            "comparisons": plan.comparisons,
            "no_face": report.no_face_found.no_face if report.no_face_found else 0,
            "genuine_pairs": report.verification.n_genuine if report.verification else 0,
            "impostor_pairs": report.verification.n_impostor if report.verification else 0,
            "accuracy": report.verification.accuracy_mean if report.verification else None,
            "auc": report.verification.auc if report.verification else None,
            "calibration_impostor_pairs": calibration.n_impostor,
            "calibration": str(calibration_path) if calibration_path else None,
            "calibration_kept": kept,
            "dataset_fingerprint": calibration.dataset_fingerprint,
            "report": str(json_path),
            "html": str(html_path),
        },
    )
    return report


def dataset_fingerprint(plan: EvaluationPlan) -> str:
    """sha256 over the dataset's images (path relative to its root, and content) and the pairs compared:
    two calibrations with the same fingerprint were measured on the same data."""
    import hashlib

    root = plan.dataset.root
    digest = hashlib.sha256()
    for identity, path in plan.dataset.images:
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        digest.update(f"image\0{identity}\0{Path(path).relative_to(root)}\0{content}\n".encode())
    for pair in plan.pairs:
        digest.update(f"pair\0{Path(pair.first).relative_to(root)}\0{Path(pair.second).relative_to(root)}\n".encode())
    return digest.hexdigest()


def _collect(app, plan, job_id, ticket_for, task_name, message_type, task_id_for, *, on_progress, timeout_s,
             poll_s, max_in_flight) -> _Collected:
    from celery import states

    from facegate.messages import ChunkResult
    from scheduler.dispatch import CeleryTaskQueue

    # The scheduler's one way to send, poll, forget and revoke: every message goes with the redacted
    # display as its argsrepr, so no task event, log or Flower page shows the ticket it carries.
    queue = CeleryTaskQueue(app)
    total = plan.comparisons
    pending: dict[str, int] = {}
    unsent = iter(enumerate(plan.chunks))

    def send_more() -> None:
        # A window of chunks on the broker at a time: a large evaluation does not park all its messages in
        # Redis at once, and a failure leaves little to revoke.
        while len(pending) < max_in_flight:
            chunk_no, chunk = next(unsent, (None, None))
            if chunk_no is None:
                return
            message = message_type(job_id=job_id, chunk_no=chunk_no, pairs=chunk)
            message.ticket = ticket_for(message)
            task_id = task_id_for(job_id, chunk_no)
            queue.send(task_name, message.model_dump(mode="json"), task_id=task_id)
            pending[task_id] = chunk_no

    collected = _Collected()
    done = 0
    if on_progress:
        on_progress(0, total)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        send_more()
        while pending:
            for task_id, chunk_no in list(pending.items()):
                status = queue.status(task_id)
                if status.state == states.FAILURE:
                    raise EvaluationError(
                        f"compare chunk {chunk_no} failed in the worker: {status.error}; no report was written "
                        "(the figures would miss its pairs)"
                    )
                if not status.finished:
                    continue
                payload = ChunkResult.model_validate(status.result)
                queue.forget(task_id)
                del pending[task_id]
                _fold(collected, payload, plan.chunks[chunk_no])
                done += len(plan.chunks[chunk_no])
                if on_progress:
                    on_progress(done, total)
                send_more()
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise EvaluationError(
                        f"timed out after {timeout_s:.0f} s with {len(pending)} of {len(plan.chunks)} compare chunks "
                        "unfinished: is a worker running on this broker?"
                    )
                time.sleep(poll_s)
    except BaseException:
        if pending:  # nobody will read them: do not leave the workers busy for nothing
            try:
                queue.revoke(list(pending))
            except Exception:  # noqa: BLE001 - best effort; the broker may be the thing that failed
                pass
        raise
    if len(collected.model_versions) > 1:
        raise EvaluationError(
            "the workers embedded with different model versions ("
            + ", ".join(sorted(collected.model_versions))
            + "): similarities across models mean nothing; run the evaluation with workers of one model version"
        )
    return collected


def _fold(collected: _Collected, result: ChunkResult, sent: list[Comparison]) -> None:
    if result.refused:
        raise EvaluationRefused(f"compare chunk {result.chunk_no}: {result.refused}")
    if result.error:
        raise EvaluationError(f"compare chunk {result.chunk_no} could not run: {result.error}")
    if len(result.scores) != len(sent):
        raise EvaluationError(
            f"compare chunk {result.chunk_no} returned {len(result.scores)} scores for {len(sent)} pairs"
        )
    if result.model_version:
        collected.model_versions.add(result.model_version)
    collected.untrained.add(result.untrained)
    for comparison, score in zip(sent, result.scores):
        if _key(score.first, score.second) != comparison:
            raise EvaluationError(f"compare chunk {result.chunk_no} returned pairs out of order")
        if score.similarity is None or not math.isfinite(score.similarity):
            collected.why_missing[comparison] = score.reason or "no similarity"
        else:
            collected.similarity[comparison] = float(score.similarity)
    for item in result.items:
        collected.images.setdefault(item.path, item)


# The report --------------------------------------------------------------------------------------


def _has_face(outcome: ItemOutcome | None) -> bool:
    return outcome is not None and outcome.ok and outcome.faces > 0


def _model_name(model_version: str) -> str:
    from facegate.embedding_models import FACENET_VGGFACE2, model_of

    model = model_of(model_version)
    return MODEL_NAME if model is None or model.family == FACENET_VGGFACE2 else f"MTCNN + {model.network}"


def _weights_hash(model_version: str, *candidates: str | None) -> str | None:
    """The full weights hash, when one at hand is the one the workers' model version was made from."""
    for candidate in candidates:
        if candidate and model_version.partition(":")[2] == candidate.strip().lower()[:16]:
            return candidate.strip().lower()
    return None


def _identification(
    split: IdentificationSplit,
    score: Callable[[str, str], float | None],
    has_face: Callable[[str], bool],
    thresholds: Sequence[float],
    notes: list[str],
) -> IdentificationResults | None:
    """Rank-1/rank-5 and open-set FPIR/FNIR from pair similarities, with the definitions of
    evaluation.metrics.rank_k and fpir_fnir (an identity scores its best enrolled image; ties count
    against the probe). Enrolled images with no face drop out of the gallery, and their identity's
    probes out of the known probes; probes with no face drop out."""
    gallery = [(identity, str(path)) for identity, path in split.gallery if has_face(str(path))]
    enrolled = sorted({identity for identity, _ in gallery})
    if not enrolled:
        notes.append("Identification was not measured: no enrolled image had a face.")
        return None
    column = {identity: n for n, identity in enumerate(enrolled)}

    def best_by_identity(probe: str) -> np.ndarray | None:
        row = np.full(len(enrolled), -np.inf)
        for identity, image in gallery:
            value = score(probe, image)
            if value is None:
                return None
            row[column[identity]] = max(row[column[identity]], value)
        return row

    known = [(identity, str(p)) for identity, p in split.known_probes if identity in column]
    known_rows = [(identity, best_by_identity(p)) for identity, p in known if has_face(p)]
    known_rows = [(identity, row) for identity, row in known_rows if row is not None]
    unknown_rows = [best_by_identity(str(p)) for _, p in split.unknown_probes if has_face(str(p))]
    unknown_rows = [row for row in unknown_rows if row is not None]
    dropped_enrolment = len(split.gallery) - len(gallery)
    lost_known = len(split.known_probes) - len(known)
    excluded = len(known) - len(known_rows) + len(split.unknown_probes) - len(unknown_rows)
    left_out = []
    if dropped_enrolment:
        left_out.append(f"{dropped_enrolment} enrolled image(s) with no face, and the {lost_known} probe(s) of "
                        "those identities")
    if excluded:
        left_out.append(f"{excluded} probe(s) with no face")
    if left_out:
        notes.append(f"Identification left out {' and '.join(left_out)}.")
    if not known_rows:
        notes.append("Identification was not measured: no known probe had a face.")
        return None

    true_columns = np.array([column[identity] for identity, _ in known_rows])
    matrix = np.stack([row for _, row in known_rows])
    true_scores = matrix[np.arange(len(known_rows)), true_columns]
    ranks = (matrix >= true_scores[:, None]).sum(axis=1)
    top_columns = np.argmax(matrix, axis=1)
    top_scores = matrix[np.arange(len(known_rows)), top_columns]
    correct = (top_columns == true_columns) & ((matrix >= top_scores[:, None]).sum(axis=1) == 1)
    unknown_top = np.array([row.max() for row in unknown_rows]) if unknown_rows else None

    open_set = [
        OpenSetRow(
            threshold=float(t),
            fpir=None if unknown_top is None else float(np.mean(unknown_top >= t)),
            fnir=float(np.mean(~(correct & (top_scores >= t)))),
        )
        for t in thresholds
    ]
    return IdentificationResults(
        rank1=float(np.mean(ranks <= 1)),
        rank5=float(np.mean(ranks <= 5)),
        n_gallery=len(gallery),
        n_known_probes=len(known_rows),
        n_unknown_probes=len(unknown_rows),
        open_set=open_set,
    )


def _no_face_found(
    plan: EvaluationPlan, collected: _Collected, identity_of: Mapping[str, str]
) -> tuple[NoFaceFound, list[str]]:
    processed = sorted(collected.images)
    missing = [path for path in processed if not _has_face(collected.images[path])]
    per_group: list[NoFaceGroupRow] = []
    if plan.group_labels:
        attributes = list(next(iter(plan.group_labels.values())))
        for attribute in attributes:
            counts: dict[str, list[int]] = {}
            for path in processed:
                group = plan.group_labels[identity_of[path]][attribute]
                entry = counts.setdefault(group, [0, 0])
                entry[0] += 1
                entry[1] += 0 if _has_face(collected.images[path]) else 1
            per_group.extend(
                NoFaceGroupRow(attribute=attribute, group=group, images=images, no_face=no_face)
                for group, (images, no_face) in sorted(counts.items())
            )
    unreadable = [collected.images[p] for p in missing if not collected.images[p].ok]
    notes = []
    if unreadable:
        shown = "; ".join(f"{o.path}: {o.reason}" for o in unreadable[:5])
        notes.append(
            f"{len(unreadable)} image(s) could not be read and count as 'no face found': {shown}"
            + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        )
    return NoFaceFound(images=len(processed), no_face=len(missing), per_group=per_group), notes


def _build_report(
    settings: Settings, plan: EvaluationPlan, collected: _Collected, weights_sha256: str | None
) -> tuple[EvaluationReport, Calibration]:
    from policy import effective_floor
    from scheduler.gate import load_policy

    if not collected.model_versions:
        raise EvaluationError("no worker reported a model version: nothing was compared")
    model_version = next(iter(collected.model_versions))
    untrained = True in collected.untrained
    identity_of = plan.identity_of
    notes = list(plan.notes)

    def score(first: str, second: str) -> float | None:
        return collected.similarity.get(_key(first, second))

    # Verification, on the protocol's pairs whose two images both had a face.
    kept = [(p, score(str(p.first), str(p.second))) for p in plan.pairs]
    valid = [(p, s) for p, s in kept if s is not None]
    if len(valid) < len(kept):
        notes.append(
            f"{len(kept) - len(valid)} of {len(kept)} verification pairs were left out because an image had no "
            "face found (or could not be read); the rates are over the remaining pairs."
        )
    scores = np.array([s for _, s in valid], dtype=np.float64)
    labels = np.array([1 if p.is_genuine else 0 for p, _ in valid], dtype=np.int64)
    if not labels.any() or labels.all():
        raise EvaluationError(
            f"after leaving out pairs with no face found, {int(labels.sum())} same-person and "
            f"{int((labels == 0).sum())} different-person pairs remain; both kinds are needed "
            f"({sum(1 for o in collected.images.values() if not _has_face(o))} of {len(collected.images)} "
            "images had no face)"
        )
    folds = None
    if all(p.fold is not None for p, _ in valid) and len({p.fold for p, _ in valid}) >= 2:
        folds = np.array([p.fold for p, _ in valid], dtype=np.int64)
    elif all(p.fold is not None for p in plan.pairs):
        notes.append("Cross-validated accuracy was not computed: the pairs form fewer than 2 folds.")
    verification = VerificationResults.from_scores(scores, labels, folds, DEFAULT_FAR_TARGETS)

    # Every comparison made (verification and identification pairs) feeds the calibration.
    all_keys = list(collected.similarity)
    all_scores = np.array([collected.similarity[k] for k in all_keys], dtype=np.float64)
    all_genuine = np.array([identity_of[a] == identity_of[b] for a, b in all_keys], dtype=bool)
    impostor_scores = all_scores[~all_genuine]
    genuine_scores = all_scores[all_genuine]
    calibration = Calibration.from_impostor_scores(
        impostor_scores,
        model_version=model_version,
        dataset=f"{plan.dataset.name} ({plan.dataset.root})",
        n_genuine=int(genuine_scores.size),
        weights_sha256=_weights_hash(model_version, weights_sha256, settings.weights_sha256),
    )

    def operating(name: str, threshold: float, source: str) -> OperatingThreshold:
        estimate = calibration.fmr_at(threshold)
        fnmr = float(np.mean(genuine_scores < threshold)) if genuine_scores.size else None
        return OperatingThreshold(name=name, threshold=threshold, fmr=estimate.fmr,
                                  fmr_below_resolution_limit=estimate.below_resolution_limit, fnmr=fnmr, source=source)

    calibration_source = (
        f"calibration on {plan.dataset.name}: {calibration.n_impostor} impostor and {calibration.n_genuine} "
        "genuine comparisons"
    )
    at_fmr: list[OperatingThreshold] = []
    for target in DEFAULT_FAR_TARGETS:
        try:
            at_fmr.append(operating(f"FMR {target:g}", calibration.threshold_for_fmr(target), calibration_source))
        except CalibrationError:
            notes.append(
                f"No operating threshold at FMR {target:g}: {calibration.n_impostor} impostor comparisons cannot "
                f"resolve it (at least {math.ceil(1 / target)} are needed)."
            )
    fallback: list[OperatingThreshold] = []
    if verification.fold_thresholds:
        fallback.append(operating("best accuracy (mean of the folds' thresholds)",
                                  float(np.mean(verification.fold_thresholds)), "verification folds"))

    registry = load_policy(settings)

    def calibrated(version: str, fmr: float) -> float | None:
        return calibration.threshold_for_fmr(fmr) if version == model_version else None

    floors: list[OperatingThreshold] = []
    for entry in registry.purposes:
        try:
            floor = effective_floor(entry.id, model_version, registry, calibrated)
        except ValueError:
            floor = None
        if floor is not None:
            source = f"policy registry {registry.content_hash[:12]}"
            floors.append(operating(f"purpose '{entry.id}' floor", floor, source))
    operating_thresholds = at_fmr + fallback + floors

    # Per group: FMR and FNMR at the thresholds of stated false-match rates (or the accuracy threshold).
    per_group: list[GroupTable] = []
    if plan.group_labels:
        group_thresholds = sorted({t.threshold for t in (at_fmr or fallback)})
        attributes = list(next(iter(plan.group_labels.values())))
        for attribute in attributes:
            pair_groups = [(plan.group_labels[identity_of[a]][attribute], plan.group_labels[identity_of[b]][attribute])
                           for a, b in all_keys]
            for threshold in group_thresholds:
                per_group.append(GroupTable.from_scores(attribute, all_scores, all_genuine.astype(np.int64),
                                                        pair_groups, threshold))
        if not group_thresholds:
            notes.append("Per-group error rates were not computed: no operating threshold could be measured.")
        else:
            notes.append(
                "Per-group error rates are over every comparison made (verification and identification pairs); "
                "impostor pairs of two people in different groups are reported as 'cross-group'."
            )

    identification = None
    if plan.split is not None:
        open_set_thresholds = sorted({t.threshold for t in operating_thresholds})
        identification = _identification(
            plan.split, score, lambda path: _has_face(collected.images.get(path)), open_set_thresholds, notes
        )

    no_face, no_face_notes = _no_face_found(plan, collected, identity_of)
    notes.extend(no_face_notes)
    notes.append(
        f"Error rates are measured on one dataset ({plan.dataset.name}); they hold for images like these and "
        "say little about other conditions (surveillance footage, low resolution, other populations)."
    )
    notes.append(
        f"With {calibration.n_impostor} impostor comparisons no false-match rate below "
        f"{calibration.resolution_limit:.3g} can be measured; lower rates need a larger reference set."
    )
    if not plan.group_labels:
        notes.append("No group labels were given: error rates per demographic group were not measured.")

    report = EvaluationReport(
        model_name=UNTRAINED_MODEL_NAME if untrained else _model_name(model_version),
        model_version=model_version,
        weights_sha256=calibration.weights_sha256,
        untrained=untrained,
        dataset=DatasetSummary(
            name=plan.dataset.name,
            root=str(plan.dataset.root),
            identities=len(plan.dataset.identities),
            images=len(plan.dataset.images),
            pairs=len(plan.pairs),
        ),
        verification=verification,
        identification=identification,
        per_group=per_group,
        no_face_found=no_face,
        operating_thresholds=operating_thresholds,
        known_limitations=list(dict.fromkeys(notes)),
        created_at=dt.datetime.now(dt.UTC),
    )
    return report, calibration
