"""The pure policy decision: may this organisation use this capability for this purpose at this instant?

Pure on purpose: no clock, database or network. The instant is a parameter and the registry is a
value, so a decision can be replayed from an audit row (organisation, capability, purpose, instant,
registry hash) and come out the same.

Deny by default: anything not known to the registry is refused, and every refusal says why.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from .registry import (
    CAPABILITIES,
    ERASE_CAPABILITY,
    ExceptionRule,
    Moratorium,
    Organisation,
    Purpose,
    Registry,
    model_family,
)

__all__ = [
    "SYSTEM_PURPOSE",
    "Decision",
    "ThresholdForFmr",
    "check_threshold",
    "decide",
    "FloorInForce",
    "effective_floor",
    "floor_in_force",
    "requires_human_review",
]

# The one purpose, and the one capability, the `system` sector may use (nightly reindexing).
SYSTEM_PURPOSE = "system-reindex"
SYSTEM_CAPABILITY = "index"

# Fixed rule ids, for decisions no registry entry made.
DENY_UNKNOWN_CAPABILITY = "deny.unknown-capability"
DENY_UNKNOWN_ORGANISATION = "deny.unknown-organisation"
DENY_UNKNOWN_PURPOSE = "deny.unknown-purpose"
DENY_PURPOSE_NOT_REGISTERED = "deny.purpose-not-registered"
DENY_SYSTEM_SECTOR = "deny.system-sector"
DENY_SYSTEM_PURPOSE_RESERVED = "deny.system-purpose-reserved"
ALLOW_NO_MORATORIUM = "allow.no-moratorium"
ALLOW_ERASURE = "allow.erasure"
DENY_THRESHOLD_BELOW_FLOOR = "deny.threshold-below-floor"
DENY_THRESHOLD_INVALID = "deny.threshold-invalid"
DENY_NO_FLOOR = "deny.no-floor-for-model"
# The purpose states its floor as a false-match rate and the model version has no calibration that can
# translate it into a similarity threshold.
DENY_NO_CALIBRATION = "deny.no-calibration"
ALLOW_THRESHOLD = "allow.threshold-at-or-above-floor"


class Decision(BaseModel):
    """The outcome, the rules that made it, one readable sentence, and what it was decided against."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    # Moratorium and exception ids from the registry, or fixed ids such as `deny.unknown-purpose`.
    rule_ids: list[str]
    reason: str
    registry_hash: str
    # The instant decided for (a timezone-aware datetime in UTC, or a UTC day); None for threshold checks.
    at: dt.datetime | dt.date | None = None
    organisation_id: str | None = None
    capability: str | None = None
    purpose: str | None = None


def _utc_day(at: dt.datetime | dt.date) -> tuple[dt.datetime | dt.date, dt.date]:
    """(the instant normalised to UTC, its UTC day). Naive datetimes are refused: their day is a guess."""
    if isinstance(at, dt.datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"instant {at.isoformat()} has no timezone; pass an aware datetime (UTC) or a date")
        at = at.astimezone(dt.timezone.utc)
        return at, at.date()
    if isinstance(at, dt.date):
        return at, at
    raise TypeError(f"instant must be a datetime or a date, got {type(at).__name__}")


def _period(start: dt.date, end: dt.date | None, open_end: str = "until further notice") -> str:
    return f"from {start} {open_end}" if end is None else f"from {start} until {end}"


def _who(organisation: Organisation) -> str:
    return f"organisation '{organisation.id}' ({organisation.name}, sector {organisation.sector})"


def decide(
    organisation_id: str,
    capability: str,
    purpose: str,
    at: dt.datetime | dt.date,
    registry: Registry,
) -> Decision:
    """Decide whether `organisation_id` may use `capability` for `purpose` at instant `at`.

    `at` is a timezone-aware datetime or a UTC day; moratoria and exceptions are compared by UTC day.
    Order of rules: erasure is always allowed; unknown capability/organisation/purpose; the system sector's confinement; the
    organisation's declared purposes; then every moratorium in force that covers the organisation and
    capability, each of which denies unless a valid exception matches the organisation and purpose.
    """
    at, day = _utc_day(at)

    def outcome(allowed: bool, rule_ids: list[str], reason: str) -> Decision:
        return Decision(
            allowed=allowed,
            rule_ids=rule_ids,
            reason=reason,
            registry_hash=registry.content_hash,
            at=at,
            organisation_id=organisation_id,
            capability=capability,
            purpose=purpose,
        )

    if capability == ERASE_CAPABILITY:
        # Never held back, and asked for only by those the scheduler's access rule let erase (the owner,
        # an administrator, the system retiring a rebuilt generation): no registry entry can refuse it.
        return outcome(
            True,
            [ALLOW_ERASURE],
            f"Allowed: erasure by organisation '{organisation_id}' is never held back by a moratorium.",
        )
    if capability not in CAPABILITIES:
        return outcome(
            False,
            [DENY_UNKNOWN_CAPABILITY],
            f"Denied: organisation '{organisation_id}' asked for unknown capability '{capability}' "
            f"(known: {', '.join(CAPABILITIES)}).",
        )
    organisation = registry.organisation(organisation_id)
    if organisation is None:
        return outcome(
            False,
            [DENY_UNKNOWN_ORGANISATION],
            f"Denied: organisation '{organisation_id}' is not in the registry.",
        )
    if registry.purpose(purpose) is None:
        return outcome(
            False,
            [DENY_UNKNOWN_PURPOSE],
            f"Denied: {_who(organisation)} declared purpose '{purpose}', which is not in the registry.",
        )

    # FaceGate's own submitter may only reindex, and nobody else may borrow its purpose.
    if organisation.sector == "system" and (purpose != SYSTEM_PURPOSE or capability != SYSTEM_CAPABILITY):
        return outcome(
            False,
            [DENY_SYSTEM_SECTOR],
            f"Denied: {_who(organisation)} may only use capability '{SYSTEM_CAPABILITY}' for purpose "
            f"'{SYSTEM_PURPOSE}', not '{capability}' for '{purpose}'.",
        )
    if organisation.sector != "system" and purpose == SYSTEM_PURPOSE:
        return outcome(
            False,
            [DENY_SYSTEM_PURPOSE_RESERVED],
            f"Denied: purpose '{SYSTEM_PURPOSE}' is reserved for the system sector, "
            f"and {_who(organisation)} is not in it.",
        )

    if purpose not in organisation.allowed_purposes:
        return outcome(
            False,
            [DENY_PURPOSE_NOT_REGISTERED],
            f"Denied: purpose '{purpose}' is not among those registered for {_who(organisation)} "
            f"({', '.join(organisation.allowed_purposes) or 'none'}).",
        )

    covering = [
        m
        for m in registry.moratoria
        if capability in m.capabilities and registry.covers(m, organisation) and m.applies_on(day)
    ]
    if not covering:
        return outcome(
            True,
            [ALLOW_NO_MORATORIUM],
            f"Allowed: no moratorium in force on {day} covers {_who(organisation)} for capability "
            f"'{capability}', and purpose '{purpose}' is registered for it.",
        )

    # Every covering moratorium must be excepted; the first one that is not decides the denial.
    excepted: list[tuple[Moratorium, ExceptionRule]] = []
    for moratorium in covering:
        start, end, _ = moratorium.in_force(day)  # type: ignore[misc]  # applies_on() => in force
        candidates = [
            e for e in registry.exceptions if e.excepts(moratorium.id) and e.matches(organisation.id, purpose)
        ]
        valid = next((e for e in candidates if e.valid_on(day)), None)
        if valid is not None:
            excepted.append((moratorium, valid))
            continue
        # Say so when only the scope switch brought this sector under a moratorium on police.
        through_scope = (
            f" through scope '{registry.scope}'"
            if organisation.id not in moratorium.covers_organisations
            and organisation.sector not in moratorium.covers_sectors
            else ""
        )
        covered = (
            f"{_who(organisation)} is covered{through_scope} by moratorium '{moratorium.id}' "
            f"({moratorium.title}), in force {_period(start, end)}, for capability '{capability}'"
        )
        lapsed = [e for e in candidates if e.valid_until is not None and e.valid_until <= day]
        pending = [e for e in candidates if e.valid_from > day]
        if lapsed:
            # mypy is told to look away below: `lapsed` holds only exceptions whose valid_until is set (filtered above).
            last = max(lapsed, key=lambda e: e.valid_until)  # type: ignore[arg-type, return-value]
            return outcome(
                False,
                [moratorium.id, last.id],
                f"Denied: {covered}; exception '{last.id}' for purpose '{purpose}' lapsed on {last.valid_until}.",
            )
        if pending:
            first = min(pending, key=lambda e: e.valid_from)
            return outcome(
                False,
                [moratorium.id, first.id],
                f"Denied: {covered}; exception '{first.id}' for purpose '{purpose}' is valid only from "
                f"{first.valid_from}.",
            )
        return outcome(False, [moratorium.id], f"Denied: {covered}, and no exception covers purpose '{purpose}'.")

    rule_ids = [rule_id for m, e in excepted for rule_id in (m.id, e.id)]
    exceptions_text = "; ".join(
        f"moratorium '{m.id}' is excepted by '{e.id}' (valid {_period(e.valid_from, e.valid_until, 'with no end')})"
        for m, e in excepted
    )
    return outcome(
        True,
        list(dict.fromkeys(rule_ids)),
        f"Allowed: {_who(organisation)} may use capability '{capability}' for purpose '{purpose}' "
        f"on {day}: {exceptions_text}.",
    )


def _number(value: float) -> str:
    """Two decimals, unless that would hide the difference (0.795 must not read as 0.80)."""
    text = f"{value:.2f}"
    return text if float(text) == value else f"{value:.6g}"


# (model_version, false-match rate) -> the similarity threshold that gives at most that rate for that
# model version, or None when the version has no calibration. It may raise ValueError when a
# calibration exists but cannot state the rate (too few impostor pairs). Supplied by the caller (the
# scheduler and the workers read calibration files); policy itself reads no files.
ThresholdForFmr = Callable[[str, float], "float | None"]


class _Floor(NamedTuple):
    value: float | None  # None: no floor applies (similarity floor absent and no FMR floor)
    description: str  # e.g. "the floor 0.80", for reasons
    rule_id: str | None = None  # set when the floor cannot be established: the denial's rule
    reason: str | None = None  # ... and its reason


def _fmr(value: float) -> str:
    return f"{value:g}"


def _purpose_floor(entry: Purpose, model_version: str, threshold_for_fmr: ThresholdForFmr | None) -> _Floor:
    """The lowest similarity threshold `entry` allows for `model_version`, and how to name it."""
    similarity_floor, source = entry.floor_for(model_version)
    which = {
        "version": "floor",
        "family": f"floor for model family '{model_family(model_version)}'",
        "default": "default floor (this model has no floor of its own)",
        None: "floor",
    }[source]
    similarity_text = f"the {which} {_number(similarity_floor)}" if similarity_floor is not None else ""
    target = entry.max_false_match_rate
    if target is None:
        if similarity_floor is None:
            return _Floor(
                None,
                "",
                DENY_NO_FLOOR,
                f"Denied: purpose '{entry.id}' states no similarity floor for model version '{model_version}' "
                f"and no default floor.",
            )
        return _Floor(similarity_floor, similarity_text)

    stated = f"purpose '{entry.id}' states its floor as a false-match rate of at most {_fmr(target)}"
    try:
        fmr_threshold = threshold_for_fmr(model_version, target) if threshold_for_fmr is not None else None
    except ValueError as problem:
        return _Floor(
            None,
            "",
            DENY_NO_CALIBRATION,
            f"Denied: {stated}, and the calibration of model version '{model_version}' cannot state that "
            f"rate: {problem}",
        )
    if fmr_threshold is None:
        return _Floor(
            None,
            "",
            DENY_NO_CALIBRATION,
            f"Denied: {stated}, and model version '{model_version}' has no calibration (similarity to "
            f"false-match rate), so no similarity threshold is known to give that rate. Calibrate it with "
            f"`facegate evaluate` on a reference dataset embedded by '{model_version}'.",
        )
    fmr_text = (
        f"the calibrated threshold {_number(fmr_threshold)} for a false-match rate of at most {_fmr(target)} "
        f"with model version '{model_version}'"
    )
    if similarity_floor is not None and similarity_floor > fmr_threshold:
        return _Floor(similarity_floor, f"{similarity_text}, which is above {fmr_text}")
    if similarity_floor is not None:
        return _Floor(fmr_threshold, f"{fmr_text} (above the similarity {which} {_number(similarity_floor)})")
    return _Floor(fmr_threshold, fmr_text)


class FloorInForce(NamedTuple):
    """The floor that applies to one purpose and model version, and where it came from."""

    value: float | None  # None: no floor can be established (every search is refused)
    source: str  # "version", "family", "default", "calibration", or "refused"
    description: str  # the sentence the gate's decisions use (or the reason of the refusal)


def floor_in_force(
    purpose: str, model_version: str, registry: Registry, threshold_for_fmr: ThresholdForFmr | None = None
) -> FloorInForce:
    """What `check_threshold` enforces for `purpose` and `model_version`, said the way `policy show` says it."""
    entry = registry.purpose(purpose)
    if entry is None:
        return FloorInForce(None, "refused", f"purpose '{purpose}' is not in the registry")
    floor = _purpose_floor(entry, model_version, threshold_for_fmr)
    if floor.value is None:
        return FloorInForce(None, "refused", floor.reason or "")
    similarity, kind = entry.floor_for(model_version)
    source: str = kind or "default"
    if entry.max_false_match_rate is not None and (similarity is None or floor.value != similarity):
        source = "calibration"
    return FloorInForce(floor.value, source, floor.description)


def effective_floor(
    purpose: str, model_version: str, registry: Registry, threshold_for_fmr: ThresholdForFmr | None = None
) -> float | None:
    """The lowest threshold `purpose` allows for `model_version`: its similarity floor, or the threshold its
    false-match-rate floor translates to through `threshold_for_fmr`, whichever is higher. None when the
    purpose is unknown or no floor can be established (check_threshold then says why it denies)."""
    entry = registry.purpose(purpose)
    if entry is None:
        return None
    return _purpose_floor(entry, model_version, threshold_for_fmr).value


def check_threshold(
    purpose: str,
    threshold: float,
    model_version: str,
    registry: Registry,
    threshold_for_fmr: ThresholdForFmr | None = None,
) -> Decision:
    """Refuse a search threshold below the purpose's floor for `model_version` (or the purpose's default
    floor when that version has none). A purpose with no applicable floor refuses every threshold: a
    similarity number means nothing for a model nobody calibrated.

    A purpose that states `max_false_match_rate` needs `threshold_for_fmr` to translate that rate into a
    similarity for `model_version`; without a calibration for the version the search is refused
    (`deny.no-calibration`). With both kinds of floor, the higher one applies, and the reason names the
    rate and the threshold it became."""

    def outcome(allowed: bool, rule_id: str, reason: str) -> Decision:
        return Decision(
            allowed=allowed, rule_ids=[rule_id], reason=reason, registry_hash=registry.content_hash, purpose=purpose
        )

    entry = registry.purpose(purpose)
    if entry is None:
        return outcome(False, DENY_UNKNOWN_PURPOSE, f"Denied: purpose '{purpose}' is not in the registry.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        return outcome(False, DENY_THRESHOLD_INVALID, f"Denied: threshold {threshold!r} is not a finite number.")
    if not -1.0 <= threshold <= 1.0:
        return outcome(
            False,
            DENY_THRESHOLD_INVALID,
            f"Denied: threshold {_number(threshold)} is outside the cosine similarity range [-1, 1].",
        )
    floor = _purpose_floor(entry, model_version, threshold_for_fmr)
    if floor.value is None:
        assert floor.rule_id is not None and floor.reason is not None
        return outcome(False, floor.rule_id, floor.reason)
    if threshold < floor.value:
        return outcome(
            False,
            DENY_THRESHOLD_BELOW_FLOOR,
            f"Denied: threshold {_number(threshold)} is below {floor.description} for purpose "
            f"'{purpose}' with model version '{model_version}'.",
        )
    return outcome(
        True,
        ALLOW_THRESHOLD,
        f"Allowed: threshold {_number(threshold)} is at or above {floor.description} for purpose "
        f"'{purpose}' with model version '{model_version}'.",
    )


def requires_human_review(purpose: str, registry: Registry) -> bool:
    """Whether matches for `purpose` need a person's confirmation; True for an unknown purpose (the
    safe answer; `decide` refuses unknown purposes anyway)."""
    entry = registry.purpose(purpose)
    return True if entry is None else entry.human_review_required


def reviewers_required(purpose: str, registry: Registry) -> int:
    """How many different reviewers must confirm a match for `purpose` (at least 1 once anyone reviews
    it); 2 for an unknown purpose (the safe answer)."""
    entry = registry.purpose(purpose)
    return 2 if entry is None else max(1, entry.reviewers_required)
