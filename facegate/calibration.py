"""Similarity -> false-match rate, per model version.

A similarity threshold means nothing across models: 0.6 may be strict for one model and lax for
another. A calibration ties the numbers to one model version by measuring, on a reference set of
impostor pairs (two different people), the false-match rate FMR(t) = fraction of impostor scores >= t.
Policy floors and operating thresholds are then stated as "FMR 1e-3 for this model version", and
converted to a similarity with `threshold_for_fmr`.

With n impostor pairs, no FMR below 1/n can be observed (the resolution limit); asking for one raises
instead of returning a threshold that was never tested.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .files import write_text_atomically

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationPoint",
    "CalibrationStore",
    "FmrEstimate",
]

# Below this many false matches every distinct impostor score is a table row (this is the low-FMR end
# where operating thresholds live); above it rows are kept on a geometric FMR grid so that a
# calibration from millions of impostor pairs stays a small file.
EXACT_TAIL_MATCHES = 1000
GRID_RATIO = 1.01


class CalibrationKept(Exception):
    """A new calibration was not written: the one in force rests on more impostor pairs. The message
    says which, and how to replace it anyway."""


class CalibrationError(ValueError):
    """A calibration cannot answer the question asked, or its file is unusable; the message says why."""


class CalibrationPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    threshold: float  # similarity
    fmr: float  # fraction of impostor scores >= threshold


class FmrEstimate(NamedTuple):
    fmr: float
    # True when the similarity is above every impostor score seen: the FMR was 0 in the sample, which
    # only says it is below `fmr` (the resolution limit), not that it is zero.
    below_resolution_limit: bool


class Calibration(BaseModel):
    """One model version's similarity -> FMR table, measured on one dataset's impostor pairs."""

    model_config = ConfigDict(frozen=True)

    format_version: Literal[1] = 1
    model_version: str = Field(min_length=1)
    weights_sha256: str | None = None
    dataset: str
    n_impostor: int = Field(ge=1)
    n_genuine: int = Field(ge=0)
    created_at: dt.datetime
    # Who ran the evaluation ("organisation (key id)") and a sha256 over its dataset: the images' paths
    # relative to the dataset and their contents, and the pairs compared. Absent in older files.
    run_by: str | None = None
    dataset_fingerprint: str | None = None
    resolution_limit: float  # 1 / n_impostor: the smallest non-zero FMR the data can show
    max_impostor_score: float
    # Every distinct impostor score >= this is a row, so fmr_at is exact from here up; below it the
    # rows are thinned (see EXACT_TAIL_MATCHES).
    exact_from_threshold: float
    table: list[CalibrationPoint]  # thresholds ascending, FMR non-increasing

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if not self.table:
            raise ValueError("calibration table is empty")
        thresholds = [point.threshold for point in self.table]
        rates = [point.fmr for point in self.table]
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError("calibration table thresholds must be strictly increasing")
        if any(b > a for a, b in zip(rates, rates[1:])) or not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError("calibration table FMR must be in [0, 1] and never increase with the threshold")
        if not math.isclose(self.resolution_limit, 1.0 / self.n_impostor, rel_tol=1e-9):
            raise ValueError(f"resolution_limit must be 1 / n_impostor = {1.0 / self.n_impostor}")
        if thresholds[-1] != self.max_impostor_score:
            raise ValueError("the last table threshold must be the highest impostor score")
        return self

    @classmethod
    def from_impostor_scores(
        cls,
        impostor_scores: Sequence[float] | np.ndarray,
        *,
        model_version: str,
        dataset: str,
        n_genuine: int = 0,
        weights_sha256: str | None = None,
        created_at: dt.datetime | None = None,
    ) -> Calibration:
        scores = np.asarray(impostor_scores, dtype=np.float64).ravel()
        if scores.size == 0:
            raise CalibrationError("no impostor scores: a false-match rate needs impostor pairs")
        if not np.all(np.isfinite(scores)):
            raise CalibrationError("impostor scores contain NaN or infinite values")

        descending = np.sort(scores)[::-1]
        run_ends = np.nonzero(np.r_[np.diff(descending) != 0, True])[0]
        distinct = descending[run_ends]  # highest first
        matches = run_ends + 1  # impostor scores >= each distinct value
        grid_cell = np.floor(np.log(matches) / np.log(GRID_RATIO))
        keep = (matches <= EXACT_TAIL_MATCHES) | np.r_[True, grid_cell[1:] != grid_cell[:-1]]
        keep[-1] = True  # the lowest score, FMR 1
        first_dropped = np.nonzero(~keep)[0]
        exact_from = distinct[first_dropped[0] - 1] if first_dropped.size else distinct[-1]

        table = [
            CalibrationPoint(threshold=float(t), fmr=float(m) / scores.size)
            for t, m in zip(distinct[keep][::-1], matches[keep][::-1])
        ]
        return cls(
            model_version=model_version,
            weights_sha256=weights_sha256.strip().lower() if weights_sha256 else None,
            dataset=dataset,
            n_impostor=int(scores.size),
            n_genuine=n_genuine,
            created_at=created_at or dt.datetime.now(dt.UTC),
            resolution_limit=1.0 / scores.size,
            max_impostor_score=float(distinct[0]),
            exact_from_threshold=float(exact_from),
            table=table,
        )

    def threshold_for_fmr(self, target: float) -> float:
        """The smallest table threshold whose FMR <= target: accept `score >= threshold` and the false-
        match rate on the calibration set is at most `target`. Where the table is thinned (FMR above
        EXACT_TAIL_MATCHES / n_impostor) the answer may sit slightly above the exact one, never below.

        Raises CalibrationError when target < 1 / n_impostor: the calibration cannot tell such a rate
        from zero. When only "above every impostor score" meets the target (ties at the top), the
        result is the next float above the highest impostor score.
        """
        if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
            raise CalibrationError(f"FMR target must be a positive number, not {target!r}")
        if target < self.resolution_limit:
            needed = math.ceil(1.0 / target)
            raise CalibrationError(
                f"FMR target {target:g} is below the resolution limit {self.resolution_limit:.3g} of the "
                f"calibration for model version '{self.model_version}' on '{self.dataset}': "
                f"{self.n_impostor} impostor pairs cannot show a rate below 1/{self.n_impostor}. "
                f"Calibrate with at least {needed} impostor pairs to state FMR {target:g}."
            )
        for point in self.table:
            if point.fmr <= target:
                return point.threshold
        return float(np.nextafter(self.max_impostor_score, np.inf))

    def fmr_at(self, similarity: float) -> FmrEstimate:
        """The false-match rate at threshold `similarity`, by step interpolation of the table.

        Above the highest impostor score the sample had no false match: the answer is the resolution
        limit with `below_resolution_limit=True`, read "FMR < limit". From `exact_from_threshold` up
        the value is exact (the fraction of impostor scores >= similarity). Below it, where the table
        is thinned, it is the FMR of the nearest row at or below `similarity`: an upper bound, at most
        one grid step (about 1%) high.
        """
        if not math.isfinite(similarity):
            raise CalibrationError(f"similarity must be a finite number, not {similarity!r}")
        if similarity > self.max_impostor_score:
            return FmrEstimate(fmr=self.resolution_limit, below_resolution_limit=True)
        thresholds = [point.threshold for point in self.table]
        if similarity >= self.exact_from_threshold:
            row = bisect.bisect_left(thresholds, similarity)  # the first row >= similarity
        else:
            row = max(bisect.bisect_right(thresholds, similarity) - 1, 0)  # the last row <= similarity
        return FmrEstimate(fmr=self.table[row].fmr, below_resolution_limit=False)

    def save(self, path: str | Path) -> Path:
        return write_text_atomically(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        file_path = Path(path).expanduser()
        try:
            return cls.model_validate_json(file_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {file_path} does not exist") from None
        except ValidationError as problem:
            raise CalibrationError(f"calibration file {file_path} is not a valid calibration: {problem}") from None


class CalibrationStore:
    """A folder of calibration files, one per model version."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()

    def path_for(self, model_version: str) -> Path:
        """A file name that is safe whatever the version string holds ("/", "..", ":"): the readable
        part keeps letters, digits, "-" and "_", and a hash of the exact version keeps two versions
        that read the same apart ("a/b" and "a_b")."""
        if not model_version:
            raise CalibrationError("model version must not be empty")
        readable = re.sub(r"[^A-Za-z0-9_-]+", "_", model_version).strip("_-")[:80] or "model"
        digest = hashlib.sha256(model_version.encode("utf-8")).hexdigest()[:12]
        return self.directory / f"{readable}-{digest}.json"

    def get(self, model_version: str) -> Calibration | None:
        path = self.path_for(model_version)
        if not path.is_file():
            return None
        calibration = Calibration.load(path)
        if calibration.model_version != model_version:
            raise CalibrationError(
                f"{path} holds the calibration of model version '{calibration.model_version}', "
                f"not '{model_version}'"
            )
        return calibration

    def put(self, calibration: Calibration, *, replace: bool = False) -> Path:
        """Write it as the model version's calibration, unless the one in force has more impostor pairs:
        less evidence never replaces more without `replace` (CalibrationKept says why)."""
        try:
            current = self.get(calibration.model_version)
        except CalibrationError:
            current = None  # unreadable: the new one replaces it
        if current is not None and calibration.n_impostor < current.n_impostor and not replace:
            raise CalibrationKept(
                f"the calibration in force for {calibration.model_version} was kept: it rests on "
                f"{current.n_impostor} impostor pairs ({current.dataset}, {current.created_at:%Y-%m-%d %H:%M} UTC"
                + (f", run by {current.run_by}" if current.run_by else "") + f"), this run on only "
                f"{calibration.n_impostor}; pass --replace-calibration to replace it with less evidence")
        return calibration.save(self.path_for(calibration.model_version))


def calibrated_threshold_lookup(directory: str | Path) -> Callable[[str, float], float | None]:
    """The `threshold_for_fmr` callable for `policy.check_threshold`: (model_version, fmr) -> the calibrated
    similarity threshold, None when that version has no calibration; raises CalibrationError (a ValueError)
    when the calibration cannot state so low a rate. Reads the file at each call, so a new calibration
    takes effect for the next decision."""
    store = CalibrationStore(directory)

    def threshold_for_fmr(model_version: str, fmr: float) -> float | None:
        calibration = store.get(model_version)
        return None if calibration is None else calibration.threshold_for_fmr(fmr)

    return threshold_for_fmr
