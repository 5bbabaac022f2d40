"""`policy show`, `policy check` and the accountability report explain the probe quality floors, the legal
authorisation per job and the retention schedule, from the registry in force."""

from __future__ import annotations

import json

import yaml

from policy import load_registry, registry_from_dict
from policy.explain import purpose_rules, rules_markdown
from tests.conftest import make_settings
from tests.e2e import env_for, run_cli

REGISTRY = load_registry()


def test_purpose_rules_follow_the_registry():
    rules = purpose_rules(REGISTRY, REGISTRY.purpose("criminal-investigation"))
    assert "face >= 80 px wide" in rules["quality"]
    assert "exigent (valid 48 hours from its issue unless confirmed)" in rules["authorisation"]
    assert "results 180 days" in rules["retention"] and "1095 days" in rules["retention"]
    research = purpose_rules(REGISTRY, REGISTRY.purpose("research"))
    assert research["quality"].startswith("no probe quality floor")
    assert research["authorisation"] == "no legal authorisation is asked for"
    # A change in the registry changes the explanation: a purpose period past the maximum is not stated.
    data = REGISTRY.model_dump(mode="json")
    data["purposes"][5]["retention"] = {"gallery_days": 90}
    changed = purpose_rules(registry_from_dict(data), registry_from_dict(data).purpose("research"))
    assert "galleries erased 90 days" in changed["retention"]


def test_the_accountability_report_states_all_three():
    from tests.test_evaluation_report import _report

    from evaluation.report import accountability_report

    markdown = accountability_report([_report(untrained=False)], registry=REGISTRY)
    section = markdown.split("## Policy in force", 1)[1]
    for expected in ("missing-children", "face >= 80 px wide", "exigent", "48 hours", "BIPA", "1095 days",
                     "Enrolment quality filters", REGISTRY.content_hash):
        assert expected in section, expected
    assert "## Policy in force" not in accountability_report([_report(untrained=False)])
    assert rules_markdown(REGISTRY)[0] == "## Policy in force: probe quality, legal authorisation, retention"


def test_policy_show_and_check_explain_them(tmp_path):
    data = yaml.safe_load(open(__import__("policy").__path__[0] + "/default_registry.yaml"))
    data["authorisation_kinds"][2]["valid_hours"] = 24
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(yaml.safe_dump(data, sort_keys=False))
    env = env_for(make_settings(tmp_path, policy_registry=registry_file))
    shown = run_cli(["policy", "show"], env)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for expected in ("probe quality", "legal authorisation", "retention", "Valid 24 hours from its issue unless "
                     "confirmed", "legal maximum 1095 days", "enrolment quality filters"):
        assert expected in text, expected
    checked = run_cli(["policy", "check", "federal-agency-example", "-c", "search", "-p", "criminal-investigation",
                       "--json"], env)
    body = json.loads(checked.stdout)
    assert checked.returncode == 0 and body["allowed"]
    assert set(body["purpose_rules"]) == {"quality", "authorisation", "retention"}
    assert "exigent (valid 24 hours" in body["purpose_rules"]["authorisation"]
    plain = run_cli(["policy", "check", "federal-agency-example", "-c", "search", "-p", "criminal-investigation"], env)
    assert "this search job needs one" in " ".join(plain.stdout.split())
