"""The caller's own id or label of a gallery image (Rekognition's ExternalImageId): given, kept, applied.

Given two ways: an index request's `external_ids` mapping (API), or a sidecar file at the gallery's root,
`external_ids.csv`, read by every index and reindex of that folder (the CLI's `facegate index`, the API's
index and reindex jobs, the nightly reindex):

    path,external_id
    photo1.jpg,customer-42
    2024/photo2.jpg,customer-43

A path is relative to the folder the file lies in (or absolute), and must lie inside that folder, like every
path FaceGate reads; an external id is 1 to 255 characters. Kept in the database (`image_labels`, by gallery
and path: the one place), and every index chunk carries the labels of its images from there, so the faces
of an image carry its label however and whenever they are written again (its content changed, a rebuild
for a new model). A request's mapping wins over the sidecar for the same image; a later one over an earlier.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from facegate.paths import PathRefused, confine, is_text_path
from scheduler.models import ImageLabel, utcnow

SIDECAR = "external_ids.csv"
MAX_LABEL = 255
# A sidecar is a list of names, not a data set: anything larger is refused rather than read into memory.
MAX_SIDECAR_BYTES = 16 * 1024 * 1024


class LabelsRefused(ValueError):
    """A label or a sidecar file that cannot be taken; the message names it (and the line)."""


def check_label(label: object, what: str) -> str:
    if not isinstance(label, str) or not 0 < len(label.strip()) <= MAX_LABEL:
        raise LabelsRefused(f"external id for {what} must be 1 to {MAX_LABEL} characters")
    return label.strip()


def read_sidecar(folder: str | Path, roots: Sequence[Path]) -> dict[str, str]:
    """The labels of `folder`'s sidecar file, by resolved image path; {} when it has none."""
    folder = Path(folder)
    sidecar = folder / SIDECAR
    if not sidecar.is_file():
        return {}
    try:
        real = confine(sidecar, roots)
        real_folder = confine(folder, roots)
    except PathRefused as exc:
        raise LabelsRefused(str(exc)) from None
    if real.stat().st_size > MAX_SIDECAR_BYTES:
        raise LabelsRefused(f"{sidecar}: larger than {MAX_SIDECAR_BYTES // 2**20} MiB")
    try:
        text = real.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsRefused(f"{sidecar}: cannot be read as UTF-8 text ({exc})") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        return {}
    if [h.strip().lower() for h in header[:2]] != ["path", "external_id"]:
        raise LabelsRefused(f"{sidecar}: its first line must be the header `path,external_id`")
    labels: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise LabelsRefused(f"{sidecar}, line {line}: expected two fields (path,external_id), got {len(row)}")
        given, label = row[0].strip(), row[1]
        path = Path(given)
        # Inside the folder the file describes, as resolved (a link out of it is refused like any other path).
        resolved = (path if path.is_absolute() else real_folder / path).resolve()
        if not given or "\x00" in given or not resolved.is_relative_to(real_folder):
            raise LabelsRefused(f"{sidecar}, line {line}: {given!r} does not lie inside {folder}")
        labels[str(resolved)] = check_label(label, f"{given!r} ({sidecar}, line {line})")
    return labels


def store_labels(s: Session, gallery: str, labels: Mapping[str, str], by: str) -> None:
    """Record (or replace) these images' labels."""
    for path, label in labels.items():
        row = s.get(ImageLabel, (gallery, path))
        if row is None:
            s.add(ImageLabel(gallery=gallery, path=path, external_id=label, set_by=by))
        elif row.external_id != label:
            row.external_id, row.set_at, row.set_by = label, utcnow(), by


def labels_for(s: Session, gallery: str, paths: Iterable[str]) -> dict[str, str]:
    """The stored label of each of these images that has one."""
    # A path that is not UTF-8 text cannot be stored, so it has no label (and must not reach the database).
    wanted = sorted(p for p in set(paths) if is_text_path(p))
    found: dict[str, str] = {}
    for i in range(0, len(wanted), 500):
        batch = wanted[i : i + 500]
        found.update((path, label) for path, label in s.execute(
            select(ImageLabel.path, ImageLabel.external_id).where(ImageLabel.gallery == gallery,
                                                                  ImageLabel.path.in_(batch))))
    return found


def forget_labels(s: Session, gallery: str) -> None:
    for row in s.scalars(select(ImageLabel).where(ImageLabel.gallery == gallery)).all():
        s.delete(row)


__all__ = ["SIDECAR", "LabelsRefused", "check_label", "forget_labels", "labels_for", "read_sidecar", "store_labels"]
