"""Floors per model: what `facegate policy show` says is in force is what the gate enforces, for every
model version FaceGate can produce here; floors for unknown models are refused or reported."""

from __future__ import annotations

import json

import pytest
import yaml

from facegate.audit import AuditLog
from facegate.embedding_models import (
    DLIB_RESNET_V1,
    FACENET_VGGFACE2,
    dlib_version,
    known_model_versions,
    untrained_version,
    version_for,
)
from policy import RegistryError, check_threshold, load_registry
from policy.registry import DEFAULT_REGISTRY_NAME
from scheduler.access import load_policy
from scheduler.gate import SubmissionGate
from tests.conftest import ROOT, make_settings
from tests.e2e import env_for, run_cli

# A VGGFace2 weights file this machine is configured with (its bytes are not needed to name its version).
VGGFACE2_SHA = "ab" * 32


def _show(settings) -> dict:
    done = run_cli(["policy", "show", "--json"], env_for(settings))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_policy_show_and_the_gate_agree_for_every_model_version(tmp_path):
    settings = make_settings(tmp_path, weights_sha256=VGGFACE2_SHA)
    versions = {dlib_version(), untrained_version(0), version_for(FACENET_VGGFACE2, VGGFACE2_SHA)}
    assert versions <= known_model_versions(settings)
    shown = _show(settings)
    rows = {(r["purpose"], r["model_version"]): r for r in shown["floors_in_force"]}
    gate = SubmissionGate(settings, AuditLog(settings.resolved_database_url))
    registry = load_policy(settings)
    checked = 0
    for purpose in registry.purposes:
        for version in versions:
            row = rows[(purpose.id, version)]
            assert row["floor"] == gate.floor_for(purpose.id, version), row
            if row["floor"] is None:
                assert not check_threshold(purpose.id, 0.99, version, registry).allowed
                continue
            assert check_threshold(purpose.id, row["floor"], version, registry).allowed
            if row["floor"] > -1.0:
                below = check_threshold(purpose.id, row["floor"] - 0.001, version, registry)
                assert not below.allowed and below.rule_ids == ["deny.threshold-below-floor"]
            checked += 1
    assert checked >= 3 * 6
    # The real models' floors are the registry's own for their family, not a purpose's default.
    for version, family, floor in ((dlib_version(), DLIB_RESNET_V1, 0.95),
                                   (version_for(FACENET_VGGFACE2, VGGFACE2_SHA), FACENET_VGGFACE2, 0.80)):
        row = rows[("missing-children", version)]
        assert (row["floor"], row["source"], row["stated_for"]) == (floor, "family", family)
    assert rows[("photo-library", dlib_version())]["floor"] == 0.93
    assert "L2 0.6" in rows[("photo-library", dlib_version())]["evidence"]
    assert shown["unknown_floor_models"] == []


def _registry_with_floor(tmp_path, model: str):
    data = yaml.safe_load((ROOT / "policy" / DEFAULT_REGISTRY_NAME).read_text())
    purpose = next(p for p in data["purposes"] if p["id"] == "photo-library")
    purpose["floors"].append({"model_version": model, "min_similarity": 0.99})
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_floor_for_an_unknown_version_is_reported(tmp_path):
    unknown = f"{DLIB_RESNET_V1}:0000000000000000"
    path = _registry_with_floor(tmp_path, unknown)
    settings = make_settings(tmp_path, policy_registry=path)
    assert load_policy(settings).unknown_floor_models == (unknown,)
    assert _show(settings)["unknown_floor_models"] == [unknown]
    text = run_cli(["policy", "show"], env_for(settings))
    assert text.returncode == 0 and unknown in text.stdout and "no weights known here produce" in text.stdout
    # It is kept (such weights may run elsewhere), and it does not change the installed file's floor.
    assert SubmissionGate(settings, AuditLog(settings.resolved_database_url)).floor_for(
        "photo-library", dlib_version()) == 0.93
    assert SubmissionGate(settings, AuditLog(settings.resolved_database_url)).floor_for(
        "photo-library", unknown) == 0.99


def test_a_floor_for_an_unknown_family_is_refused(tmp_path):
    path = _registry_with_floor(tmp_path, "dlib-resnet")  # misspelt: it would never apply
    settings = make_settings(tmp_path, policy_registry=path)
    with pytest.raises(RegistryError, match="'dlib-resnet'.*known model family"):
        load_policy(settings)
    assert load_registry(path) is not None  # without the known models, the file itself is well formed
    done = run_cli(["policy", "show"], env_for(settings))
    assert done.returncode == 2 and "dlib-resnet" in done.stdout + done.stderr
