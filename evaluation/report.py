"""Evaluation reports: a JSON record, a self-contained HTML page, and the accountability report.

The numbers are computed elsewhere (evaluation.metrics); this module holds them with what they were
measured on (model version, weights hash, dataset) and writes them out. The one rule it enforces: a
report from untrained weights says so on its first line, because a reader who sees only that line
must not take the figures for the real model's.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

from . import metrics
from facegate.files import write_text_atomically
from facegate.calibration import Calibration, CalibrationError

if TYPE_CHECKING:
    from policy import Registry

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "UNTRAINED_WARNING",
    "DatasetSummary",
    "EvaluationReport",
    "GroupRow",
    "GroupTable",
    "IdentificationResults",
    "NoFaceFound",
    "NoFaceGroupRow",
    "OpenSetRow",
    "OperatingThreshold",
    "RocCurve",
    "TarAtFarRow",
    "VerificationResults",
    "accountability_report",
]

DEFAULT_FAR_TARGETS = (1e-2, 1e-3, 1e-4)

UNTRAINED_WARNING = (
    "UNTRAINED WEIGHTS: this evaluation ran on untrained (randomly initialised) weights; "
    "its figures say nothing about the real model."
)

# FMR targets the accountability report converts to thresholds with each calibration.
_ACCOUNTABILITY_FMR_TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


class _ReportModel(BaseModel):
    # An unbounded worst/best ratio is inf; write it as the string "Infinity" (valid JSON, read back
    # as inf) instead of pydantic's default null, which would read as "not computed".
    model_config = ConfigDict(ser_json_inf_nan="strings")


class DatasetSummary(_ReportModel):
    name: str
    root: str
    identities: int
    images: int
    pairs: int


class RocCurve(_ReportModel):
    fpr: list[float]
    tpr: list[float]


class TarAtFarRow(_ReportModel):
    far: float
    tar: float | None  # None: too few impostor pairs to resolve this FAR
    threshold: float | None


class VerificationResults(_ReportModel):
    accuracy_mean: float | None  # None when the pairs have no folds
    accuracy_std: float | None
    fold_thresholds: list[float] = Field(default_factory=list)
    auc: float
    n_genuine: int
    n_impostor: int
    tar_at_far: list[TarAtFarRow]
    roc: RocCurve

    @classmethod
    def from_scores(
        cls, scores, labels, folds=None, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS
    ) -> VerificationResults:
        """Everything the report shows about verification, from pair scores (and folds, if any)."""
        labels_array = np.asarray(labels).ravel()
        fpr, tpr, _ = metrics.roc(scores, labels_array)
        folded = metrics.lfw_10fold_accuracy(scores, labels_array, folds) if folds is not None else None
        return cls(
            accuracy_mean=folded.mean if folded else None,
            accuracy_std=folded.std if folded else None,
            fold_thresholds=folded.thresholds if folded else [],
            auc=metrics.auc(fpr, tpr),
            n_genuine=int((labels_array == 1).sum()),
            n_impostor=int((labels_array == 0).sum()),
            tar_at_far=[
                TarAtFarRow(far=far, tar=point.tar if point else None, threshold=point.threshold if point else None)
                for far, point in metrics.tar_at_far(scores, labels_array, far_targets).items()
            ],
            roc=RocCurve(fpr=fpr.tolist(), tpr=tpr.tolist()),
        )


class OpenSetRow(_ReportModel):
    threshold: float
    fpir: float | None
    fnir: float | None


class IdentificationResults(_ReportModel):
    rank1: float
    rank5: float
    n_gallery: int
    n_known_probes: int
    n_unknown_probes: int
    open_set: list[OpenSetRow] = Field(default_factory=list)

    @classmethod
    def from_vectors(
        cls,
        gallery_vecs,
        gallery_ids,
        known_probe_vecs,
        known_probe_ids,
        unknown_probe_vecs,
        thresholds: Sequence[float],
    ) -> IdentificationResults:
        ranks = metrics.rank_k(gallery_vecs, gallery_ids, known_probe_vecs, known_probe_ids, ks=(1, 5))
        open_set = metrics.fpir_fnir(
            gallery_vecs, gallery_ids, known_probe_vecs, known_probe_ids, unknown_probe_vecs, thresholds
        )
        return cls(
            rank1=ranks[1],
            rank5=ranks[5],
            n_gallery=len(gallery_ids),
            n_known_probes=len(known_probe_ids),
            n_unknown_probes=0 if unknown_probe_vecs is None else len(unknown_probe_vecs),
            open_set=[OpenSetRow(threshold=t, fpir=r.fpir, fnir=r.fnir) for t, r in open_set.items()],
        )


class GroupRow(_ReportModel):
    group: str
    fmr: float | None
    fnmr: float | None
    n_genuine: int
    n_impostor: int


class GroupTable(_ReportModel):
    """Error rates of one attribute's groups (e.g. skin_tone) at one threshold."""

    attribute: str
    threshold: float
    rows: list[GroupRow]
    worst_to_best_fmr_ratio: float | None
    worst_group: str | None = None
    best_group: str | None = None
    ratio_explanation: str

    @classmethod
    def from_scores(cls, attribute: str, scores, labels, pair_groups, threshold: float) -> GroupTable:
        rates = metrics.group_error_rates(scores, labels, pair_groups, threshold)
        ratio = metrics.worst_to_best_fmr_ratio(rates)
        return cls(
            attribute=attribute,
            threshold=threshold,
            rows=[GroupRow(group=group, **values) for group, values in rates.items()],
            worst_to_best_fmr_ratio=ratio.ratio,
            worst_group=ratio.worst_group,
            best_group=ratio.best_group,
            ratio_explanation=ratio.explanation,
        )


class NoFaceGroupRow(_ReportModel):
    attribute: str
    group: str
    images: int
    no_face: int


class NoFaceFound(_ReportModel):
    """Images in which the detector found no face: they produce no embedding, so they are missing from
    every rate above, and a detector that misses one group more often hides errors there."""

    images: int
    no_face: int
    per_group: list[NoFaceGroupRow] = Field(default_factory=list)


class OperatingThreshold(_ReportModel):
    name: str  # e.g. the purpose whose floor it is
    threshold: float
    fmr: float | None = None
    fmr_below_resolution_limit: bool = False  # fmr is an upper bound: no false match was observed
    fnmr: float | None = None
    source: str = ""  # where the threshold comes from (policy registry, calibration, ...)


class EvaluationReport(_ReportModel):
    model_name: str
    model_version: str
    weights_sha256: str | None = None
    untrained: bool
    dataset: DatasetSummary
    verification: VerificationResults | None = None
    identification: IdentificationResults | None = None
    per_group: list[GroupTable] = Field(default_factory=list)
    no_face_found: NoFaceFound | None = None
    operating_thresholds: list[OperatingThreshold] = Field(default_factory=list)
    known_limitations: list[str] = Field(default_factory=list)
    created_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented way over a property; mypy objects
    @property
    def summary(self) -> str:
        """Plain-language lines; the first is the untrained warning whenever it applies."""
        lines = [UNTRAINED_WARNING] if self.untrained else []
        lines.append(
            f"{self.model_name} version {self.model_version} on {self.dataset.name}: "
            f"{self.dataset.identities} identities, {self.dataset.images} images, {self.dataset.pairs} pairs."
        )
        if self.verification:
            v = self.verification
            accuracy = (
                f"accuracy {v.accuracy_mean:.4f} ± {v.accuracy_std:.4f} over {len(v.fold_thresholds)} folds; "
                if v.accuracy_mean is not None
                else ""
            )
            lines.append(f"Verification: {accuracy}AUC {v.auc:.4f}.")
            for row in v.tar_at_far:
                if row.tar is None:
                    lines.append(
                        f"TAR at FAR {row.far:g}: not measurable with {v.n_impostor} impostor pairs "
                        f"(needs at least {_pairs_needed(row.far)})."
                    )
                else:
                    lines.append(f"TAR at FAR {row.far:g}: {row.tar:.4f} (threshold {row.threshold:.4f}).")
        if self.identification:
            i = self.identification
            lines.append(
                f"Identification: rank-1 {i.rank1:.4f}, rank-5 {i.rank5:.4f} "
                f"({i.n_gallery} enrolled, {i.n_known_probes} known and {i.n_unknown_probes} unknown probes)."
            )
        for table in self.per_group:
            lines.append(f"Per {table.attribute} at threshold {table.threshold:.4f}: {table.ratio_explanation}")
        if self.no_face_found:
            lines.append(f"No face found in {self.no_face_found.no_face} of {self.no_face_found.images} images.")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> Path:
        return write_text_atomically(path, self.model_dump_json(indent=2) + "\n")

    def write_html(self, path: str | Path) -> Path:
        """One self-contained page: styles inline and the plots as base64 PNGs, nothing fetched."""
        return write_text_atomically(path, _render_html(self))


# Formatting --------------------------------------------------------------------------------------


def _pairs_needed(rate: float) -> int:
    return int(np.ceil(1.0 / rate))


def _rate(value: float | None, missing: str = "not measured") -> str:
    return missing if value is None else f"{value:.4g}"


def _threshold_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _ratio_text(value: float | None) -> str:
    if value is None:
        return "undefined"
    return "unbounded" if np.isinf(value) else f"{value:.3g}"


# HTML --------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.untrained { background: #b00020; color: #fff; font-weight: bold; padding: 0.8rem 1rem; font-size: 1.1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; }
.note { color: #555; }
"""


def _new_figure():
    # A Figure on an Agg canvas directly, not pyplot: no global backend switch, no open figures, and
    # matplotlib is only imported when a page is drawn.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    return figure


def _plot_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _roc_png(verification: VerificationResults) -> str:
    fpr, tpr = np.asarray(verification.roc.fpr), np.asarray(verification.roc.tpr)
    figure = _new_figure()
    axes = figure.add_subplot()
    # Log FAR axis: operating points live at FAR 1e-2 and below, invisible on a linear axis.
    shown = fpr > 0
    axes.plot(fpr[shown], tpr[shown], label="ROC")
    for row in verification.tar_at_far:
        if row.tar is not None:
            axes.plot([row.far], [row.tar], "o", label=f"TAR {row.tar:.3f} at FAR ≤ {row.far:g}")
    axes.set_xscale("log")
    axes.set_xlim(1.0 / max(verification.n_impostor, 1) / 2, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("False accept rate (FAR)")
    axes.set_ylabel("True accept rate (TAR)")
    axes.set_title("ROC")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return _plot_png(figure)


def _det_png(verification: VerificationResults) -> str:
    fmr = np.asarray(verification.roc.fpr)
    fnmr = 1.0 - np.asarray(verification.roc.tpr)
    figure = _new_figure()
    axes = figure.add_subplot()
    # Zero rates have no place on log axes; they are left out, not clipped to a made-up value.
    shown = (fmr > 0) & (fnmr > 0)
    axes.plot(fmr[shown], fnmr[shown], label="DET")
    axes.set_xscale("log")
    axes.set_yscale("log")
    # Whole decades down to just below the resolution limits, so the axes read like any other DET plot.
    axes.set_xlim(1.0 / max(verification.n_impostor, 1) / 2, 1.0)
    axes.set_ylim(1.0 / max(verification.n_genuine, 1) / 2, 1.0)
    axes.set_xlabel("False match rate (FMR)")
    axes.set_ylabel("False non-match rate (FNMR)")
    axes.set_title("DET")
    axes.grid(True, which="both", alpha=0.3)
    if not shown.any():
        axes.text(0.5, 0.5, "no point with both rates above zero", ha="center", transform=axes.transAxes)
    else:
        axes.legend(loc="upper right", fontsize="small")
    return _plot_png(figure)


# The page's markup is the template's; this module only decides what goes in it. Autoescaping is on, so
# no dataset path, group name or limitation text can add markup.
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("evaluation", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> dict:
    return {"kind": "table", "headers": [str(h) for h in headers], "rows": [[str(c) for c in row] for row in rows]}


def _heading(text: str, level: int = 2) -> dict:
    return {"kind": f"h{level}", "text": text}


def _render_html(report: EvaluationReport) -> str:
    title = f"Evaluation of {report.model_name} {report.model_version}"
    if report.untrained:
        title = "UNTRAINED WEIGHTS — " + title
    blocks: list[dict] = [
        _heading("Model"),
        _table(["Model", "Version", "Weights SHA-256", "Untrained", "Report created"],
               [[report.model_name, report.model_version, report.weights_sha256 or "not recorded",
                 "yes" if report.untrained else "no", report.created_at.isoformat()]]),
    ]
    d = report.dataset
    blocks += [_heading("Dataset"),
               _table(["Name", "Root", "Identities", "Images", "Pairs"],
                      [[d.name, d.root, d.identities, d.images, d.pairs]])]

    if report.verification:
        v = report.verification
        accuracy = (
            f"{v.accuracy_mean:.4f} ± {v.accuracy_std:.4f} ({len(v.fold_thresholds)} folds)"
            if v.accuracy_mean is not None
            else "not computed (pairs without folds)"
        )
        blocks += [
            _heading("Verification"),
            _table(["Accuracy", "AUC", "Genuine pairs", "Impostor pairs"],
                   [[accuracy, f"{v.auc:.4f}", v.n_genuine, v.n_impostor]]),
            _heading("TAR at FAR", 3),
            _table(["FAR target", "TAR", "Threshold"],
                   [[f"{row.far:g}",
                     _rate(row.tar, f"not measurable (needs ≥ {_pairs_needed(row.far)} impostor pairs)"),
                     _threshold_text(row.threshold)]
                    for row in v.tar_at_far]),
            {"kind": "image", "alt": "ROC curve", "png": _roc_png(v)},
            {"kind": "image", "alt": "DET curve", "png": _det_png(v)},
        ]

    if report.identification:
        i = report.identification
        blocks += [
            _heading("Identification"),
            _table(["Rank-1", "Rank-5", "Enrolled", "Known probes", "Unknown probes"],
                   [[f"{i.rank1:.4f}", f"{i.rank5:.4f}", i.n_gallery, i.n_known_probes, i.n_unknown_probes]]),
        ]
        if i.open_set:
            blocks.append(_table(["Threshold", "FPIR (unknown probes returned)", "FNIR (known probes missed at rank 1)"],
                                 [[f"{r.threshold:.4f}", _rate(r.fpir), _rate(r.fnir)] for r in i.open_set]))

    if report.per_group:
        blocks.append(_heading("Error rates per group"))
        for table in report.per_group:
            blocks += [
                _heading(f"{table.attribute} at threshold {table.threshold:.4f}", 3),
                _table(["Group", "FMR", "FNMR", "Genuine pairs", "Impostor pairs"],
                       [[r.group, _rate(r.fmr), _rate(r.fnmr), r.n_genuine, r.n_impostor] for r in table.rows]),
                {"kind": "paragraph", "text": f"Worst/best FMR ratio: {_ratio_text(table.worst_to_best_fmr_ratio)}.",
                 "note": table.ratio_explanation},
            ]

    if report.no_face_found:
        n = report.no_face_found
        blocks += [
            _heading("Images with no face found"),
            {"kind": "paragraph", "note": None,
             "text": f"{n.no_face} of {n.images} images. These have no embedding and are missing from every rate "
                     "above."},
        ]
        if n.per_group:
            blocks.append(_table(["Attribute", "Group", "No face", "Images"],
                                 [[r.attribute, r.group, r.no_face, r.images] for r in n.per_group]))

    if report.operating_thresholds:
        blocks += [
            _heading("Operating thresholds"),
            _table(["Name", "Threshold", "FMR", "FNMR", "Source"],
                   [[t.name, f"{t.threshold:.4f}", _fmr_text(t.fmr, t.fmr_below_resolution_limit), _rate(t.fnmr),
                     t.source]
                    for t in report.operating_thresholds]),
        ]

    blocks += [_heading("Known limitations"), {"kind": "list", "entries": report.known_limitations or ["None stated."]}]
    return _TEMPLATES.get_template("report.html").render(
        title=title, style=_STYLE, blocks=blocks,
        untrained_warning=UNTRAINED_WARNING if report.untrained else None,
        summary_lines=[line for line in report.summary.splitlines() if line != UNTRAINED_WARNING],
    )


def _fmr_text(fmr: float | None, below_limit: bool) -> str:
    if fmr is None:
        return "not measured"
    return f"< {fmr:.3g}" if below_limit else f"{fmr:.4g}"


# Accountability report ---------------------------------------------------------------------------


def _md(value: object) -> str:
    """A Markdown table cell: pipes would split the cell and newlines end the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines.extend("| " + " | ".join(_md(c) for c in row) + " |" for row in rows)
    return lines + [""]


def accountability_report(
    reports: Sequence[EvaluationReport],
    calibrations: Iterable[Calibration] | Mapping[str, Calibration] = (),
    registry: "Registry | None" = None,
) -> str:
    """A Markdown accountability report in the manner of Washington RCW 43.386: for each model version,
    its name, version and weights hash, the datasets it was tested on, error rates overall and per
    group, its calibration (similarity for each false-match rate), operating thresholds and known
    limitations. With the policy `registry`, also what it enforces per purpose: probe quality floors,
    legal authorisation per job and the retention schedule. Sections about purpose, data management and
    human review are the operating agency's to write; the report lists them as such rather than
    inventing them."""
    if not reports:
        raise ValueError("an accountability report needs at least one evaluation report")
    calibration_list = list(calibrations.values()) if isinstance(calibrations, Mapping) else list(calibrations)
    calibration_for = {c.model_version: c for c in calibration_list}

    models: dict[tuple[str, str], list[EvaluationReport]] = {}
    for report in reports:
        models.setdefault((report.model_name, report.model_version), []).append(report)

    untrained = [f"{name} {version}" for (name, version), rs in models.items() if any(r.untrained for r in rs)]
    title = "Accountability report: face recognition accuracy"
    lines = [f"# UNTRAINED WEIGHTS — {title}" if untrained else f"# {title}", ""]
    if untrained:
        lines += [f"> **{UNTRAINED_WARNING}** Affected: {', '.join(untrained)}.", ""]
    lines += [
        f"Generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Accuracy sections of an "
        "accountability report in the manner of RCW 43.386 (false-match rates, error rates per group, "
        "testing). A similarity threshold is stated here only together with the false-match rate it "
        "gives for the model version it was calibrated for.",
        "",
    ]

    for (name, version), model_reports in models.items():
        lines += _model_section(name, version, model_reports, calibration_for.get(version))

    if registry is not None:
        from policy.explain import rules_markdown

        lines += rules_markdown(registry)

    lines += [
        "## To be completed by the operating agency",
        "",
        "- Purpose and proposed use, and its benefits.",
        "- Data inputs, how they are collected and processed; data management and retention (BIPA-style schedule).",
        "- Meaningful human review: who confirms a match before anyone acts on it.",
        "- Potential impacts on civil liberties and how they are mitigated.",
        "- Procedures for testing in operational conditions, and for complaints.",
        "",
    ]
    return "\n".join(lines)


def _model_section(
    name: str, version: str, reports: list[EvaluationReport], calibration: Calibration | None
) -> list[str]:
    # Every hash seen for this version is listed: if they differ the reader must see it, not a pick.
    hashes = {r.weights_sha256 or "not recorded" for r in reports}
    if calibration is not None and calibration.weights_sha256:
        hashes.add(calibration.weights_sha256)
    lines = [f"## {name} — version {version}", ""]
    if any(r.untrained for r in reports):
        lines += [f"**{UNTRAINED_WARNING}**", ""]
    lines += [
        f"- Model name: {name}",
        f"- Model version: {version}",
        f"- Weights SHA-256: {', '.join(sorted(hashes))}",
        "",
    ]

    lines += ["### Evaluation datasets", ""]
    lines += _md_table(
        ["Dataset", "Identities", "Images", "Pairs", "Evaluated", "Untrained weights"],
        [[r.dataset.name, r.dataset.identities, r.dataset.images, r.dataset.pairs,
          r.created_at.strftime("%Y-%m-%d"), "yes" if r.untrained else "no"] for r in reports],
    )

    verified = [r for r in reports if r.verification]
    if verified:
        far_targets = sorted({row.far for r in verified for row in r.verification.tar_at_far}, reverse=True)
        lines += ["### Error rates overall (verification)", ""]
        rows = []
        for r in verified:
            v = r.verification
            by_far = {row.far: row for row in v.tar_at_far}
            cells = [
                r.dataset.name,
                f"{v.accuracy_mean:.4f} ± {v.accuracy_std:.4f}" if v.accuracy_mean is not None else "—",
                f"{v.auc:.4f}",
            ]
            for far in far_targets:
                row = by_far.get(far)
                if row is None:
                    cells.append("—")
                elif row.tar is None:
                    cells.append(f"not measurable ({v.n_impostor} impostor pairs)")
                else:
                    cells.append(f"{1 - row.tar:.4g} (threshold {row.threshold:.4f})")
            rows.append(cells)
        lines += _md_table(
            ["Dataset", "Accuracy", "AUC"] + [f"FNMR at FMR {far:g}" for far in far_targets], rows
        )

    identified = [r for r in reports if r.identification]
    if identified:
        lines += ["### Identification", ""]
        lines += _md_table(
            ["Dataset", "Rank-1", "Rank-5", "Enrolled", "Known probes", "Unknown probes"],
            [[r.dataset.name, f"{r.identification.rank1:.4f}", f"{r.identification.rank5:.4f}",
              r.identification.n_gallery, r.identification.n_known_probes, r.identification.n_unknown_probes]
             for r in identified],
        )
        open_rows = [
            [r.dataset.name, f"{row.threshold:.4f}", _rate(row.fpir), _rate(row.fnir)]
            for r in identified
            for row in r.identification.open_set
        ]
        if open_rows:
            lines += _md_table(["Dataset", "Threshold", "FPIR", "FNIR"], open_rows)

    grouped = [(r, t) for r in reports for t in r.per_group]
    lines += ["### Error rates per group", ""]
    if grouped:
        lines += _md_table(
            ["Dataset", "Attribute", "Threshold", "Group", "FMR", "FNMR", "Genuine pairs", "Impostor pairs"],
            [[r.dataset.name, t.attribute, f"{t.threshold:.4f}", row.group, _rate(row.fmr), _rate(row.fnmr),
              row.n_genuine, row.n_impostor] for r, t in grouped for row in t.rows],
        )
        lines += [
            f"- {r.dataset.name}, {t.attribute}: worst/best FMR ratio {_ratio_text(t.worst_to_best_fmr_ratio)}. "
            f"{t.ratio_explanation}"
            for r, t in grouped
        ] + [""]
    else:
        lines += ["No per-group error rates were measured (no group labels).", ""]

    no_face = [r for r in reports if r.no_face_found]
    if no_face:
        lines += ["### Images with no face found", ""]
        rows = [[r.dataset.name, "all", "all", r.no_face_found.no_face, r.no_face_found.images] for r in no_face]
        rows += [
            [r.dataset.name, g.attribute, g.group, g.no_face, g.images]
            for r in no_face
            for g in r.no_face_found.per_group
        ]
        lines += _md_table(["Dataset", "Attribute", "Group", "No face", "Images"], rows)

    lines += ["### Calibration (similarity for a false-match rate)", ""]
    if calibration is None:
        lines += [
            f"No calibration recorded for version {version}: its similarity thresholds have no stated "
            "false-match rate.",
            "",
        ]
    else:
        lines += [
            f"Calibrated on {calibration.dataset} with {calibration.n_impostor} impostor and "
            f"{calibration.n_genuine} genuine pairs ({calibration.created_at.strftime('%Y-%m-%d')}); "
            f"resolution limit {calibration.resolution_limit:.3g}.",
            "",
        ]
        rows = []
        for target in _ACCOUNTABILITY_FMR_TARGETS:
            try:
                rows.append([f"{target:g}", f"{calibration.threshold_for_fmr(target):.4f}"])
            except CalibrationError:
                rows.append([f"{target:g}", f"not measurable (needs ≥ {_pairs_needed(target)} impostor pairs)"])
        lines += _md_table(["FMR", "Similarity threshold"], rows)

    thresholds = [(r, t) for r in reports for t in r.operating_thresholds]
    lines += ["### Operating thresholds", ""]
    if thresholds:
        rows = []
        for r, t in thresholds:
            calibrated = "no calibration"
            if calibration is not None:
                estimate = calibration.fmr_at(t.threshold)
                calibrated = _fmr_text(estimate.fmr, estimate.below_resolution_limit)
            rows.append([t.name, f"{t.threshold:.4f}", _fmr_text(t.fmr, t.fmr_below_resolution_limit),
                         calibrated, _rate(t.fnmr), r.dataset.name, t.source])
        lines += _md_table(
            ["Name", "Threshold", "FMR (evaluation)", "FMR (calibration)", "FNMR", "Dataset", "Source"], rows
        )
    else:
        lines += ["None stated.", ""]

    limitations = list(dict.fromkeys(item for r in reports for item in r.known_limitations))
    for r in verified:
        for row in r.verification.tar_at_far:
            if row.tar is None:
                limitations.append(
                    f"{r.dataset.name}: FMR {row.far:g} cannot be measured with {r.verification.n_impostor} "
                    "impostor pairs."
                )
    if not grouped:
        limitations.append("Error rates per demographic group were not measured.")
    lines += ["### Known limitations", ""]
    lines += [f"- {item}" for item in limitations] or ["- None stated."]
    lines.append("")
    return lines
