"""Accuracy you can state: verification and identification metrics, per-group error rates and reports, as a scheduler client.

A similarity number means nothing until it is tied to a false-match rate for the model that produced
it. This package takes embeddings (or pair scores) and labels as arrays, measures accuracy, calibrates
similarity -> false-match rate per model version, and writes reports. It never runs the face
pipeline and never opens an image: `dataset` deals in paths and identities, `metrics` in numpy arrays.

Modules:
- dataset: identity folders (LFW layout), LFW pairs files, generated pairs, group labels, the
  gallery/probe split for identification.
- metrics: ROC/AUC, TAR at FAR, LFW 10-fold accuracy, rank-k, FPIR/FNIR, per-group FMR/FNMR.
- calibration: the tables live in `facegate.calibration` (both gates read them); the runner writes them.
- report: EvaluationReport (JSON, self-contained HTML) and the accountability report (Markdown).
"""

from facegate.calibration import Calibration, CalibrationError, CalibrationStore, FmrEstimate
from .dataset import (
    Dataset,
    DatasetError,
    IdentificationSplit,
    Pair,
    gallery_probe_split,
    generate_pairs,
    pair_folds,
    pair_group_values,
    pair_labels,
    read_group_labels,
    read_pairs_file,
    scan_identity_folders,
)
from .metrics import (
    auc,
    fpir_fnir,
    group_error_rates,
    lfw_10fold_accuracy,
    rank_k,
    roc,
    tar_at_far,
    worst_to_best_fmr_ratio,
)
from .report import EvaluationReport, accountability_report

__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationStore",
    "Dataset",
    "DatasetError",
    "EvaluationReport",
    "FmrEstimate",
    "IdentificationSplit",
    "Pair",
    "accountability_report",
    "auc",
    "fpir_fnir",
    "gallery_probe_split",
    "generate_pairs",
    "group_error_rates",
    "lfw_10fold_accuracy",
    "pair_folds",
    "pair_group_values",
    "pair_labels",
    "rank_k",
    "read_group_labels",
    "read_pairs_file",
    "roc",
    "scan_identity_folders",
    "tar_at_far",
    "worst_to_best_fmr_ratio",
]
