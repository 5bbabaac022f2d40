"""`facegate evaluate` and `facegate report accountability`: accuracy you can state.

Registered on the main app in cli/app.py; what the commands share comes from cli/common.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_REFUSED, KEY_OPTION, USER_OPTION, authenticate, console, fail,
                        job_service)
from cli.common import out as stdout


def _default_out(settings, dataset_name: str) -> Path:
    from evaluation.runner import evaluations_dir

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name).strip("._") or "dataset"
    return evaluations_dir(settings) / f"{safe}-{stamp}"


def _weights_sha256(settings) -> str | None:
    """The hash of the weights this machine is configured with (a worker elsewhere may differ: the runner
    keeps it only when it matches the model version the workers report)."""
    from workers.weights import WeightsError, resolve_model

    try:
        return resolve_model(settings, allow_download=False).sha256
    except WeightsError:
        return None


def evaluate_command(
    dataset: Path = typer.Argument(..., help="Dataset folder: one sub-folder of photos per identity (the LFW layout). "
                                             "It must lie inside the gallery roots."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Verification pairs in LFW's pairs.txt format "
                                                               "(default: balanced pairs generated in 10 "
                                                               "identity-disjoint folds)."),
    groups: Optional[Path] = typer.Option(None, "--groups", help="CSV of group labels per identity: a header "
                                                                 "'identity,<attribute>,...', one row per identity."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for report.json and report.html "
                                                                 "(default: DATA_DIR/evaluations/<dataset>-<time>)."),
    key: Optional[str] = KEY_OPTION, user: Optional[str] = USER_OPTION,
    purpose: str = typer.Option("research", "--purpose", "-p", help="The registry purpose this evaluation runs "
                                                                    "under (capability 'compare')."),
    allow_unlabelled: bool = typer.Option(False, "--allow-unlabelled",
                                          help="Identities missing from the group CSV form an 'unlabelled' group "
                                               "instead of being an error."),
    chunk_pairs: int = typer.Option(64, "--chunk-pairs", min=1, help="Verification pairs per queued task."),
    identification_identities: int = typer.Option(300, "--identification-identities", min=2,
                                                  help="Identification (every probe against every enrolled image) "
                                                       "runs on a sample of at most this many identities."),
    identification: bool = typer.Option(True, "--identification/--no-identification",
                                        help="Also measure identification (rank-1, rank-5, FPIR)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate",
                                   help="Write the model version's calibration (similarity -> false-match rate)."),
    replace_calibration: bool = typer.Option(False, "--replace-calibration",
                                             help="Replace the calibration in force even if it rests on more "
                                                  "impostor pairs than this run."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Evaluate the model on a dataset through the queue: accuracy, TAR at FAR, identification, per-group
    error rates; write the report and the model version's calibration."""
    from evaluation.dataset import DatasetError
    from evaluation.report import UNTRAINED_WARNING
    from facegate.calibration import CalibrationStore
    from evaluation.runner import (
        EvaluationError,
        EvaluationRefused,
        admit_evaluation,
        calibration_dir,
        check_confined,
        plan_evaluation,
        run_evaluation,
    )
    from facegate.settings import get_settings

    settings = get_settings()
    principal = authenticate(settings, key, user)
    # Everything about the input is checked before a broker or worker is started.
    try:
        plan = plan_evaluation(dataset, pairs_file=pairs, groups_csv=groups, allow_unlabelled=allow_unlabelled,
                               chunk_pairs=chunk_pairs, identification_identities=identification_identities,
                               identification=identification)
        check_confined(settings, plan.dataset.root)
    except (DatasetError, EvaluationError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    try:
        admitted = admit_evaluation(settings, plan, principal, purpose)
    except EvaluationRefused as exc:
        console.print(f"[bold red]DENIED by policy[/], nothing was queued: {exc}")
        raise typer.Exit(EXIT_REFUSED) from None
    out_dir = out or _default_out(settings, plan.dataset.name)
    console.print(f"[bold]evaluate[/] {plan.dataset.root}: {len(plan.dataset.identities)} identities, "
                  f"{len(plan.dataset.images)} images, {len(plan.pairs)} verification pairs; "
                  f"{plan.comparisons} comparisons in {len(plan.chunks)} tasks")
    calibration_path = None
    calibration_said: list[str] = []

    with job_service(settings) as service:
        live = service.settings
        try:
            if as_json or not sys.stderr.isatty():
                report = run_evaluation(live, plan.dataset.root, principal, purpose=purpose, out_dir=out_dir,
                                        plan=plan, admitted=admitted, weights_sha256=_weights_sha256(live),
                                        calibrate=calibrate, timeout_s=timeout,
                                        replace_calibration=replace_calibration,
                                        on_calibration=calibration_said.append)
            else:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                with Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
                              TimeElapsedColumn(), console=console) as bar:
                    task = bar.add_task("compare", total=plan.comparisons)
                    report = run_evaluation(
                        live, plan.dataset.root, principal, purpose=purpose, out_dir=out_dir, plan=plan,
                        admitted=admitted, weights_sha256=_weights_sha256(live), calibrate=calibrate, timeout_s=timeout,
                        replace_calibration=replace_calibration, on_calibration=calibration_said.append,
                        on_progress=lambda done, total: bar.update(task, completed=done, total=total))
        except EvaluationRefused as exc:
            console.print(f"[bold red]REFUSED at execution[/], no report was written: {exc}")
            raise typer.Exit(EXIT_REFUSED) from None
        except (DatasetError, EvaluationError) as exc:
            raise fail(f"the evaluation did not complete: {exc}", EXIT_FAILED) from None
    kept = next((s for s in calibration_said if "was kept" in s), None)
    if calibrate and not kept:
        calibration_path = CalibrationStore(calibration_dir(settings)).path_for(report.model_version)

    result = {
        "untrained": report.untrained,
        "model_version": report.model_version,
        "report": str(Path(out_dir) / "report.json"),
        "html": str(Path(out_dir) / "report.html"),
        "calibration": str(calibration_path) if calibration_path else None,
        "calibration_kept": kept,
        "summary": report.summary,
    }
    if as_json:
        stdout.print_json(json.dumps(result))
        return
    lines = report.summary.splitlines()
    if report.untrained:
        # The first line, in red and alone: nobody should read the figures below it as the real model's.
        stdout.print(f"[bold red]{UNTRAINED_WARNING}[/]", soft_wrap=True)
        lines = [line for line in lines if line != UNTRAINED_WARNING]
    for line in lines:
        stdout.print(line, highlight=False, soft_wrap=True)
    if report.known_limitations:
        stdout.print("[bold]Known limitations:[/]")
        for item in report.known_limitations:
            stdout.print(f"- {item}", highlight=False, soft_wrap=True)
    stdout.print(f"report: {result['report']}\nhtml:   {result['html']}", highlight=False, soft_wrap=True)
    if calibration_path:
        stdout.print(f"calibration for {report.model_version}: {calibration_path}", highlight=False, soft_wrap=True)
    if kept:
        stdout.print(f"[yellow]{kept}[/]", highlight=False, soft_wrap=True)


def _report_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            direct = path / "report.json"
            files.extend([direct] if direct.is_file() else sorted(path.glob("*/report.json")))
        else:
            files.append(path)
    return files


def report_accountability_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the Markdown here (default: print it)."),
    reports: Optional[list[Path]] = typer.Argument(None, help="report.json files or folders of them "
                                                              "(default: every report under DATA_DIR/evaluations)."),
) -> None:
    """Assemble the accountability report (Markdown): model name, version and weights hash, evaluation
    datasets, error rates overall and per group, calibration, operating thresholds, known limitations."""
    from pydantic import ValidationError

    from facegate.calibration import CalibrationError, CalibrationStore
    from evaluation.report import EvaluationReport, accountability_report
    from evaluation.runner import calibration_dir, evaluations_dir
    from facegate.settings import get_settings

    settings = get_settings()
    places = list(reports) if reports else [evaluations_dir(settings)]
    sources = _report_files([p for p in places if reports or p.is_dir()])
    if not sources:
        raise fail(f"no evaluation reports found (looked in {', '.join(str(p) for p in places)}); "
                    "run `facegate evaluate DATASET` first, or name its report.json", EXIT_BAD_INPUT)
    loaded: list[EvaluationReport] = []
    for source in sources:
        try:
            loaded.append(EvaluationReport.model_validate_json(source.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise fail(f"{source} does not exist", EXIT_BAD_INPUT) from None
        except ValidationError as exc:
            raise fail(f"{source} is not an evaluation report: {exc}", EXIT_BAD_INPUT) from None
    store = CalibrationStore(calibration_dir(settings))
    calibrations = []
    for version in dict.fromkeys(r.model_version for r in loaded):
        try:
            found = store.get(version)
        except CalibrationError as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from None
        if found is not None:
            calibrations.append(found)
    from policy import load_registry

    registry = load_registry(settings.policy_registry)
    if settings.policy_scope:
        registry = registry.with_scope(settings.policy_scope)
    markdown = accountability_report(loaded, calibrations, registry)
    if out is None:
        sys.stdout.write(markdown)
        return
    from facegate.files import write_text_atomically

    write_text_atomically(out, markdown)
    console.print(f"accountability report from {len(loaded)} evaluation(s): {out}")


report_app = typer.Typer(no_args_is_help=True, help="Reports for accountability.")
report_app.command("accountability")(report_accountability_command)
