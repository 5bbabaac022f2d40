"""evaluation.metrics: hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import metrics
from evaluation.metrics import CROSS_GROUP


def _random_case(seed: int, n: int, decimals: int | None = None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]  # both classes present
    scores = rng.normal(size=n) + labels  # genuine pairs score higher on average
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    return scores.astype(dtype), labels


# ROC and AUC (scikit-learn's, behind this module's input checks) on cases worked out by hand ----------


def test_roc_on_a_hand_worked_case_with_a_tie():
    # Sorted by score: 0.9 genuine, then a tie at 0.8 (one genuine, one impostor), then 0.3 impostor.
    fpr, tpr, thresholds = metrics.roc([0.3, 0.8, 0.9, 0.8], [0, 1, 1, 0])
    assert thresholds[0] == np.inf and list(thresholds[1:]) == [0.9, 0.8, 0.3]
    assert list(fpr) == [0.0, 0.0, 0.5, 1.0]  # the tied pair is accepted together or not at all
    assert list(tpr) == [0.0, 0.5, 1.0, 1.0]
    assert metrics.auc(fpr, tpr) == pytest.approx(0.875)  # 0.5 * (0.5 + 1) / 2 + 0.5 * 1


def test_roc_keeps_every_point():
    # drop_intermediate=False: collinear points stay, the low-FAR corner keeps all its thresholds.
    scores = np.arange(10, dtype=np.float64)
    labels = np.array([0] * 5 + [1] * 5)
    fpr, tpr, thresholds = metrics.roc(scores, labels)
    assert len(thresholds) == 11
    assert list(tpr[:6]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and metrics.auc(fpr, tpr) == 1.0


def test_roc_with_every_score_tied():
    scores = np.full(10, 0.3)
    labels = np.array([0, 1] * 5)
    fpr, tpr, _ = metrics.roc(scores, labels)
    assert list(fpr) == [0.0, 1.0] and list(tpr) == [0.0, 1.0]
    assert metrics.auc(fpr, tpr) == pytest.approx(0.5)


def test_auc_for_decreasing_x_and_refusals():
    x = np.array([1.0, 0.7, 0.7, 0.2, 0.0])
    y = np.array([1.0, 0.9, 0.5, 0.4, 0.0])
    expected = 0.3 * (1.0 + 0.9) / 2 + 0.5 * (0.5 + 0.4) / 2 + 0.2 * (0.4 + 0.0) / 2
    assert metrics.auc(x, y) == pytest.approx(expected)
    with pytest.raises(ValueError, match="neither increasing nor decreasing"):
        metrics.auc([0.0, 1.0, 0.5], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.auc([0.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc([0.1, float("nan")], [0, 1])


def test_roc_refuses_a_single_class():
    with pytest.raises(ValueError, match="no impostor pairs"):
        metrics.roc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="no genuine pairs"):
        metrics.roc([0.1, 0.2], [0, 0])


# TAR at FAR --------------------------------------------------------------------------------------


def _constructed_case():
    impostor = np.arange(100) / 100  # 0.00 .. 0.99, so FAR(t) = impostors >= t over 100
    genuine = np.array([0.995, 0.992, 0.985, 0.5, 0.2])
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(5, int), np.zeros(100, int)]
    return scores, labels


def test_tar_at_far_known_answer():
    scores, labels = _constructed_case()
    result = metrics.tar_at_far(scores, labels, far_targets=(1e-2, 5e-2, 1e-3))
    # FAR <= 1%: one impostor (0.99) may be accepted; threshold 0.985 accepts it and 3 of 5 genuine.
    assert result[1e-2] == (pytest.approx(0.6), 0.985)
    # FAR <= 5% reaches no more genuine pairs; the highest threshold giving TAR 0.6 is kept.
    assert result[5e-2].tar == pytest.approx(0.6)
    assert result[5e-2].threshold == 0.985
    # 100 impostor pairs cannot resolve 0.1%.
    assert result[1e-3] is None


def test_tar_at_far_matches_brute_force_on_random_scores():
    scores, labels = _random_case(seed=3, n=2000, decimals=2)
    for target, point in metrics.tar_at_far(scores, labels, far_targets=(1e-2, 1e-1)).items():
        genuine, impostor = scores[labels == 1], scores[labels == 0]
        best = max(
            (np.mean(genuine >= t), t) for t in np.unique(scores) if np.mean(impostor >= t) <= target
        )
        assert point.tar == pytest.approx(best[0])
        assert np.mean(impostor >= point.threshold) <= target


def test_tar_at_far_tied_impostors_at_the_top():
    # Two impostors tie at the highest score: accepting it would give FAR 2% > 1%, so nothing is accepted.
    scores = np.r_[[0.99, 0.99], np.linspace(0, 0.5, 98), [0.9]]
    labels = np.r_[np.zeros(100, int), [1]]
    point = metrics.tar_at_far(scores, labels, far_targets=(1e-2,))[1e-2]
    assert point.tar == 0.0
    assert point.threshold > 0.99 and math.isfinite(point.threshold)


# LFW 10-fold accuracy ----------------------------------------------------------------------------


def test_lfw_accuracy_perfectly_separable_is_one():
    rng = np.random.default_rng(0)
    genuine = rng.uniform(0.6, 1.0, 3000)
    impostor = rng.uniform(-0.2, 0.4, 3000)
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(3000, int), np.zeros(3000, int)]
    folds = np.r_[np.arange(3000) % 10, np.arange(3000) % 10]
    mean, std, thresholds = metrics.lfw_10fold_accuracy(scores, labels, folds)
    assert mean == 1.0 and std == 0.0
    assert len(thresholds) == 10
    assert all(0.4 < t < 0.6 for t in thresholds)


def test_lfw_accuracy_random_scores_is_near_chance():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, 6000)
    labels = np.r_[np.ones(3000, int), np.zeros(3000, int)]
    folds = np.arange(6000) % 10
    result = metrics.lfw_10fold_accuracy(scores, labels, folds)
    assert abs(result.mean - 0.5) < 0.05


def test_lfw_accuracy_needs_two_folds():
    with pytest.raises(ValueError, match="at least 2 folds"):
        metrics.lfw_10fold_accuracy([0.1, 0.9], [0, 1], [0, 0])


# Identification ----------------------------------------------------------------------------------


def _basis(dimension: int, index: int) -> np.ndarray:
    vector = np.zeros(dimension)
    vector[index] = 1.0
    return vector


def test_rank_k_known_ranks():
    gallery = np.eye(6)
    gallery_ids = [f"g{i}" for i in range(6)]
    probes = np.array(
        [
            _basis(6, 0) + 0.1 * _basis(6, 1),  # true g0, ranks first
            [0.9, 0.5, 0, 0, 0, 0],  # true g1, g0 is closer: rank 2
            [6, 5, 4, 3, 2, 1],  # true g5, the least similar of six: rank 6
        ]
    )
    probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    result = metrics.rank_k(gallery, gallery_ids, probes, ["g0", "g1", "g5"], ks=(1, 2, 5, 6))
    assert result == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: pytest.approx(2 / 3), 6: 1.0}


def test_rank_k_ties_count_against_the_probe_and_best_image_counts():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    gallery_ids = ["a", "b", "a"]  # "a" is enrolled twice; its best image counts
    tied = np.array([[1.0, 1.0]]) / np.sqrt(2)  # equally similar to a and b
    assert metrics.rank_k(gallery, gallery_ids, tied, ["a"], ks=(1, 2)) == {1: 0.0, 2: 1.0}
    with pytest.raises(ValueError, match="not in the gallery"):
        metrics.rank_k(gallery, gallery_ids, tied, ["z"])


def test_fpir_fnir_known_answers():
    gallery = np.eye(4)[:3]  # g0, g1, g2 enrolled; the fourth direction belongs to nobody enrolled
    gallery_ids = ["g0", "g1", "g2"]
    known = np.array([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0.8, 0, 0.6, 0]])
    known_ids = ["g0", "g1", "g2"]  # top-1: g0 at 1.0 (right), g1 at 0.8 (right), g0 at 0.8 (wrong)
    unknown = np.array([[0, 0, 0, 1.0], [0.9, 0, 0, np.sqrt(1 - 0.81)]])  # top-1 scores 0.0 and 0.9
    result = metrics.fpir_fnir(gallery, gallery_ids, known, known_ids, unknown, thresholds=[0.5, 0.85, 0.95])
    assert result[0.5].fpir == pytest.approx(0.5)
    assert result[0.5].fnir == pytest.approx(1 / 3)
    assert result[0.85].fpir == pytest.approx(0.5)
    assert result[0.85].fnir == pytest.approx(2 / 3)
    assert result[0.95].fpir == 0.0
    assert result[0.95].fnir == pytest.approx(2 / 3)

    without_unknowns = metrics.fpir_fnir(gallery, gallery_ids, known, known_ids, [], thresholds=[0.5])
    assert without_unknowns[0.5].fpir is None
    assert without_unknowns[0.5].fnir == pytest.approx(1 / 3)


# Per group ---------------------------------------------------------------------------------------


def _group_case(b_impostor_scores=(0.1, 0.2)):
    rows = [
        # (score, label, groups)
        (0.9, 1, ("A", "A")),
        (0.4, 1, ("A", "A")),
        (0.8, 1, ("B", "B")),
        (0.7, 1, ("B", "B")),
        (0.6, 0, ("A", "A")),
        (0.1, 0, ("A", "A")),
        (0.2, 0, ("A", "A")),
        (0.3, 0, ("A", "A")),
        *[(s, 0, ("B", "B")) for s in b_impostor_scores],
        (0.7, 0, ("A", "B")),
        (0.1, 0, ("B", "A")),
    ]
    scores, labels, groups = zip(*rows)
    return np.array(scores), np.array(labels), list(groups)


def test_group_error_rates_hand_made():
    scores, labels, groups = _group_case()
    rates = metrics.group_error_rates(scores, labels, groups, threshold=0.5)
    assert rates["A"] == {"fmr": 0.25, "fnmr": 0.5, "n_genuine": 2, "n_impostor": 4}
    assert rates["B"] == {"fmr": 0.0, "fnmr": 0.0, "n_genuine": 2, "n_impostor": 2}
    assert rates[CROSS_GROUP] == {"fmr": 0.5, "fnmr": None, "n_genuine": 0, "n_impostor": 2}
    assert list(rates) == ["A", "B", CROSS_GROUP]


def test_worst_to_best_ratio_when_best_group_has_no_false_match():
    scores, labels, groups = _group_case()
    ratio = metrics.worst_to_best_fmr_ratio(metrics.group_error_rates(scores, labels, groups, 0.5))
    assert ratio.ratio == math.inf
    assert (ratio.worst_group, ratio.best_group) == ("A", "B")
    assert "no false match in 2 impostor pairs" in ratio.explanation
    assert "unbounded" in ratio.explanation


def test_worst_to_best_ratio_finite_and_undefined():
    scores, labels, groups = _group_case(b_impostor_scores=(0.1, 0.2, 0.3, 0.4, 0.55, 0.1, 0.1, 0.1))
    ratio = metrics.worst_to_best_fmr_ratio(metrics.group_error_rates(scores, labels, groups, 0.5))
    assert ratio.ratio == pytest.approx(0.25 / 0.125)  # cross-group (FMR 0.5) is not a group
    assert (ratio.worst_group, ratio.best_group) == ("A", "B")

    nothing_matches = metrics.worst_to_best_fmr_ratio(metrics.group_error_rates(scores, labels, groups, 0.99))
    assert nothing_matches.ratio is None
    assert "undefined" in nothing_matches.explanation


def test_group_error_rates_rejects_a_genuine_pair_across_groups():
    with pytest.raises(ValueError, match="genuine pair 0"):
        metrics.group_error_rates([0.9, 0.1], [1, 0], [("A", "B"), ("A", "B")], 0.5)
