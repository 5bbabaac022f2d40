"""Verification, identification and per-group error metrics, on numpy arrays (ROC and AUC from scikit-learn).

Conventions throughout: a score is a similarity (higher = more alike, cosine for this project's unit
vectors); label 1 marks a genuine pair (same person), 0 an impostor pair; a pair is accepted as a match
when `score >= threshold`. FAR/FMR are the fraction of impostor pairs accepted, TAR the fraction of
genuine pairs accepted, FNMR = 1 - TAR.

A rate is only stated when the data can resolve it: with n impostor pairs nothing below 1/n can be
measured, so such targets come back as None rather than as an invented number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, TypedDict

import numpy as np
from sklearn.metrics import auc as sklearn_auc
from sklearn.metrics import roc_curve

__all__ = [
    "CROSS_GROUP",
    "FmrRatio",
    "FoldedAccuracy",
    "GroupRates",
    "OpenSetRates",
    "OperatingPoint",
    "auc",
    "fpir_fnir",
    "group_error_rates",
    "lfw_10fold_accuracy",
    "rank_k",
    "roc",
    "tar_at_far",
    "worst_to_best_fmr_ratio",
]

# Key under which impostor pairs whose two identities belong to different groups are reported.
CROSS_GROUP = "cross-group"


class OperatingPoint(NamedTuple):
    """The best true-accept rate reachable at a false-accept target, and the threshold that gives it."""

    tar: float
    threshold: float


class FoldedAccuracy(NamedTuple):
    """Cross-validated verification accuracy (the LFW protocol)."""

    mean: float
    std: float
    thresholds: list[float]  # the threshold chosen for each fold, in fold order


class OpenSetRates(NamedTuple):
    """Open-set identification error rates at one threshold; None when there were no probes of that kind."""

    fpir: float | None
    fnir: float | None


class GroupRates(TypedDict):
    fmr: float | None  # None when the group has no impostor pairs
    fnmr: float | None  # None when the group has no genuine pairs
    n_genuine: int
    n_impostor: int


class FmrRatio(NamedTuple):
    """Worst group's false-match rate over the best group's, with a sentence saying how to read it."""

    ratio: float | None  # inf when the best group had no false matches but another did
    worst_group: str | None
    best_group: str | None
    explanation: str


# Verification ------------------------------------------------------------------------------------


def _scores_and_labels(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray):
    scores_array = np.asarray(scores, dtype=np.float64).ravel()
    labels_array = np.asarray(labels).ravel()
    if scores_array.shape != labels_array.shape:
        raise ValueError(f"scores ({scores_array.size}) and labels ({labels_array.size}) differ in length")
    if scores_array.size == 0:
        raise ValueError("no scores given")
    if not np.all(np.isfinite(scores_array)):
        raise ValueError("scores contain NaN or infinite values")
    if not np.all(np.isin(labels_array, (0, 1))):
        raise ValueError("labels must be 1 (genuine) or 0 (impostor)")
    return scores_array, labels_array.astype(np.int64)


def _require_both_classes(labels: np.ndarray) -> None:
    if not labels.any():
        raise ValueError("no genuine pairs (label 1): true-accept rates cannot be measured")
    if labels.all():
        raise ValueError("no impostor pairs (label 0): false-accept rates cannot be measured")


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score from the highest down, after a first point
    at threshold +inf where nothing is accepted; tied scores make one point, since a threshold accepts
    all of them or none. sklearn.metrics.roc_curve with drop_intermediate=False: every point is kept
    because the low-FAR corner is exactly where operating thresholds are chosen."""
    scores_array, labels_array = _scores_and_labels(scores, labels)
    _require_both_classes(labels_array)
    fpr, tpr, thresholds = roc_curve(labels_array, scores_array, drop_intermediate=False)
    return fpr, tpr, thresholds


def auc(x, y) -> float:
    """Area under a curve by the trapezoidal rule (sklearn.metrics.auc): x must be monotone."""
    x_array = np.asarray(x, dtype=np.float64).ravel()
    y_array = np.asarray(y, dtype=np.float64).ravel()
    if x_array.shape != y_array.shape:
        raise ValueError(f"x ({x_array.size}) and y ({y_array.size}) differ in length")
    if x_array.size < 2:
        raise ValueError("at least 2 points are needed to compute an area under a curve")
    return float(sklearn_auc(x_array, y_array))


def tar_at_far(scores, labels, far_targets: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> dict[float, OperatingPoint | None]:
    """For each FAR target: the largest TAR whose FAR <= target, and its threshold.

    A target is None when the impostor pairs cannot resolve it (1 / n_impostor > target): one false
    accept would already exceed it, so any number reported there would be invented. Among thresholds
    giving the same TAR the highest (lowest FAR) is returned. When even the highest score cannot be
    accepted within the target (tied impostors at the top), the threshold is the next float above the
    highest score, with TAR 0.
    """
    scores_array, labels_array = _scores_and_labels(scores, labels)
    fpr, tpr, thresholds = roc(scores_array, labels_array)
    n_impostor = int((labels_array == 0).sum())
    above_every_score = float(np.nextafter(scores_array.max(), np.inf))

    results: dict[float, OperatingPoint | None] = {}
    for target in far_targets:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"FAR target {target!r} is not in (0, 1]")
        if 1.0 / n_impostor > target:
            results[target] = None
            continue
        within = np.nonzero(fpr <= target)[0]  # never empty: the +inf point has FAR 0
        best = within[np.argmax(tpr[within])]  # first maximum: the highest threshold reaching that TAR
        threshold = float(thresholds[best]) if best > 0 else above_every_score
        results[target] = OperatingPoint(tar=float(tpr[best]), threshold=threshold)
    return results


def _best_accuracy_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising accuracy on these pairs. Between two consecutive distinct scores every
    threshold does equally well on them, so the midpoint is taken (it generalises best to unseen
    pairs); ties between cuts go to the highest threshold."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    run_ends = np.nonzero(np.r_[np.diff(sorted_scores) != 0, True])[0]
    distinct = sorted_scores[run_ends]
    # Cut c accepts the c highest distinct values (c = 0: nothing accepted).
    genuine_accepted = np.r_[0, np.cumsum(sorted_labels)[run_ends]]
    impostor_accepted = np.r_[0, run_ends + 1 - np.cumsum(sorted_labels)[run_ends]]
    n_impostor = int((labels == 0).sum())
    correct = genuine_accepted + (n_impostor - impostor_accepted)
    cut = int(np.argmax(correct))
    if cut == 0:
        return float(np.nextafter(distinct[0], np.inf))
    if cut == distinct.size:
        return float(distinct[-1])
    return float((distinct[cut - 1] + distinct[cut]) / 2.0)


def lfw_10fold_accuracy(scores, labels, folds) -> FoldedAccuracy:
    """The LFW protocol: for each fold, pick the threshold maximising accuracy on all the other folds
    and measure accuracy on this fold with it. Returns mean and (population) std of the per-fold
    accuracies and the per-fold thresholds. Works for any number of folds >= 2, not only 10."""
    scores_array, labels_array = _scores_and_labels(scores, labels)
    fold_array = np.asarray(folds).ravel()
    if fold_array.shape != scores_array.shape:
        raise ValueError(f"folds ({fold_array.size}) and scores ({scores_array.size}) differ in length")
    fold_ids = np.unique(fold_array)
    if fold_ids.size < 2:
        raise ValueError(f"cross-validated accuracy needs at least 2 folds; these pairs have {fold_ids.size}")

    accuracies: list[float] = []
    thresholds: list[float] = []
    for fold in fold_ids:
        held_out = fold_array == fold
        threshold = _best_accuracy_threshold(scores_array[~held_out], labels_array[~held_out])
        predicted = scores_array[held_out] >= threshold
        accuracies.append(float(np.mean(predicted == (labels_array[held_out] == 1))))
        thresholds.append(threshold)
    return FoldedAccuracy(mean=float(np.mean(accuracies)), std=float(np.std(accuracies)), thresholds=thresholds)


# Identification ----------------------------------------------------------------------------------


def _unit_rows(vectors, what: str) -> np.ndarray:
    array = np.asarray(vectors, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (one vector per row)")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what} contains an all-zero vector, which has no direction")
    # Renormalising costs little and makes the dot product a cosine even for slightly drifted vectors.
    return array / norms


def _identity_similarities(gallery_vecs, gallery_ids, probe_vecs, what: str) -> tuple[np.ndarray, list[str]]:
    """(probes x gallery identities) cosine similarity, one column per distinct gallery identity: an
    identity enrolled with several images scores its best-matching image."""
    gallery = _unit_rows(gallery_vecs, "gallery vectors")
    probes = _unit_rows(probe_vecs, what)
    if gallery.shape[1] != probes.shape[1]:
        raise ValueError(f"gallery vectors have {gallery.shape[1]} dimensions, {what} {probes.shape[1]}")
    gallery_id_list = [str(i) for i in gallery_ids]
    if len(gallery_id_list) != gallery.shape[0]:
        raise ValueError(f"{len(gallery_id_list)} gallery ids for {gallery.shape[0]} gallery vectors")
    identities = sorted(set(gallery_id_list))
    column_of = {identity: column for column, identity in enumerate(identities)}
    image_similarities = probes @ gallery.T
    by_identity = np.full((probes.shape[0], len(identities)), -np.inf)
    for image_column, identity in enumerate(gallery_id_list):
        column = column_of[identity]
        by_identity[:, column] = np.maximum(by_identity[:, column], image_similarities[:, image_column])
    return by_identity, identities


def rank_k(gallery_vecs, gallery_ids, probe_vecs, probe_ids, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Closed-set identification: the fraction of probes whose true identity is among the k most
    similar gallery identities. Ties count against the probe (an identity scoring equal to the true
    one ranks ahead of it), so a degenerate model cannot score well by giving everyone the same score.
    Every probe identity must be enrolled; unknown probes belong to `fpir_fnir`."""
    similarities, identities = _identity_similarities(gallery_vecs, gallery_ids, probe_vecs, "probe vectors")
    probe_id_list = [str(i) for i in probe_ids]
    if len(probe_id_list) != similarities.shape[0]:
        raise ValueError(f"{len(probe_id_list)} probe ids for {similarities.shape[0]} probe vectors")
    column_of = {identity: column for column, identity in enumerate(identities)}
    not_enrolled = sorted({i for i in probe_id_list if i not in column_of})
    if not_enrolled:
        raise ValueError(f"probe identities not in the gallery (use fpir_fnir for those): {not_enrolled[:10]}")

    true_columns = np.array([column_of[i] for i in probe_id_list])
    true_scores = similarities[np.arange(len(probe_id_list)), true_columns]
    # Rank = 1 + the number of other identities scoring at least as high as the true one.
    ranks = (similarities >= true_scores[:, None]).sum(axis=1)
    results: dict[int, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"rank k must be >= 1, not {k}")
        results[k] = float(np.mean(ranks <= k))
    return results


def fpir_fnir(
    gallery_vecs,
    gallery_ids,
    known_probe_vecs,
    known_probe_ids,
    unknown_probe_vecs,
    thresholds: Sequence[float],
) -> dict[float, OpenSetRates]:
    """Open-set identification at each threshold, at rank 1 (NIST FRVT definitions with R = 1):

    - FPIR: fraction of unknown probes (identity not enrolled) whose top-1 similarity >= threshold,
      i.e. someone who is not in the gallery is returned as a candidate;
    - FNIR: fraction of known probes that do not come back correctly, i.e. the top-1 identity is not
      theirs or its similarity is below the threshold.

    Either set of probes may be empty (pass an empty sequence); its rate is then None.
    """
    known_count = len(known_probe_ids)
    unknown_count = 0 if unknown_probe_vecs is None else len(unknown_probe_vecs)
    if known_count == 0 and unknown_count == 0:
        raise ValueError("no probes given: need known probes, unknown probes, or both")

    known_top_scores = known_correct = unknown_top_scores = None
    if known_count:
        similarities, identities = _identity_similarities(
            gallery_vecs, gallery_ids, known_probe_vecs, "known probe vectors"
        )
        probe_id_list = [str(i) for i in known_probe_ids]
        if len(probe_id_list) != similarities.shape[0]:
            raise ValueError(f"{len(probe_id_list)} known probe ids for {similarities.shape[0]} vectors")
        not_enrolled = sorted(set(probe_id_list) - set(identities))
        if not_enrolled:
            raise ValueError(f"known probe identities not in the gallery: {not_enrolled[:10]}")
        top_columns = np.argmax(similarities, axis=1)
        known_top_scores = similarities[np.arange(known_count), top_columns]
        column_of = {identity: column for column, identity in enumerate(identities)}
        true_columns = np.array([column_of[i] for i in probe_id_list])
        # A tie at the top with another identity is not a correct top-1 answer.
        tied_at_top = (similarities >= known_top_scores[:, None]).sum(axis=1) > 1
        known_correct = (top_columns == true_columns) & ~tied_at_top
    if unknown_count:
        similarities, _ = _identity_similarities(gallery_vecs, gallery_ids, unknown_probe_vecs, "unknown probe vectors")
        unknown_top_scores = similarities.max(axis=1)

    results: dict[float, OpenSetRates] = {}
    for threshold in thresholds:
        fpir = None if unknown_top_scores is None else float(np.mean(unknown_top_scores >= threshold))
        fnir = None
        if known_top_scores is not None:
            fnir = float(np.mean(~(known_correct & (known_top_scores >= threshold))))
        results[float(threshold)] = OpenSetRates(fpir=fpir, fnir=fnir)
    return results


# Per group ---------------------------------------------------------------------------------------


def group_error_rates(
    scores, labels, pair_groups: Sequence[tuple[str, str]], threshold: float
) -> dict[str, GroupRates]:
    """False-match and false-non-match rates at `threshold`, per group of one attribute.

    `pair_groups[i]` is the (first, second) group value of pair i's two identities. A pair counts for a
    group when both identities share that value; impostor pairs across two groups are reported under
    CROSS_GROUP. A genuine pair is one person, so its two values must agree (anything else is a
    labelling bug and raises).
    """
    scores_array, labels_array = _scores_and_labels(scores, labels)
    if len(pair_groups) != scores_array.size:
        raise ValueError(f"pair_groups ({len(pair_groups)}) and scores ({scores_array.size}) differ in length")

    keys: list[str] = []
    for index, (first, second) in enumerate(pair_groups):
        if first == second:
            keys.append(str(first))
        elif labels_array[index] == 1:
            raise ValueError(
                f"genuine pair {index} has two different group values ({first!r}, {second!r}); "
                "group labels belong to an identity, so both images of a person share them"
            )
        else:
            keys.append(CROSS_GROUP)
    key_array = np.array(keys, dtype=object)
    accepted = scores_array >= threshold

    results: dict[str, GroupRates] = {}
    for key in sorted(set(keys), key=lambda k: (k == CROSS_GROUP, k)):
        in_group = key_array == key
        genuine = in_group & (labels_array == 1)
        impostor = in_group & (labels_array == 0)
        n_genuine, n_impostor = int(genuine.sum()), int(impostor.sum())
        results[key] = GroupRates(
            fmr=float(accepted[impostor].mean()) if n_impostor else None,
            fnmr=float((~accepted[genuine]).mean()) if n_genuine else None,
            n_genuine=n_genuine,
            n_impostor=n_impostor,
        )
    return results


def worst_to_best_fmr_ratio(group_rates: Mapping[str, GroupRates]) -> FmrRatio:
    """Highest group FMR over lowest, across groups with impostor pairs (CROSS_GROUP is not a group and
    is left out). When the best group had no false matches the ratio is unbounded: it comes back as inf
    if another group had some, None if no group had any, and the explanation gives the lower bound
    implied by the best group's resolution limit (1 / its impostor pairs)."""
    measured = {
        group: rates
        for group, rates in group_rates.items()
        if group != CROSS_GROUP and rates["fmr"] is not None
    }
    if len(measured) < 2:
        return FmrRatio(
            ratio=None,
            worst_group=None,
            best_group=None,
            explanation=f"Needs at least two groups with impostor pairs; found {len(measured)}.",
        )
    worst = max(measured, key=lambda g: (measured[g]["fmr"], g))
    best = min(measured, key=lambda g: (measured[g]["fmr"], g))
    worst_fmr, best_fmr = measured[worst]["fmr"], measured[best]["fmr"]
    best_impostors = measured[best]["n_impostor"]

    if best_fmr > 0:
        ratio = worst_fmr / best_fmr
        return FmrRatio(
            ratio=ratio,
            worst_group=worst,
            best_group=best,
            explanation=(
                f"Group '{worst}' has {ratio:.3g} times the false-match rate of group '{best}' "
                f"({worst_fmr:.3g} vs {best_fmr:.3g})."
            ),
        )
    if worst_fmr == 0:
        return FmrRatio(
            ratio=None,
            worst_group=worst,
            best_group=best,
            explanation=(
                "No group had a false match at this threshold, so the ratio is undefined; each group's "
                "FMR is only known to be below its resolution limit: "
                + ", ".join(f"'{g}' < {1 / r['n_impostor']:.3g}" for g, r in sorted(measured.items()))
                + "."
            ),
        )
    times_limit = worst_fmr * best_impostors
    return FmrRatio(
        ratio=float("inf"),
        worst_group=worst,
        best_group=best,
        explanation=(
            f"Group '{best}' had no false match in {best_impostors} impostor pairs (FMR < "
            f"{1 / best_impostors:.3g}), so the ratio is unbounded; group '{worst}' has FMR "
            f"{worst_fmr:.3g}, {times_limit:.3g} times the best group's resolution limit. "
            "More impostor pairs for the best group would bound it."
        ),
    )
