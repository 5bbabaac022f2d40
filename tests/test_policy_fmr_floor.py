"""Floors stated as a false-match rate: translated per model version by a calibration the caller supplies."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from policy import RegistryError, check_threshold, effective_floor, load_registry, registry_from_dict

DEFAULT = yaml.safe_load(resources.files("policy").joinpath("default_registry.yaml").read_text(encoding="utf-8"))
VERSION = "inception-resnet-v1:0123456789abcdef"


def _registry(max_fmr=1e-3, **purpose_fields):
    data = yaml.safe_load(yaml.safe_dump(DEFAULT))
    data["purposes"].append({"id": "stated-as-fmr", "description": "Floor stated as a false-match rate.",
                             "human_review_required": True, "max_false_match_rate": max_fmr, **purpose_fields})
    return registry_from_dict(data)


def _calibrated(table: dict[str, float]):
    """A stand-in for the calibration store: model version -> the threshold for any rate asked."""
    asked = []

    def threshold_for_fmr(model_version: str, fmr: float) -> float | None:
        asked.append((model_version, fmr))
        return table.get(model_version)

    threshold_for_fmr.asked = asked  # type: ignore[attr-defined]  # a test probe on a function object
    return threshold_for_fmr


def test_the_rate_becomes_the_calibrated_threshold_of_the_model_version():
    registry = _registry(1e-3)
    lookup = _calibrated({VERSION: 0.71})
    assert effective_floor("stated-as-fmr", VERSION, registry, lookup) == 0.71
    assert lookup.asked[-1] == (VERSION, 1e-3)
    allowed = check_threshold("stated-as-fmr", 0.71, VERSION, registry, lookup)
    assert allowed.allowed and allowed.rule_ids == ["allow.threshold-at-or-above-floor"]
    assert "calibrated threshold 0.71 for a false-match rate of at most 0.001" in allowed.reason
    denied = check_threshold("stated-as-fmr", 0.70, VERSION, registry, lookup)
    assert not denied.allowed and denied.rule_ids == ["deny.threshold-below-floor"]
    assert ("threshold 0.70 is below the calibrated threshold 0.71 for a false-match rate of at most 0.001"
            in denied.reason)
    assert VERSION in denied.reason and "stated-as-fmr" in denied.reason


def test_no_calibration_for_the_version_refuses_naming_version_and_rate():
    registry = _registry(1e-5, default_min_similarity=0.5)
    for lookup in (_calibrated({"some-other-version": 0.6}), None):
        decision = check_threshold("stated-as-fmr", 0.99, VERSION, registry, lookup)
        assert not decision.allowed and decision.rule_ids == ["deny.no-calibration"]
        assert f"model version '{VERSION}' has no calibration" in decision.reason
        assert "false-match rate of at most 1e-05" in decision.reason
        assert effective_floor("stated-as-fmr", VERSION, registry, lookup) is None


def test_a_calibration_that_cannot_state_the_rate_refuses_with_its_reason():
    def too_coarse(model_version: str, fmr: float) -> float:
        raise ValueError(f"FMR target {fmr:g} is below the resolution limit 0.001")

    decision = check_threshold("stated-as-fmr", 0.99, VERSION, _registry(1e-5), too_coarse)
    assert decision.rule_ids == ["deny.no-calibration"]
    assert "cannot state that rate" in decision.reason and "resolution limit 0.001" in decision.reason


def test_with_both_kinds_of_floor_the_higher_applies():
    lookup = _calibrated({VERSION: 0.71})
    similarity_higher = _registry(1e-3, floors=[{"model_version": VERSION, "min_similarity": 0.8}])
    assert effective_floor("stated-as-fmr", VERSION, similarity_higher, lookup) == 0.8
    denied = check_threshold("stated-as-fmr", 0.75, VERSION, similarity_higher, lookup)
    assert not denied.allowed
    assert "the floor 0.80, which is above the calibrated threshold 0.71" in denied.reason

    calibrated_higher = _registry(1e-3, default_min_similarity=0.6)
    assert effective_floor("stated-as-fmr", VERSION, calibrated_higher, lookup) == 0.71
    denied = check_threshold("stated-as-fmr", 0.65, VERSION, calibrated_higher, lookup)
    assert not denied.allowed and "0.71" in denied.reason and "0.60" in denied.reason


def test_purposes_without_a_rate_never_ask_for_a_calibration():
    def must_not_be_called(model_version: str, fmr: float) -> float:
        raise AssertionError("a similarity-only purpose asked for a calibration")

    registry = load_registry()
    assert all(p.max_false_match_rate is None for p in registry.purposes)  # shipped behaviour unchanged
    assert check_threshold("missing-children", 0.95, "untrained-seed0", registry, must_not_be_called).allowed
    assert not check_threshold("missing-children", 0.9, "untrained-seed0", registry, must_not_be_called).allowed
    assert effective_floor("photo-library", "untrained-seed0", registry, must_not_be_called) == 0.8
    assert effective_floor("system-reindex", "untrained-seed0", registry) is None
    assert effective_floor("no-such-purpose", "untrained-seed0", registry) is None


@pytest.mark.parametrize("value", [0, -1e-3, 1.5])
def test_the_rate_must_be_a_probability_above_zero(value):
    with pytest.raises(RegistryError, match="max_false_match_rate"):
        _registry(value)


def test_the_rate_reads_from_yaml_in_either_notation(tmp_path):
    for text in ("1.0e-5", "1e-5", "0.00001"):
        source = yaml.safe_dump(DEFAULT, sort_keys=False).replace(
            "\npurposes:\n",
            "\npurposes:\n- id: stated-as-fmr\n  description: x\n  human_review_required: true\n"
            f"  max_false_match_rate: {text}\n",
            1,
        )
        path = tmp_path / "registry.yaml"
        path.write_text(source, encoding="utf-8")
        assert load_registry(path).purpose("stated-as-fmr").max_false_match_rate == pytest.approx(1e-5)
