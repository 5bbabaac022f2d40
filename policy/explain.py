"""Plain sentences for the three rules no vendor enforces, per purpose: the probe quality floor, the legal
authorisation each job must name, and the retention schedule. One source for `facegate policy show`,
`facegate policy check` and the accountability report, so they never tell different stories."""

from __future__ import annotations

from .registry import Purpose, Registry
from .retention import Subject

__all__ = ["authorisation_kinds_text", "purpose_rules", "rules_markdown"]


def _days(days: int | None, fallback: str) -> str:
    return f"{days} days" if days is not None else fallback


def purpose_rules(registry: Registry, purpose: Purpose) -> dict[str, str]:
    """{'quality': ..., 'authorisation': ..., 'retention': ...}: one sentence each."""
    quality = (f"a probe face is searched only if {purpose.min_quality.describe()}; below that it is not "
               "searched and its item says why" if purpose.min_quality and not purpose.min_quality.empty
               else "no probe quality floor: every detected face is searched")
    if purpose.authorisation is not None:
        kinds = []
        for kind_id in purpose.authorisation.kinds:
            kind = registry.authorisation_kind(kind_id)
            rule = "" if kind is None else (
                " (until withdrawn)" if kind.valid_hours is None else
                f" (valid {kind.valid_hours:g} hours from its issue{' unless confirmed' if kind.unless_confirmed else ''})")
            kinds.append(kind_id + rule)
        authorisation = (f"each {', '.join(purpose.authorisation.capabilities)} job names a recorded legal "
                         f"authorisation: {'; or '.join(kinds)}; a withdrawn or lapsed one is refused at "
                         "execution and its jobs' results are erased")
    else:
        authorisation = "no legal authorisation is asked for"
    policy = registry.retention
    periods = purpose.retention
    maximum = f"the legal maximum of {policy.legal_max_days} days"

    def period(subject: Subject) -> str:
        own = periods.days(subject) if periods else None
        default = policy.days(subject)
        chosen = own if own is not None and own <= policy.legal_max_days else (
            default if default is not None and default <= policy.legal_max_days else None)
        return _days(chosen, maximum)

    retention = (f"galleries erased {period('gallery')} after their last indexing (an owner may set fewer), "
                 f"uploads {period('uploads')} and results {period('results')} after their job ends; never "
                 f"past {maximum} ({policy.legal_basis})")
    return {"quality": quality, "authorisation": authorisation, "retention": retention}


def authorisation_kinds_text(registry: Registry) -> list[str]:
    return [f"{k.id}: {k.description} " + ("Valid until withdrawn." if k.valid_hours is None else
                                           f"Valid {k.valid_hours:g} hours from its issue"
                                           + (" unless confirmed." if k.unless_confirmed else "."))
            for k in registry.authorisation_kinds]


def rules_markdown(registry: Registry) -> list[str]:
    """A Markdown section: the quality floors, authorisation and retention rules of every purpose."""
    lines = ["## Policy in force: probe quality, legal authorisation, retention", "",
             f"From the policy registry sha256 {registry.content_hash}. Each rule is enforced at submission and "
             "again in the worker, and every refusal and erasure is in the audit log.", ""]
    lines += ["| Purpose | Probe quality floor | Legal authorisation | Retention |", "|---|---|---|---|"]
    for purpose in registry.purposes:
        rules = purpose_rules(registry, purpose)
        cells = [purpose.id, rules["quality"], rules["authorisation"], rules["retention"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    if registry.authorisation_kinds:
        lines += ["Kinds of authorisation:", ""] + [f"- {t}" for t in authorisation_kinds_text(registry)] + [""]
    if registry.quality_filters:
        lines += ["Enrolment quality filters (a gallery enrols only faces at or above the one it names):", ""]
        lines += [f"- {name}: {floor.describe()}" for name, floor in registry.quality_filters.items()] + [""]
    return lines
