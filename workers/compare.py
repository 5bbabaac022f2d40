"""Pair comparison for evaluation: a chunk of image pairs in, one cosine similarity per pair out.

Each distinct image of the chunk goes through the real pipeline once (decode, MTCNN detection, the
160x160 crop, the embedding); its most probable face stands for it. Only similarities and per-image
outcomes leave the worker: embeddings never cross the broker.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from facegate.messages import ChunkResult, CompareChunk, ItemOutcome, PairScore
from workers.chunks import _confined
from workers.pipeline import FacePipeline, ProgressCallback

__all__ = ["run_compare_chunk"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _why_no_vector(path: str, outcome: ItemOutcome | None) -> str:
    if outcome is None:  # cannot happen: every distinct path gets an outcome; said plainly if it does
        return f"{path}: not analysed"
    if not outcome.ok:
        return f"{path} failed: {outcome.reason}"
    return f"no face found in {path}"


def run_compare_chunk(message: CompareChunk, pipeline: FacePipeline, roots: Sequence[Path],
                      on_progress: ProgressCallback | None = None) -> ChunkResult:
    """Embed every distinct image of the pairs once and score each pair.

    The paths are confined to the gallery roots again here (a message on the broker is not trusted to
    come from the scheduler). `items` holds one outcome per distinct image (faces found, or why it
    failed); `scores` one entry per pair, in the message's order: the cosine similarity of the two
    images' most probable faces, or None with the reason (no face found, unreadable, outside the roots).
    """
    result = ChunkResult(job_id=message.job_id, chunk_no=message.chunk_no, kind="compare",
                         model_version=pipeline.model_version, untrained=pipeline.untrained, started_at=_now())
    distinct = list(dict.fromkeys(path for pair in message.pairs for path in pair))
    allowed, refused = _confined(distinct, roots)
    images, outcomes = pipeline.analyse(allowed, on_progress=on_progress)

    vectors: dict[str, np.ndarray] = {}  # path -> its faces' unit vectors (one row: its most probable face)
    for image in images:
        if image.faces:
            faces = range(len(image.faces)) if message.best_pair else [
                max(range(len(image.faces)), key=lambda n: image.faces[n].probability)]
            rows = np.asarray([image.embeddings[n] for n in faces], dtype=np.float64)
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            rows = rows[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
            if len(rows):
                vectors[image.path] = rows
    outcome_of = {outcome.path: outcome for outcome in [*refused, *outcomes]}

    scores: list[PairScore] = []
    for first, second in message.pairs:
        missing = [path for path in (first, second) if path not in vectors]
        if missing:
            reason = "; ".join(_why_no_vector(path, outcome_of.get(path)) for path in dict.fromkeys(missing))
            scores.append(PairScore(first=first, second=second, similarity=None, reason=reason))
        else:
            # The best pair of faces, one from each image (with best_pair off: the two most probable faces).
            pairs = vectors[first] @ vectors[second].T
            i, j = np.unravel_index(int(np.argmax(pairs)), pairs.shape)
            similarity = float(np.clip(pairs[i, j], -1.0, 1.0))
            scores.append(PairScore(first=first, second=second, similarity=similarity,
                                    faces=(int(i), int(j)) if message.best_pair else None))
    result.items = [outcome_of[path] for path in distinct]
    result.scores = scores
    result.finished_at = _now()
    return result
