"""The policy decision over the shipped default registry (the Rekognition moratorium of 2020).

Facts behind the dates: shared/design/policy-facts.md. Announced 2020-06-10 for one year (to
2021-06-10), extended "until further notice" in May 2021; Thorn, ICMEC and Marinus Analytics excepted.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from policy import Registry, decide, load_registry, registry_from_dict

MORATORIUM = "rekognition-police-moratorium"
EXCEPTION = "child-safety-exception"
D = dt.date


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture()
def default_data() -> dict:
    """The shipped registry as plain data, for building variants."""
    text = resources.files("policy").joinpath("default_registry.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


# (id, organisation, capability, purpose, instant, allowed, rule id that must be among rule_ids)
DEFAULT_SCOPE_CASES = [
    ("city-police-day-before-moratorium", "city-police-example", "search", "criminal-investigation",
     D(2020, 6, 9), True, "allow.no-moratorium"),
    ("city-police-on-announcement-day", "city-police-example", "search", "criminal-investigation",
     D(2020, 6, 10), False, MORATORIUM),
    ("city-police-day-after-announcement", "city-police-example", "search", "criminal-investigation",
     D(2020, 6, 11), False, MORATORIUM),
    # The original end (2021-06-10) would have allowed this; the May 2021 extension denies it.
    ("city-police-july-2021-after-extension", "city-police-example", "search", "criminal-investigation",
     D(2021, 7, 1), False, MORATORIUM),
    ("city-police-index-covered-too", "city-police-example", "index", "criminal-investigation",
     D(2022, 1, 1), False, MORATORIUM),
    ("city-police-compare-covered-too", "city-police-example", "compare", "criminal-investigation",
     D(2022, 1, 1), False, MORATORIUM),
    # The default registry does not except police for missing persons (see the YAML comment).
    ("city-police-missing-children-not-excepted", "city-police-example", "search", "missing-children",
     D(2022, 1, 1), False, MORATORIUM),
    ("state-police-is-police", "state-police-example", "search", "criminal-investigation",
     D(2022, 1, 1), False, MORATORIUM),
    ("federal-agency-scope-police", "federal-agency-example", "search", "criminal-investigation",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("immigration-agency-scope-police", "immigration-agency-example", "search", "criminal-investigation",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("icmec-missing-children-excepted", "icmec", "search", "missing-children",
     D(2022, 1, 1), True, EXCEPTION),
    ("thorn-trafficking-victims-excepted", "thorn", "search", "trafficking-victims",
     D(2022, 1, 1), True, EXCEPTION),
    ("marinus-index-missing-children-excepted", "marinus-analytics", "index", "missing-children",
     D(2020, 6, 10), True, EXCEPTION),
    ("icmec-photo-library-not-registered", "icmec", "search", "photo-library",
     D(2022, 1, 1), False, "deny.purpose-not-registered"),
    ("photo-archive-photo-library", "photo-archive-example", "search", "photo-library",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("photo-archive-criminal-investigation-not-registered", "photo-archive-example", "search",
     "criminal-investigation", D(2022, 1, 1), False, "deny.purpose-not-registered"),
    ("research-lab-research", "university-lab-example", "compare", "research",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("unknown-organisation", "no-such-org", "search", "photo-library",
     D(2022, 1, 1), False, "deny.unknown-organisation"),
    ("unknown-purpose", "photo-archive-example", "search", "no-such-purpose",
     D(2022, 1, 1), False, "deny.unknown-purpose"),
    ("unknown-capability", "photo-archive-example", "delete-everything", "photo-library",
     D(2022, 1, 1), False, "deny.unknown-capability"),
    ("system-may-reindex", "facegate-system", "index", "system-reindex",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("system-may-not-search", "facegate-system", "search", "system-reindex",
     D(2022, 1, 1), False, "deny.system-sector"),
    ("system-may-not-borrow-another-purpose", "facegate-system", "index", "photo-library",
     D(2022, 1, 1), False, "deny.system-sector"),
    ("system-purpose-reserved-for-system", "photo-archive-example", "index", "system-reindex",
     D(2022, 1, 1), False, "deny.system-purpose-reserved"),
    # 23:30 in New York on 9 June is 04:30 UTC on 10 June: days are UTC days.
    ("city-police-evening-before-in-new-york-is-utc-announcement-day", "city-police-example", "search",
     "criminal-investigation", dt.datetime(2020, 6, 9, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4))),
     False, MORATORIUM),
]

ALL_LAW_ENFORCEMENT_CASES = [
    ("federal-agency-scope-all-law-enforcement", "federal-agency-example", "search", "criminal-investigation",
     D(2022, 1, 1), False, MORATORIUM),
    ("immigration-agency-scope-all-law-enforcement", "immigration-agency-example", "search",
     "criminal-investigation", D(2022, 1, 1), False, MORATORIUM),
    ("federal-agency-before-moratorium-any-scope", "federal-agency-example", "search", "criminal-investigation",
     D(2020, 6, 9), True, "allow.no-moratorium"),
    ("city-police-still-covered", "city-police-example", "search", "criminal-investigation",
     D(2022, 1, 1), False, MORATORIUM),
    ("photo-archive-unaffected-by-scope", "photo-archive-example", "search", "photo-library",
     D(2022, 1, 1), True, "allow.no-moratorium"),
    ("icmec-still-excepted", "icmec", "search", "missing-children", D(2022, 1, 1), True, EXCEPTION),
]


def _check(decision, organisation, allowed, rule_id, registry, at):
    assert decision.allowed is allowed, decision.reason
    assert rule_id in decision.rule_ids, decision.rule_ids
    assert decision.reason.strip(), "every decision explains itself"
    assert organisation in decision.reason, "the reason names the organisation"
    assert decision.reason.startswith("Allowed" if allowed else "Denied")
    assert decision.registry_hash == registry.content_hash


def _ids(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize(
    "case_id, organisation, capability, purpose, at, allowed, rule_id", DEFAULT_SCOPE_CASES, ids=_ids(DEFAULT_SCOPE_CASES)
)
def test_default_registry(registry, case_id, organisation, capability, purpose, at, allowed, rule_id):
    decision = decide(organisation, capability, purpose, at, registry)
    _check(decision, organisation, allowed, rule_id, registry, at)


@pytest.mark.parametrize(
    "case_id, organisation, capability, purpose, at, allowed, rule_id",
    ALL_LAW_ENFORCEMENT_CASES,
    ids=_ids(ALL_LAW_ENFORCEMENT_CASES),
)
def test_scope_all_law_enforcement(registry, case_id, organisation, capability, purpose, at, allowed, rule_id):
    wide = registry.with_scope("all_law_enforcement")
    decision = decide(organisation, capability, purpose, at, wide)
    _check(decision, organisation, allowed, rule_id, wide, at)


def test_denial_names_the_moratorium_and_its_dates(registry):
    decision = decide("city-police-example", "search", "criminal-investigation", D(2021, 7, 1), registry)
    assert MORATORIUM in decision.reason
    assert "2020-06-10" in decision.reason
    assert "until further notice" in decision.reason


def test_scope_widening_is_named_in_the_reason(registry):
    decision = decide(
        "federal-agency-example", "search", "criminal-investigation", D(2022, 1, 1),
        registry.with_scope("all_law_enforcement"),
    )
    assert "all_law_enforcement" in decision.reason


def test_exception_is_named_when_it_allows(registry):
    decision = decide("icmec", "search", "missing-children", D(2022, 1, 1), registry)
    assert decision.rule_ids == [MORATORIUM, EXCEPTION]
    assert EXCEPTION in decision.reason


def test_first_revision_alone_would_have_allowed_july_2021(registry):
    """Before the extension of 2021-05-18, the registry said the moratorium ended on 2021-06-10."""
    before_extension = registry.as_of(D(2021, 5, 17))
    assert before_extension.moratoria[0].end == D(2021, 6, 10)
    assert before_extension.content_hash != registry.content_hash
    july = decide("city-police-example", "search", "criminal-investigation", D(2021, 7, 1), before_extension)
    assert july.allowed, july.reason
    last_day = decide("city-police-example", "search", "criminal-investigation", D(2021, 6, 9), before_extension)
    assert not last_day.allowed
    first_free_day = decide("city-police-example", "search", "criminal-investigation", D(2021, 6, 10), before_extension)
    assert first_free_day.allowed


def test_revision_dated_in_the_future_changes_nothing_before_its_date(default_data):
    """An operator records today that the moratorium will end on 2030-06-01; until the revision's
    date (2030-01-01) the indefinite extension stays in force."""
    moratorium = default_data["moratoria"][0]
    moratorium["history"].append(
        {"date": D(2030, 1, 1), "change": "Lifted from June 2030.", "start": D(2020, 6, 10), "end": D(2030, 6, 1)}
    )
    moratorium["end"] = D(2030, 6, 1)
    registry = registry_from_dict(default_data)
    ask = lambda at: decide("city-police-example", "search", "criminal-investigation", at, registry)  # noqa: E731 -- a one-line helper, clearer inline
    assert not ask(D(2029, 12, 31)).allowed
    assert "until further notice" in ask(D(2029, 12, 31)).reason
    assert not ask(D(2030, 5, 31)).allowed
    assert ask(D(2030, 6, 1)).allowed


def _with_exception_dates(data: dict, valid_from: dt.date, valid_until: dt.date | None) -> Registry:
    data = copy.deepcopy(data)
    exception = next(e for e in data["exceptions"] if e["id"] == EXCEPTION)
    exception.update(valid_from=valid_from, valid_until=valid_until)
    return registry_from_dict(data)


def test_lapsed_exception_denies_and_says_when_it_lapsed(default_data):
    registry = _with_exception_dates(default_data, D(2020, 6, 10), D(2023, 1, 1))
    before = decide("icmec", "search", "missing-children", D(2022, 12, 31), registry)
    assert before.allowed, before.reason
    after = decide("icmec", "search", "missing-children", D(2023, 1, 1), registry)
    assert not after.allowed
    assert after.rule_ids == [MORATORIUM, EXCEPTION]
    assert "icmec" in after.reason and EXCEPTION in after.reason
    assert "lapsed on 2023-01-01" in after.reason


def test_exception_not_yet_valid_denies(default_data):
    registry = _with_exception_dates(default_data, D(2021, 1, 1), None)
    early = decide("thorn", "search", "missing-children", D(2020, 7, 1), registry)
    assert not early.allowed
    assert "valid only from 2021-01-01" in early.reason
    assert decide("thorn", "search", "missing-children", D(2021, 1, 1), registry).allowed


def test_exception_needs_both_organisation_and_purpose_to_match(default_data):
    """The child-safety exception names organisations AND purposes: a police force declaring
    missing-children is not excepted by it."""
    registry = registry_from_dict(default_data)
    decision = decide("state-police-example", "search", "missing-children", D(2022, 1, 1), registry)
    assert not decision.allowed
    assert decision.rule_ids == [MORATORIUM]


def test_purpose_only_exception_excepts_police_for_that_purpose(default_data):
    """The contract's missing-persons language, enabled as the YAML comment shows."""
    default_data["exceptions"].append(
        {"id": "police-missing-persons-exception", "moratoria": [MORATORIUM], "purposes": ["missing-children"],
         "valid_from": D(2020, 6, 10), "valid_until": None}
    )
    registry = registry_from_dict(default_data)
    assert decide("city-police-example", "search", "missing-children", D(2022, 1, 1), registry).allowed
    assert not decide("city-police-example", "search", "criminal-investigation", D(2022, 1, 1), registry).allowed


def test_decision_is_a_replayable_value(registry):
    at = dt.datetime(2021, 7, 1, 12, 0, tzinfo=dt.timezone.utc)
    first = decide("city-police-example", "search", "criminal-investigation", at, registry)
    again = decide("city-police-example", "search", "criminal-investigation", at, registry)
    assert first == again
    assert first.at == at
    assert (first.organisation_id, first.capability, first.purpose) == (
        "city-police-example", "search", "criminal-investigation",
    )
    with pytest.raises(ValidationError, match="frozen"):
        first.allowed = True


def test_naive_datetime_is_refused(registry):
    with pytest.raises(ValueError, match="timezone"):
        decide("city-police-example", "search", "criminal-investigation", dt.datetime(2021, 7, 1), registry)


def test_policy_imports_nothing_from_other_packages():
    """policy/ stands alone: no workers, scheduler, index, facegate or cli imports."""
    forbidden = {"workers", "scheduler", "index", "facegate", "cli"}
    package = Path(__file__).resolve().parent.parent / "policy"
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{source.name} imports {name}"


def test_erasure_is_a_capability_no_moratorium_holds_back(registry):
    """The erasure rule lives in policy: `decide` allows it where the same organisation may not search."""
    from policy import ERASE_CAPABILITY, held_back_by_moratoria

    at = D(2023, 1, 1)  # the moratorium on police is in force
    assert not decide("city-police-example", "search", "criminal-investigation", at, registry).allowed
    erasure = decide("city-police-example", ERASE_CAPABILITY, "erasure", at, registry)
    assert erasure.allowed and erasure.rule_ids == ["allow.erasure"]
    assert erasure.capability == "erase" and "never held back" in erasure.reason
    assert not held_back_by_moratoria(ERASE_CAPABILITY)
    assert all(held_back_by_moratoria(c) for c in ("index", "search", "compare"))
