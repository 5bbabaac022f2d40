"""The moratorium registry: who is who, which purposes exist, which moratoria and exceptions hold.

The registry is data, kept in a YAML file an operator can read and review
(`policy/default_registry.yaml` ships the Rekognition moratorium of 2020). This module only models and
validates it; deciding a request is `policy.decision`'s job.

Every model is frozen: a loaded registry is a value, and the hash that identifies it in audit rows and
signed tickets must keep describing what the decisions were made against.
"""

from __future__ import annotations

import re
import unicodedata

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Collection, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .authorisation import AuthorisationKind, AuthorisationRequirement
from .quality import QualityFloor
from .retention import RetentionPeriods, RetentionPolicy

__all__ = [
    "CAPABILITIES",
    "ERASE_CAPABILITY",
    "DEFAULT_REGISTRY_NAME",
    "LAW_ENFORCEMENT_SECTORS",
    "SECTORS",
    "Capability",
    "ExceptionRule",
    "Moratorium",
    "Organisation",
    "Purpose",
    "QualityFloor",
    "Registry",
    "RegistryError",
    "Revision",
    "Scope",
    "Sector",
    "ThresholdFloor",
    "FloorSource",
    "check_floor_models",
    "is_law_enforcement",
    "model_family",
    "load_registry",
    "registry_from_dict",
]

Sector = Literal[
    "police",
    "federal_law_enforcement",
    "state_law_enforcement",
    "immigration_enforcement",
    "child_safety",
    "commercial",
    "research",
    "photo_archive",
    "trust_and_safety",
    # FaceGate's own submitter (nightly reindexing); `policy.decision` confines it to indexing.
    "system",
]
SECTORS: tuple[str, ...] = get_args(Sector)

# Police plus every other law-enforcement sector. The Rekognition announcement named only police, so
# whether federal, state and immigration agencies are covered is the registry's `scope` switch.
LAW_ENFORCEMENT_SECTORS: frozenset[str] = frozenset(
    {"police", "federal_law_enforcement", "state_law_enforcement", "immigration_enforcement"}
)

# What a moratorium can name and hold back.
Capability = Literal["index", "search", "compare"]
CAPABILITIES: tuple[str, ...] = get_args(Capability)
# Destroying biometric data: a capability too, but one no moratorium can name or hold back (BIPA: destroy
# when the purpose is met). `decide` allows it; who may erase which gallery is the scheduler's access rule.
ERASE_CAPABILITY = "erase"


def held_back_by_moratoria(capability: str) -> bool:
    """Whether a moratorium can refuse `capability` (every capability but erasure)."""
    return capability != ERASE_CAPABILITY

Scope = Literal["police", "all_law_enforcement"]

DEFAULT_REGISTRY_NAME = "default_registry.yaml"
_log = logging.getLogger(__name__)
# (registry source, model version) already warned about: the registry is read at every decision.
_warned: set[tuple[str, str]] = set()

# Rule ids that `policy.decision` emits itself; registry ids must not be mistaken for them.
_RESERVED_ID_PREFIXES = ("allow.", "deny.")


def is_law_enforcement(sector: str) -> bool:
    """Whether `sector` is police or another law-enforcement sector (federal, state, immigration)."""
    return sector in LAW_ENFORCEMENT_SECTORS


class RegistryError(ValueError):
    """The registry file is missing or wrong; the message names the file and what is wrong."""


class _Frozen(BaseModel):
    # extra="forbid": a misspelt key in the YAML (`valid_unitl`) must fail loudly, not be ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")


# A safe alphabet: ids become folder names (uploads), audit fields and rule ids.
_ID_ALPHABET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def id_skeleton(value: str) -> str:
    """What an id looks like to a reader: NFKC-normalised, case-folded, '_' and '.' read as '-'.
    Two ids with one skeleton are confusable (`Thorn` and `thorn`, `icmec` and `ICMEC`, `a_b` and `a-b`)."""
    folded = unicodedata.normalize("NFKC", value).casefold()
    return folded.replace("_", "-").replace(".", "-")


def _check_id(value: str) -> str:
    if not value or value != value.strip():
        raise ValueError(f"id {value!r} must be non-empty and have no surrounding spaces")
    if not _ID_ALPHABET.fullmatch(value):
        raise ValueError(f"id {value!r} is outside the safe alphabet: ASCII letters, digits, '-', '_' and '.', "
                         "starting with a letter or digit, at most 128 characters")
    if value.startswith(_RESERVED_ID_PREFIXES):
        raise ValueError(f"id {value!r} must not start with 'allow.' or 'deny.' (reserved for fixed rule ids)")
    return value


# Ids of organisations, purposes, moratoria and exceptions: they end up in rule_ids and audit rows.
Identifier = Annotated[str, AfterValidator(_check_id)]


class Organisation(_Frozen):
    """Someone who submits jobs. `allowed_purposes` is its declared use case (as with Azure Face's
    Limited Access): any purpose outside that list is denied, whatever the moratoria say."""

    id: Identifier
    name: str
    sector: Sector
    jurisdiction: str
    allowed_purposes: list[str]


def model_family(model_version: str) -> str:
    """The family of a model version: the part before ':' (`dlib-resnet-v1:0123456789abcdef` ->
    `dlib-resnet-v1`); a version with no ':' (`untrained-seed0`) is a family of its own."""
    return model_version.partition(":")[0]


# Where the floor that applies to a model version was stated: for that exact version, for its family,
# or nowhere (the purpose's default).
FloorSource = Literal["version", "family", "default"]


class ThresholdFloor(_Frozen):
    """The lowest cosine similarity a search may use, for one model family (every version of it:
    `dlib-resnet-v1`) or one exact model version (`dlib-resnet-v1:0123456789abcdef`, which wins over
    its family's floor). A similarity number means nothing across models."""

    model_version: str = Field(min_length=1)
    min_similarity: float = Field(ge=-1.0, le=1.0)
    # Where the number comes from (a measurement, a published operating point): shown by `policy show`.
    evidence: str = ""


class Purpose(_Frozen):
    id: Identifier
    description: str
    floors: list[ThresholdFloor] = []
    # Used for a model version with no floor of its own nor of its family; None means such a search is refused.
    default_min_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)
    # A floor stated as a false-match rate (e.g. 1e-5): translated into a similarity threshold for the
    # model version being searched, through that version's calibration (`facegate evaluate` writes it).
    # A model version with no calibration cannot be searched for this purpose. When a similarity floor
    # applies as well, the higher of the two is the floor.
    max_false_match_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    human_review_required: bool
    # How many different reviewers of the organisation must confirm a match before it is `confirmed`
    # (EU AI Act Art 14(5): two). Absent: 2 where human review is required, else 0 (none needed; a match
    # someone reviews anyway is confirmed by one). A rejection by any reviewer is kept.
    reviewers_required: int = Field(default=0, ge=0, le=10)
    # The least quality a probe face must have to be searched for this purpose (policy/quality.py); a
    # face below it is not searched and its item says why. None: every detected face is searched.
    min_quality: QualityFloor | None = None
    # A legal authorisation each job for this purpose must name (policy/authorisation.py): the kinds
    # accepted, for which capabilities. None: no authorisation is asked for.
    authorisation: AuthorisationRequirement | None = None
    # How long its galleries, uploads and results are kept (policy/retention.py); None: the registry's
    # `retention` defaults, and never past the legal maximum.
    retention: RetentionPeriods | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_reviewers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("reviewers_required") is None:
            return {**data, "reviewers_required": 2 if data.get("human_review_required") else 0}
        return data

    @model_validator(mode="after")
    def _reviewers_agree(self) -> "Purpose":
        if self.human_review_required and self.reviewers_required < 1:
            raise ValueError(f"purpose {self.id!r} requires human review but states reviewers_required "
                             f"{self.reviewers_required}: at least 1")
        if not self.human_review_required and self.reviewers_required > 1:
            raise ValueError(f"purpose {self.id!r} states reviewers_required {self.reviewers_required} but no human "
                             "review: set human_review_required: true, or reviewers_required 0 or 1")
        return self

    @field_validator("floors")
    @classmethod
    def _one_floor_per_model(cls, floors: list[ThresholdFloor]) -> list[ThresholdFloor]:
        versions = [f.model_version for f in floors]
        duplicates = sorted({v for v in versions if versions.count(v) > 1})
        if duplicates:
            raise ValueError(f"more than one floor for model version(s) {duplicates}")
        return floors

    def floor_for(self, model_version: str) -> tuple[float | None, FloorSource | None]:
        """(floor, where it was stated) for `model_version`: its exact version's floor, else its family's,
        else the purpose's default ("default"); (None, None) when no floor applies at all."""
        family = model_family(model_version)
        exact = next((f for f in self.floors if f.model_version == model_version), None)
        if exact is not None:
            return exact.min_similarity, "version"
        by_family = next((f for f in self.floors if f.model_version == family), None)
        if by_family is not None:
            return by_family.min_similarity, "family"
        if self.default_min_similarity is not None:
            return self.default_min_similarity, "default"
        return None, None

    def floor_entry(self, model_version: str) -> ThresholdFloor | None:
        """The registry entry that states `model_version`'s floor (exact version, else family)."""
        exact = next((f for f in self.floors if f.model_version == model_version), None)
        return exact or next((f for f in self.floors if f.model_version == model_family(model_version)), None)


class Revision(_Frozen):
    """One dated change to a moratorium, and the start and end in force from that date on."""

    date: dt.date
    change: str
    start: dt.date
    end: dt.date | None = None

    @model_validator(mode="after")
    def _end_after_start(self) -> Revision:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"revision of {self.date}: end {self.end} is not after start {self.start}")
        return self


class Moratorium(_Frozen):
    """A ban on some capabilities for some sectors and organisations, between `start` (inclusive) and
    `end` (exclusive; None = indefinitely, "until further notice").

    `start`/`end` are the moratorium as it stands now; `history` says what was in force when. The
    latest revision dated on or before an instant decides that instant, so a revision recorded today
    for a date ahead changes nothing until its date. With an empty history, `start`/`end` hold always.
    """

    id: Identifier
    title: str
    covers_sectors: list[Sector] = []
    covers_organisations: list[str] = []
    capabilities: list[Capability] = Field(min_length=1)
    start: dt.date
    end: dt.date | None = None
    history: list[Revision] = []

    @model_validator(mode="after")
    def _consistent(self) -> Moratorium:
        if not self.covers_sectors and not self.covers_organisations:
            raise ValueError(f"moratorium {self.id!r} covers no sector and no organisation")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"moratorium {self.id!r}: end {self.end} is not after start {self.start}")
        dates = [r.date for r in self.history]
        if any(later <= earlier for earlier, later in zip(dates, dates[1:])):
            raise ValueError(
                f"moratorium {self.id!r}: history must be in date order with one revision per day, got {dates}"
            )
        if self.history:
            last = self.history[-1]
            if (last.start, last.end) != (self.start, self.end):
                raise ValueError(
                    f"moratorium {self.id!r}: start/end ({self.start}, {self.end}) differ from its latest "
                    f"revision of {last.date} ({last.start}, {last.end})"
                )
        return self

    def in_force(self, day: dt.date) -> tuple[dt.date, dt.date | None, Revision | None] | None:
        """(start, end, revision) as recorded on `day`, or None when no revision was dated yet."""
        if not self.history:
            return self.start, self.end, None
        current = None
        for revision in self.history:  # in date order, checked at load
            if revision.date <= day:
                current = revision
        if current is None:
            return None
        return current.start, current.end, current

    def applies_on(self, day: dt.date) -> bool:
        """Whether the moratorium is in effect on `day`: start <= day < end under the revision then in force."""
        terms = self.in_force(day)
        if terms is None:
            return False
        start, end, _ = terms
        return start <= day and (end is None or day < end)


class ExceptionRule(_Frozen):
    """An exception to one or more moratoria (YAML key `exceptions`). It matches a request when the
    organisation is listed (if `organisations` is given) and the purpose is listed (if `purposes` is
    given); at least one of the two is required. Valid from `valid_from` (inclusive) to `valid_until`
    (exclusive; None = open)."""

    id: Identifier
    moratoria: list[str] | Literal["all"]
    organisations: list[str] | None = None
    purposes: list[str] | None = None
    valid_from: dt.date
    valid_until: dt.date | None = None
    note: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ExceptionRule:
        # An exception for everyone is the moratorium ending; that belongs in the moratorium's history.
        if not self.organisations and not self.purposes:
            raise ValueError(f"exception {self.id!r} must name organisations or purposes")
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError(
                f"exception {self.id!r}: valid_until {self.valid_until} is not after valid_from {self.valid_from}"
            )
        return self

    def excepts(self, moratorium_id: str) -> bool:
        return self.moratoria == "all" or moratorium_id in self.moratoria

    def matches(self, organisation_id: str, purpose: str) -> bool:
        if self.organisations is not None and organisation_id not in self.organisations:
            return False
        if self.purposes is not None and purpose not in self.purposes:
            return False
        return True

    def valid_on(self, day: dt.date) -> bool:
        return self.valid_from <= day and (self.valid_until is None or day < self.valid_until)


class Registry(_Frozen):
    """The whole registry. Build it with `load_registry` (from a file) or `registry_from_dict`."""

    scope: Scope
    organisations: list[Organisation]
    purposes: list[Purpose]
    moratoria: list[Moratorium] = []
    exceptions: list[ExceptionRule] = []
    # Named enrolment filters (Rekognition's QualityFilter): an index job may name one, and faces below
    # it are not enrolled into the gallery.
    quality_filters: dict[str, QualityFloor] = {}
    # Kinds of legal authorisation and their rules (e.g. exigent circumstances: 48 hours unless confirmed).
    authorisation_kinds: list[AuthorisationKind] = []
    # The retention schedule: the legal maximum and the defaults (policy/retention.py).
    retention: RetentionPolicy = RetentionPolicy()

    # sha256 of the file bytes when loaded from a file; see `content_hash`.
    _file_hash: str | None = PrivateAttr(default=None)
    # Floors keyed to an exact model version that no weights known to the loader produce (see
    # `check_floor_models`): they apply only where such weights run, and `policy show` lists them.
    _unknown_floor_models: tuple[str, ...] = PrivateAttr(default=())

    @property
    def unknown_floor_models(self) -> tuple[str, ...]:
        return self._unknown_floor_models

    @model_validator(mode="after")
    def _references(self) -> Registry:
        problems: list[str] = []

        def unique(kind: str, ids: list[str]) -> None:
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                problems.append(f"duplicate {kind} id(s): {', '.join(duplicates)}")

        org_ids = [o.id for o in self.organisations]
        purpose_ids = [p.id for p in self.purposes]
        moratorium_ids = [m.id for m in self.moratoria]
        unique("organisation", org_ids)
        unique("purpose", purpose_ids)

        def distinct(kind: str, ids: list[str]) -> None:
            seen: dict[str, str] = {}
            for i in ids:
                other = seen.setdefault(id_skeleton(i), i)
                if other != i:
                    problems.append(f"{kind} ids {other!r} and {i!r} are confusable (the same after Unicode "
                                    "normalisation, case folding and separators)")

        distinct("organisation", org_ids)
        distinct("purpose", purpose_ids)
        # Moratorium and exception ids share one namespace: both appear in a decision's rule_ids.
        unique("moratorium/exception", moratorium_ids + [e.id for e in self.exceptions])

        known_orgs, known_purposes, known_moratoria = set(org_ids), set(purpose_ids), set(moratorium_ids)
        for org in self.organisations:
            for purpose in org.allowed_purposes:
                if purpose not in known_purposes:
                    problems.append(f"organisation {org.id!r} allows unknown purpose {purpose!r}")
        for moratorium in self.moratoria:
            for org_id in moratorium.covers_organisations:
                if org_id not in known_orgs:
                    problems.append(f"moratorium {moratorium.id!r} covers unknown organisation {org_id!r}")
        for exception in self.exceptions:
            if exception.moratoria != "all":
                for moratorium_id in exception.moratoria:
                    if moratorium_id not in known_moratoria:
                        problems.append(f"exception {exception.id!r} refers to unknown moratorium {moratorium_id!r}")
            for org_id in exception.organisations or []:
                if org_id not in known_orgs:
                    problems.append(f"exception {exception.id!r} refers to unknown organisation {org_id!r}")
            for purpose in exception.purposes or []:
                if purpose not in known_purposes:
                    problems.append(f"exception {exception.id!r} refers to unknown purpose {purpose!r}")
        kind_ids = [k.id for k in self.authorisation_kinds]
        unique("authorisation kind", kind_ids)
        for purpose_entry in self.purposes:
            if purpose_entry.authorisation is not None:
                for kind in purpose_entry.authorisation.kinds:
                    if kind not in kind_ids:
                        problems.append(f"purpose {purpose_entry.id!r} accepts unknown authorisation kind {kind!r}")
                for capability in purpose_entry.authorisation.capabilities:
                    if capability not in CAPABILITIES:
                        problems.append(f"purpose {purpose_entry.id!r} asks authorisation for unknown capability "
                                        f"{capability!r}")
        for name in self.quality_filters:
            if not _ID_ALPHABET.fullmatch(name):
                problems.append(f"quality filter name {name!r} is outside the safe alphabet")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- look-ups -------------------------------------------------------------------------------

    def organisation(self, organisation_id: str) -> Organisation | None:
        return next((o for o in self.organisations if o.id == organisation_id), None)

    def purpose(self, purpose_id: str) -> Purpose | None:
        return next((p for p in self.purposes if p.id == purpose_id), None)

    def authorisation_kind(self, kind_id: str) -> AuthorisationKind | None:
        return next((k for k in self.authorisation_kinds if k.id == kind_id), None)

    def covered_sectors(self, moratorium: Moratorium) -> frozenset[str]:
        """The sectors `moratorium` covers under this registry's scope: with `all_law_enforcement`, a
        moratorium on police covers every law-enforcement sector."""
        sectors: frozenset[str] = frozenset(moratorium.covers_sectors)
        if self.scope == "all_law_enforcement" and "police" in sectors:
            sectors |= LAW_ENFORCEMENT_SECTORS
        return sectors

    def covers(self, moratorium: Moratorium, organisation: Organisation) -> bool:
        return organisation.id in moratorium.covers_organisations or organisation.sector in self.covered_sectors(
            moratorium
        )

    # --- identity -------------------------------------------------------------------------------

    @property
    def content_hash(self) -> str:
        """Version identifier for audit rows and signed tickets: sha256 hex of the file bytes as loaded,
        or, for a registry built or derived in code, of a canonical JSON dump."""
        if self._file_hash is not None:
            return self._file_hash
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Registry:
        # A copy with changes is no longer the file it was loaded from: it must not keep the file's hash.
        copied = super().model_copy(update=update, deep=deep)
        if update:
            copied._file_hash = None
        return copied

    # --- derived registries -----------------------------------------------------------------------

    def with_scope(self, scope: Scope) -> Registry:
        """This registry with another scope (`police` or `all_law_enforcement`); a new content hash."""
        if scope not in get_args(Scope):
            raise RegistryError(f"unknown scope {scope!r}; expected one of {list(get_args(Scope))}")
        if scope == self.scope:
            return self
        scoped = registry_from_dict({**self.model_dump(mode="python"), "scope": scope}, source="<with_scope>")
        scoped._unknown_floor_models = self._unknown_floor_models
        return scoped

    def as_of(self, day: dt.date) -> Registry:
        """The registry as it stood on `day`: moratorium revisions dated after `day` are dropped, and a
        moratorium with no revision by then is dropped with the exceptions' references to it. Useful to
        show what a past registry would have decided."""
        data = self.model_dump(mode="python")
        kept_moratoria, dropped = [], set()
        for moratorium in data["moratoria"]:
            if not moratorium["history"]:
                kept_moratoria.append(moratorium)
                continue
            history = [r for r in moratorium["history"] if r["date"] <= day]
            if not history:
                dropped.add(moratorium["id"])
                continue
            kept_moratoria.append(
                {**moratorium, "history": history, "start": history[-1]["start"], "end": history[-1]["end"]}
            )
        kept_exceptions = []
        for exception in data["exceptions"]:
            if exception["moratoria"] != "all":
                remaining = [m for m in exception["moratoria"] if m not in dropped]
                if not remaining:
                    continue
                exception = {**exception, "moratoria": remaining}
            kept_exceptions.append(exception)
        data.update(moratoria=kept_moratoria, exceptions=kept_exceptions)
        return registry_from_dict(data, source=f"<as_of {day}>")


# --- loading --------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _describe(error: ValidationError, data: dict[str, Any]) -> str:
    """One line per problem, locating it by list position and, where there is one, by id."""
    lines = []
    for item in error.errors():
        parts: list[str] = []
        node: Any = data
        for part in item["loc"]:
            node = _child(node, part)
            if isinstance(part, int):
                entry_id = node.get("id") if isinstance(node, dict) else None
                parts[-1] += f"[{part}]" + (f" (id {entry_id!r})" if entry_id else "")
            else:
                parts.append(str(part))
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] != "value_error" and not isinstance(given, (dict, list)):
            message += f" (got {given!r})"
        lines.append(f"{'.'.join(parts)}: {message}" if parts else message)
    return "; ".join(lines)


def _child(node: Any, key: int | str) -> Any:
    """What `key` (a place in pydantic's error location) names in the raw data, or None."""
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return None


def check_floor_models(registry: Registry, known_models: Collection[str], source: str = "<registry>") -> Registry:
    """Check every floor's model against the models the caller knows (family names and exact versions).

    A floor keyed to a family nobody knows (a misspelt `dlib-resnet`) could never apply: RegistryError.
    A floor keyed to an exact version of a known family whose weights are not known here may be meant
    for weights elsewhere: it is kept, logged as a warning, and listed in `unknown_floor_models`.
    """
    known = set(known_models)
    families = {model_family(m) for m in known}
    problems, unknown = [], []
    for purpose in registry.purposes:
        for floor in purpose.floors:
            key = floor.model_version
            if key in known:
                continue
            if ":" in key and model_family(key) in families:
                unknown.append(key)
                if (source, key) in _warned:
                    continue
                _warned.add((source, key))
                _log.warning("%s: purpose %r states a floor for model version %r, which no weights known here "
                             "produce: it applies only where such weights run", source, purpose.id, key)
            else:
                problems.append(f"purpose {purpose.id!r} states a floor for model {key!r}, which is neither a known "
                                f"model family ({', '.join(sorted(f for f in families if ':' not in f))}) nor a "
                                "version of one: it would never apply")
    if problems:
        raise RegistryError(f"{source}: " + "; ".join(problems))
    registry._unknown_floor_models = tuple(dict.fromkeys(unknown))
    return registry


def registry_from_dict(data: Any, source: str = "<dict>", *, known_models: Collection[str] | None = None) -> Registry:
    """Validate registry data already parsed (e.g. a test's variant of the default). Raises RegistryError.
    With `known_models`, floors are checked against them (`check_floor_models`)."""
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: the registry must be a mapping, got {type(data).__name__}")
    try:
        registry = Registry.model_validate(data)
    except ValidationError as error:
        raise RegistryError(f"{source}: {_describe(error, data)}") from None
    return check_floor_models(registry, known_models, source) if known_models is not None else registry


def _read_default() -> tuple[bytes, str]:
    resource = resources.files(__package__ or "policy").joinpath(DEFAULT_REGISTRY_NAME)
    return resource.read_bytes(), str(resource)


def load_registry(path: str | Path | None = None, *, known_models: Collection[str] | None = None) -> Registry:
    """Load and validate a registry file; None loads the shipped `policy/default_registry.yaml`.

    Raises RegistryError naming the file and the problem: missing file, bad YAML, unknown sector,
    reference to an unknown organisation/purpose/moratorium, duplicate ids, misspelt keys, and (with
    `known_models`, the model families and versions the caller knows) a floor for an unknown model.
    """
    if path is None:
        raw, source = _read_default()
    else:
        source = str(path)
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{source}: registry file not found") from None
        except OSError as error:
            raise RegistryError(f"{source}: cannot read registry file: {error.strerror or error}") from None
    try:
        data = yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise RegistryError(f"{source}: invalid YAML: {error}") from None
    if data is None:
        raise RegistryError(f"{source}: the registry file is empty")
    registry = registry_from_dict(data, source=source, known_models=known_models)
    registry._file_hash = hashlib.sha256(raw).hexdigest()
    return registry

