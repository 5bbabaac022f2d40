"""Evaluation datasets on disk: identity folders (the LFW layout), verification pairs, group labels and
the gallery/probe split for identification.

Nothing here opens an image: paths and identities only. Every error names the file, folder or line at
fault, because the person running an evaluation needs to fix their data, not read a traceback.
"""

from __future__ import annotations

import csv
import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facegate.paths import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_SUFFIXES",
    "UNLABELLED",
    "Dataset",
    "DatasetError",
    "IdentificationSplit",
    "Pair",
    "gallery_probe_split",
    "generate_pairs",
    "pair_folds",
    "pair_group_values",
    "pair_labels",
    "read_group_labels",
    "read_pairs_file",
    "scan_identity_folders",
]


# Group value for an identity (or a blank cell) with no label, when unlabelled identities are allowed.
UNLABELLED = "unlabelled"

# How many names an error message lists before it says "and N more".
_NAMES_IN_ERRORS = 20


class DatasetError(ValueError):
    """The dataset, pairs file or label file cannot be used as it is; the message says where and why."""


@dataclass(frozen=True)
class Dataset:
    root: Path
    identities: list[str]  # sorted folder names
    images: list[tuple[str, Path]]  # (identity, path), sorted by identity then file name

    @property
    def name(self) -> str:
        return self.root.name

    def images_of(self, identity: str) -> list[Path]:
        return [path for owner, path in self.images if owner == identity]


@dataclass(frozen=True)
class Pair:
    first_identity: str
    first: Path
    second_identity: str
    second: Path
    fold: int | None = None  # None when the pairs came without a fold structure

    @property
    def is_genuine(self) -> bool:
        return self.first_identity == self.second_identity


@dataclass(frozen=True)
class IdentificationSplit:
    gallery: list[tuple[str, Path]]  # one image per enrolled identity
    known_probes: list[tuple[str, Path]]  # identity is in the gallery
    unknown_probes: list[tuple[str, Path]]  # identity is not


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_IN_ERRORS])
    rest = len(names) - _NAMES_IN_ERRORS
    return shown + (f" and {rest} more" if rest > 0 else "")


# Scanning ----------------------------------------------------------------------------------------


def scan_identity_folders(root: str | Path) -> Dataset:
    """Read a dataset laid out as one folder per identity with that person's images inside (LFW).

    Only the folders directly under `root` and the image files directly in them count; hidden entries
    (starting with ".") and other files (a pairs.txt next to the folders, say) are ignored.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"dataset folder {root_path} does not exist or is not a folder")

    identities: list[str] = []
    images: list[tuple[str, Path]] = []
    empty_folders: list[str] = []
    for folder in sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folder_images = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not folder_images:
            empty_folders.append(folder.name)
            continue
        identities.append(folder.name)
        images.extend((folder.name, path) for path in folder_images)

    if empty_folders:
        raise DatasetError(
            f"identity folder(s) in {root_path} with no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
            f"{_some(empty_folders)}"
        )
    if len(identities) < 2:
        raise DatasetError(
            f"dataset folder {root_path} has {len(identities)} identity folder(s); at least 2 are needed: "
            "a dataset with one identity cannot measure false matches"
        )
    return Dataset(root=root_path, identities=identities, images=images)


# Pairs -------------------------------------------------------------------------------------------

_LFW_IMAGE_STEM = re.compile(r"^(?P<identity>.+)_(?P<number>\d+)$")


def _lfw_image_index(dataset: Dataset) -> dict[tuple[str, int], Path]:
    """(identity, image number) -> path, from LFW file names `<identity>_<NNNN>.<suffix>`."""
    index: dict[tuple[str, int], Path] = {}
    for identity, path in dataset.images:
        match = _LFW_IMAGE_STEM.match(path.stem)
        if match and match["identity"] == identity:
            index[(identity, int(match["number"]))] = path
    return index


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _is_header(fields: list[str]) -> bool:
    return 1 <= len(fields) <= 2 and all(_is_number(f) for f in fields)


def read_pairs_file(path: str | Path, dataset: Dataset) -> list[Pair]:
    """Parse an LFW pairs file against `dataset`.

    Header (first line, optional): `<folds>\\t<n>` means `folds` folds each of n same-person pairs then
    n different-person pairs, and the pairs keep their fold index; a single `<n>` means n same then n
    different pairs, with no folds. The pair count is checked against the header.
    Pair lines: `name\\tn1\\tn2` (same person, images n1 and n2) or `name1\\tn1\\tname2\\tn2`
    (different people); image numbers are 1-based and refer to files named `name_0001.jpg` etc.
    """
    pairs_path = Path(path).expanduser()
    if not pairs_path.is_file():
        raise DatasetError(f"pairs file {pairs_path} does not exist")
    lines = pairs_path.read_text(encoding="utf-8").splitlines()
    numbered = [(number, line.split()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DatasetError(f"pairs file {pairs_path} is empty")

    pairs_per_fold: int | None = None
    expected_pairs: int | None = None
    header_number, header = numbered[0]
    if _is_header(header):
        numbered = numbered[1:]
        if len(header) == 2:
            n_folds, per_class = int(header[0]), int(header[1])
            pairs_per_fold = 2 * per_class
            expected_pairs = n_folds * pairs_per_fold
            described = f"{n_folds} folds of {per_class} same-person and {per_class} different-person pairs"
        else:
            expected_pairs = 2 * int(header[0])
            described = f"{header[0]} same-person and {header[0]} different-person pairs"
        if len(numbered) != expected_pairs:
            raise DatasetError(
                f"{pairs_path} line {header_number}: the header says {described} ({expected_pairs} pair "
                f"lines) but the file has {len(numbered)} pair lines"
            )

    image_index = _lfw_image_index(dataset)
    identities = set(dataset.identities)

    def image(identity: str, number_text: str, line_number: int) -> Path:
        if int(number_text) < 1:
            raise DatasetError(f"{pairs_path} line {line_number}: image numbers start at 1, not {number_text}")
        if identity not in identities:
            raise DatasetError(f"{pairs_path} line {line_number}: identity {identity!r} is not in {dataset.root}")
        found = image_index.get((identity, int(number_text)))
        if found is None:
            raise DatasetError(
                f"{pairs_path} line {line_number}: image {int(number_text)} of {identity!r} "
                f"({identity}_{int(number_text):04d}.*) is not in {dataset.root / identity}"
            )
        return found

    pairs: list[Pair] = []
    for position, (line_number, fields) in enumerate(numbered):
        fold = position // pairs_per_fold if pairs_per_fold else None
        same_person = len(fields) == 3 and _is_number(fields[1]) and _is_number(fields[2])
        different_people = len(fields) == 4 and _is_number(fields[1]) and _is_number(fields[3])
        if same_person:
            name, first_number, second_number = fields
            first, second = image(name, first_number, line_number), image(name, second_number, line_number)
            if first == second:
                raise DatasetError(
                    f"{pairs_path} line {line_number}: pairs image {first.name} with itself, which "
                    "measures nothing"
                )
            pairs.append(Pair(name, first, name, second, fold))
        elif different_people:
            first_name, first_number, second_name, second_number = fields
            if first_name == second_name:
                raise DatasetError(
                    f"{pairs_path} line {line_number}: a different-person line names {first_name!r} twice"
                )
            first = image(first_name, first_number, line_number)
            second = image(second_name, second_number, line_number)
            pairs.append(Pair(first_name, first, second_name, second, fold))
        else:
            raise DatasetError(
                f"{pairs_path} line {line_number}: expected 'name n1 n2' (same person) or "
                f"'name1 n1 name2 n2' (different people) with whole image numbers, got {' '.join(fields)!r}"
            )
    return pairs


def _deal_identities_into_folds(dataset: Dataset, n_folds: int, rng: np.random.Generator) -> list[list[str]]:
    """Identities dealt round-robin into folds, those with 2+ images first so every fold gets some
    genuine pairs. Fewer folds than asked when there are too few identities (see generate_pairs)."""
    image_counts = {identity: 0 for identity in dataset.identities}
    for identity, _ in dataset.images:
        image_counts[identity] += 1
    with_pairs = [i for i in dataset.identities if image_counts[i] >= 2]
    singles = [i for i in dataset.identities if image_counts[i] < 2]
    if not with_pairs:
        raise DatasetError(
            f"no identity in {dataset.root} has two images, so there are no same-person pairs to measure"
        )
    # A fold needs an identity with two images (genuine pairs) and a second identity (impostor pairs).
    usable_folds = max(1, min(n_folds, len(with_pairs), len(dataset.identities) // 2))
    if usable_folds < n_folds:
        warnings.warn(
            f"{dataset.root}: {len(dataset.identities)} identities ({len(with_pairs)} with 2+ images) are "
            f"too few for {n_folds} identity-disjoint folds; using {usable_folds} fold(s)",
            stacklevel=3,
        )
    rng.shuffle(with_pairs)
    rng.shuffle(singles)
    folds: list[list[str]] = [[] for _ in range(usable_folds)]
    for position, identity in enumerate(with_pairs + singles):
        folds[position % usable_folds].append(identity)
    return folds


def generate_pairs(dataset: Dataset, n_folds: int = 10, seed: int = 0, pairs_per_fold: int = 300) -> list[Pair]:
    """Balanced same-person and different-person pairs, for datasets without a pairs file.

    Identities are dealt into folds so that no identity appears in two folds: the threshold chosen on
    the other folds has never seen the people it is tested on. Each fold then gets the same number of
    genuine and impostor pairs, at most `pairs_per_fold` of each (300, as LFW): genuine pairs are
    taken round-robin over the fold's identities, so one person with hundreds of images does not
    dominate; impostor pairs pick two different identities uniformly, then one image of each.

    Too few identities: a fold needs an identity with two images and one other identity, so with
    fewer than 2 x n_folds identities (or fewer than n_folds identities having two images) the
    number of folds is reduced to what the data allows, with a warning, rather than letting an
    identity cross folds. With 2 or 3 identities that is a single fold: the pairs still give ROC and
    TAR@FAR, but cross-validated accuracy needs at least 2 folds.

    Deterministic: the same dataset, n_folds, seed and pairs_per_fold give the same pairs.
    """
    if n_folds < 1 or pairs_per_fold < 1:
        raise ValueError("n_folds and pairs_per_fold must be at least 1")
    rng = np.random.default_rng(seed)
    images_by_identity: dict[str, list[Path]] = {identity: [] for identity in dataset.identities}
    for identity, path in dataset.images:
        images_by_identity[identity].append(path)

    pairs: list[Pair] = []
    for fold, fold_identities in enumerate(_deal_identities_into_folds(dataset, n_folds, rng)):
        genuine_queues = []
        for identity in fold_identities:
            combinations = list(itertools.combinations(range(len(images_by_identity[identity])), 2))
            rng.shuffle(combinations)
            if combinations:
                genuine_queues.append((identity, combinations))
        sizes = [len(images_by_identity[i]) for i in fold_identities]
        possible_impostors = (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2
        wanted = min(pairs_per_fold, sum(len(q) for _, q in genuine_queues), possible_impostors)

        genuine: list[Pair] = []
        round_number = 0
        while len(genuine) < wanted:
            for identity, combinations in genuine_queues:
                if round_number < len(combinations) and len(genuine) < wanted:
                    i, j = combinations[round_number]
                    paths = images_by_identity[identity]
                    genuine.append(Pair(identity, paths[i], identity, paths[j], fold))
            round_number += 1

        impostor = _impostor_pairs(fold_identities, images_by_identity, wanted, possible_impostors, fold, rng)
        pairs.extend(genuine)
        pairs.extend(impostor)
    return pairs


def _impostor_pairs(
    identities: list[str],
    images_by_identity: Mapping[str, list[Path]],
    wanted: int,
    possible: int,
    fold: int,
    rng: np.random.Generator,
) -> list[Pair]:
    """`wanted` distinct different-person pairs among `identities`."""
    if possible <= 4 * wanted:
        # Few possibilities: list them all and draw without replacement (sampling would mostly repeat).
        every_pair = [
            (a, path_a, b, path_b)
            for a, b in itertools.combinations(identities, 2)
            for path_a in images_by_identity[a]
            for path_b in images_by_identity[b]
        ]
        chosen = rng.choice(len(every_pair), size=wanted, replace=False)
        return [Pair(a, pa, b, pb, fold) for a, pa, b, pb in (every_pair[k] for k in sorted(chosen))]
    seen: set[tuple[Path, Path]] = set()
    pairs: list[Pair] = []
    while len(pairs) < wanted:
        a, b = rng.choice(len(identities), size=2, replace=False)
        first_identity, second_identity = sorted((identities[a], identities[b]))
        first = images_by_identity[first_identity][rng.integers(len(images_by_identity[first_identity]))]
        second = images_by_identity[second_identity][rng.integers(len(images_by_identity[second_identity]))]
        if (first, second) not in seen:
            seen.add((first, second))
            pairs.append(Pair(first_identity, first, second_identity, second, fold))
    return pairs


def pair_labels(pairs: Sequence[Pair]) -> np.ndarray:
    """1 for a same-person pair, 0 otherwise: the `labels` argument of the metrics."""
    return np.array([1 if pair.is_genuine else 0 for pair in pairs], dtype=np.int64)


def pair_folds(pairs: Sequence[Pair]) -> np.ndarray:
    """The fold index of every pair: the `folds` argument of lfw_10fold_accuracy."""
    missing = sum(1 for pair in pairs if pair.fold is None)
    if missing:
        raise DatasetError(
            f"{missing} of {len(pairs)} pairs have no fold (a pairs file with a single-count header has "
            "none); use generate_pairs or a '<folds>\\t<n>' pairs file for cross-validated accuracy"
        )
    return np.array([pair.fold for pair in pairs], dtype=np.int64)


# Group labels ------------------------------------------------------------------------------------


def read_group_labels(
    csv_path: str | Path, dataset: Dataset, allow_unlabelled: bool = False
) -> dict[str, dict[str, str]]:
    """Read per-identity group attributes: a CSV whose header is `identity,<attribute>,...`.

    Identities in the CSV that are not in the dataset are always an error (a typo or the wrong
    dataset). Identities of the dataset missing from the CSV are an error too by default, because a
    per-group error rate silently computed over part of the people misleads; with
    `allow_unlabelled=True` they get the value UNLABELLED ("unlabelled") for every attribute and show
    up as their own group. A blank cell always reads as UNLABELLED: someone chose not to label it.
    """
    labels_path = Path(csv_path).expanduser()
    if not labels_path.is_file():
        raise DatasetError(f"group label file {labels_path} does not exist")
    # utf-8-sig: spreadsheets often save a byte-order mark that would otherwise stick to "identity".
    with labels_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    rows = [(number, row) for number, row in enumerate(rows, start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"group label file {labels_path} is empty")
    header = [cell.strip() for cell in rows[0][1]]
    if header[0] != "identity" or len(header) < 2:
        raise DatasetError(
            f"{labels_path} line {rows[0][0]}: the header must be 'identity' followed by at least one "
            f"group attribute column (e.g. identity,skin_tone,gender); got {','.join(header)!r}"
        )
    attributes = header[1:]
    if len(set(attributes)) != len(attributes) or any(not a for a in attributes):
        raise DatasetError(f"{labels_path}: attribute column names must be non-empty and distinct: {attributes}")

    labels: dict[str, dict[str, str]] = {}
    for line_number, row in rows[1:]:
        if len(row) != len(header):
            raise DatasetError(
                f"{labels_path} line {line_number}: {len(row)} cells, the header has {len(header)}"
            )
        identity = row[0].strip()
        if identity in labels:
            raise DatasetError(f"{labels_path} line {line_number}: identity {identity!r} is listed twice")
        labels[identity] = {
            attribute: (value.strip() or UNLABELLED) for attribute, value in zip(attributes, row[1:])
        }

    known = set(dataset.identities)
    unknown = sorted(set(labels) - known)
    missing = sorted(known - set(labels))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} identities are not in the dataset {dataset.root}: {_some(unknown)}")
    if missing and not allow_unlabelled:
        problems.append(
            f"{len(missing)} identities of the dataset have no labels: {_some(missing)} "
            "(label them, or allow them as 'unlabelled')"
        )
    if problems:
        raise DatasetError(f"{labels_path}: " + "; ".join(problems))
    for identity in missing:
        labels[identity] = {attribute: UNLABELLED for attribute in attributes}
    return {identity: labels[identity] for identity in dataset.identities}


def pair_group_values(
    pairs: Sequence[Pair], group_labels: Mapping[str, Mapping[str, str]], attribute: str
) -> list[tuple[str, str]]:
    """(first, second) values of `attribute` for every pair: the `pair_groups` of group_error_rates."""
    values = []
    for pair in pairs:
        try:
            values.append((group_labels[pair.first_identity][attribute], group_labels[pair.second_identity][attribute]))
        except KeyError as missing:
            raise DatasetError(f"no {attribute!r} label for identity {missing.args[0]!r}") from None
    return values


# Identification split ----------------------------------------------------------------------------


def gallery_probe_split(dataset: Dataset, seed: int = 0, unknown_fraction: float = 0.2) -> IdentificationSplit:
    """Split for identification: `unknown_fraction` of the identities are held out entirely (all their
    images are unknown probes, never enrolled, to measure false positives); of the rest, an identity
    with 2+ images enrolls one image chosen at random and its other images are known probes, and an
    identity with a single image is enrolled as a distractor (it makes the gallery harder, as in a
    real deployment, but cannot be probed).

    One identity with 2+ images is always kept enrolled, so there is at least one known probe; at
    least one identity is held out whenever unknown_fraction > 0. Deterministic for a given seed.
    """
    if not 0.0 <= unknown_fraction < 1.0:
        raise ValueError(f"unknown_fraction must be in [0, 1), not {unknown_fraction}")
    rng = np.random.default_rng(seed)
    images_by_identity: dict[str, list[Path]] = {identity: [] for identity in dataset.identities}
    for identity, path in dataset.images:
        images_by_identity[identity].append(path)
    with_probes = [i for i in dataset.identities if len(images_by_identity[i]) >= 2]
    if not with_probes:
        raise DatasetError(f"no identity in {dataset.root} has two images, so nothing can be probed")

    always_enrolled = with_probes[int(rng.integers(len(with_probes)))]
    candidates = [i for i in dataset.identities if i != always_enrolled]
    rng.shuffle(candidates)
    n_unknown = round(unknown_fraction * len(dataset.identities))
    if unknown_fraction > 0:
        n_unknown = max(1, n_unknown)
    n_unknown = min(n_unknown, len(candidates))
    unknown = set(candidates[:n_unknown])

    gallery: list[tuple[str, Path]] = []
    known_probes: list[tuple[str, Path]] = []
    unknown_probes: list[tuple[str, Path]] = []
    for identity in dataset.identities:
        paths = images_by_identity[identity]
        if identity in unknown:
            unknown_probes.extend((identity, path) for path in paths)
            continue
        enrolled = int(rng.integers(len(paths)))
        gallery.append((identity, paths[enrolled]))
        known_probes.extend((identity, path) for k, path in enumerate(paths) if k != enrolled)
    return IdentificationSplit(gallery=gallery, known_probes=known_probes, unknown_probes=unknown_probes)
