"""Loading and validating the moratorium registry; threshold floors and human review."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from importlib import resources
from pathlib import Path

import pytest
import yaml

from policy import (
    LAW_ENFORCEMENT_SECTORS,
    RegistryError,
    check_threshold,
    is_law_enforcement,
    load_registry,
    registry_from_dict,
    requires_human_review,
)

DEFAULT_TEXT = resources.files("policy").joinpath("default_registry.yaml").read_text(encoding="utf-8")


@pytest.fixture()
def data() -> dict:
    return yaml.safe_load(DEFAULT_TEXT)


def _write(tmp_path: Path, data: dict, name: str = "registry.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _org(data: dict, org_id: str) -> dict:
    return next(o for o in data["organisations"] if o["id"] == org_id)


# --- the shipped default ------------------------------------------------------------------------


def test_default_registry_encodes_the_rekognition_moratorium():
    registry = load_registry()
    assert registry.scope == "police"
    (moratorium,) = registry.moratoria
    assert moratorium.covers_sectors == ["police"]
    assert sorted(moratorium.capabilities) == ["compare", "index", "search"]
    assert (moratorium.start, moratorium.end) == (dt.date(2020, 6, 10), None)
    assert [(r.date, r.end) for r in moratorium.history] == [
        (dt.date(2020, 6, 10), dt.date(2021, 6, 10)),
        (dt.date(2021, 5, 18), None),
    ]
    (exception,) = registry.exceptions
    assert sorted(exception.organisations) == ["icmec", "marinus-analytics", "thorn"]
    assert sorted(exception.purposes) == ["missing-children", "trafficking-victims"]
    assert (exception.valid_from, exception.valid_until) == (dt.date(2020, 6, 10), None)
    assert registry.organisation("icmec").name == "International Center for Missing & Exploited Children"
    assert registry.organisation("state-police-example").sector == "police"
    assert registry.organisation("facegate-system").sector == "system"


def test_law_enforcement_sectors():
    assert LAW_ENFORCEMENT_SECTORS == {
        "police", "federal_law_enforcement", "state_law_enforcement", "immigration_enforcement",
    }
    assert is_law_enforcement("immigration_enforcement")
    assert not is_law_enforcement("child_safety")
    assert not is_law_enforcement("system")


def test_with_scope_widens_police_moratoria_and_changes_the_hash():
    registry = load_registry()
    wide = registry.with_scope("all_law_enforcement")
    assert wide.scope == "all_law_enforcement"
    assert wide.covered_sectors(wide.moratoria[0]) == LAW_ENFORCEMENT_SECTORS
    assert registry.covered_sectors(registry.moratoria[0]) == {"police"}
    assert wide.content_hash != registry.content_hash
    assert registry.with_scope("police") is registry
    with pytest.raises(RegistryError, match="scope"):
        registry.with_scope("everyone")


# --- content hash -------------------------------------------------------------------------------


def test_content_hash_is_sha256_of_the_file_bytes():
    raw = resources.files("policy").joinpath("default_registry.yaml").read_bytes()
    assert load_registry().content_hash == hashlib.sha256(raw).hexdigest()


def test_content_hash_changes_when_the_file_changes(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(DEFAULT_TEXT, encoding="utf-8")
    first = load_registry(path).content_hash
    assert load_registry(path).content_hash == first  # stable
    path.write_text(DEFAULT_TEXT + "\n# reviewed by the policy board\n", encoding="utf-8")
    assert load_registry(path).content_hash != first  # even a comment is a new version


def test_registry_built_in_code_has_a_stable_canonical_hash(data):
    first = registry_from_dict(copy.deepcopy(data)).content_hash
    assert registry_from_dict(copy.deepcopy(data)).content_hash == first
    data["organisations"][0]["name"] = "Thorn (renamed)"
    assert registry_from_dict(data).content_hash != first


# --- loading errors -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(RegistryError, match="not found") as error:
        load_registry(missing)
    assert str(missing) in str(error.value)


def test_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("scope: police\norganisations: [unclosed\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="invalid YAML") as error:
        load_registry(path)
    assert "broken.yaml" in str(error.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="empty"):
        load_registry(path)


def test_unknown_sector(tmp_path, data):
    _org(data, "photo-archive-example")["sector"] = "bounty_hunters"
    path = _write(tmp_path, data, "bad-sector.yaml")
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    message = str(error.value)
    assert "bad-sector.yaml" in message and "sector" in message and "bounty_hunters" in message


def test_exception_naming_an_unknown_organisation(tmp_path, data):
    data["exceptions"][0]["organisations"].append("acme-surveillance")
    with pytest.raises(RegistryError, match="exception 'child-safety-exception' refers to unknown organisation 'acme-surveillance'"):
        load_registry(_write(tmp_path, data))


def test_exception_naming_an_unknown_purpose(tmp_path, data):
    data["exceptions"][0]["purposes"].append("general-surveillance")
    with pytest.raises(RegistryError, match="unknown purpose 'general-surveillance'"):
        load_registry(_write(tmp_path, data))


def test_exception_naming_an_unknown_moratorium(data):
    data["exceptions"][0]["moratoria"] = ["no-such-moratorium"]
    with pytest.raises(RegistryError, match="unknown moratorium 'no-such-moratorium'"):
        registry_from_dict(data)


def test_moratorium_covering_an_unknown_organisation(data):
    data["moratoria"][0]["covers_organisations"].append("ghost-org")
    with pytest.raises(RegistryError, match="covers unknown organisation 'ghost-org'"):
        registry_from_dict(data)


def test_organisation_allowing_an_unknown_purpose(data):
    _org(data, "icmec")["allowed_purposes"].append("marketing")
    with pytest.raises(RegistryError, match="allows unknown purpose 'marketing'"):
        registry_from_dict(data)


def test_duplicate_ids(tmp_path, data):
    data["organisations"].append(copy.deepcopy(_org(data, "thorn")))
    with pytest.raises(RegistryError, match="duplicate organisation id.*thorn") as error:
        load_registry(_write(tmp_path, data, "dupes.yaml"))
    assert "dupes.yaml" in str(error.value)


def test_duplicate_key_in_yaml(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(DEFAULT_TEXT.replace("scope: police\n", "scope: police\nscope: all_law_enforcement\n"), encoding="utf-8")
    with pytest.raises(RegistryError, match="duplicate key 'scope'"):
        load_registry(path)


def test_misspelt_key_is_refused(data):
    data["exceptions"][0]["valid_unitl"] = data["exceptions"][0].pop("valid_until")
    with pytest.raises(RegistryError, match="valid_unitl"):
        registry_from_dict(data)


def test_top_level_dates_must_match_the_latest_revision(data):
    data["moratoria"][0]["end"] = dt.date(2021, 6, 10)  # forgot the extension at the top
    with pytest.raises(RegistryError, match="differ from its latest revision of 2021-05-18"):
        registry_from_dict(data)


def test_history_must_be_in_date_order(data):
    data["moratoria"][0]["history"].reverse()
    with pytest.raises(RegistryError, match="date order"):
        registry_from_dict(data)


def test_exception_for_everyone_is_refused(data):
    exception = data["exceptions"][0]
    exception.pop("organisations")
    exception.pop("purposes")
    with pytest.raises(RegistryError, match="must name organisations or purposes"):
        registry_from_dict(data)


def test_ids_must_not_look_like_fixed_rule_ids(data):
    data["moratoria"][0]["id"] = "allow.everything"
    with pytest.raises(RegistryError, match="reserved"):
        registry_from_dict(data)


# --- threshold floors and human review -----------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_threshold_below_the_floor_is_refused_and_names_floor_and_model(registry):
    decision = check_threshold("missing-children", 0.50, "untrained-seed0", registry)
    assert not decision.allowed
    assert decision.rule_ids == ["deny.threshold-below-floor"]
    assert (
        "threshold 0.50 is below the floor 0.95 for purpose 'missing-children' with model version 'untrained-seed0'"
        in decision.reason
    )
    assert decision.registry_hash == registry.content_hash


def test_floors_are_per_model_version(registry):
    assert check_threshold("missing-children", 0.85, "facenet-vggface2", registry).allowed
    assert not check_threshold("missing-children", 0.85, "untrained-seed0", registry).allowed
    assert check_threshold("missing-children", 0.95, "untrained-seed0", registry).allowed  # at the floor


def test_unknown_model_version_falls_back_to_the_default_floor(registry):
    decision = check_threshold("photo-library", 0.70, "some-new-model-v3", registry)
    assert not decision.allowed
    assert "default floor" in decision.reason and "0.80" in decision.reason and "some-new-model-v3" in decision.reason


def test_a_close_miss_is_not_rounded_up_to_the_floor(registry):
    decision = check_threshold("photo-library", 0.795, "untrained-seed0", registry)
    assert not decision.allowed
    assert "0.795" in decision.reason


def test_purpose_without_any_floor_refuses_every_search(registry):
    decision = check_threshold("system-reindex", 0.99, "untrained-seed0", registry)
    assert not decision.allowed
    assert decision.rule_ids == ["deny.no-floor-for-model"]


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), 1.5, -2.0], ids=["nan", "inf", "above-1", "below-minus-1"])
def test_invalid_thresholds_are_refused(registry, threshold):
    decision = check_threshold("research", threshold, "untrained-seed0", registry)
    assert not decision.allowed
    assert decision.rule_ids == ["deny.threshold-invalid"]


def test_threshold_for_unknown_purpose(registry):
    assert check_threshold("no-such-purpose", 0.99, "untrained-seed0", registry).rule_ids == ["deny.unknown-purpose"]


def test_human_review_flag(registry):
    assert requires_human_review("missing-children", registry)
    assert requires_human_review("trafficking-victims", registry)
    assert requires_human_review("criminal-investigation", registry)
    assert not requires_human_review("photo-library", registry)
    assert requires_human_review("no-such-purpose", registry)  # unknown: the safe answer
