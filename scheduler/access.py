"""The one access rule: may this principal take this action on this gallery (and read these paths), now?

Every entry point (API, CLI, on-demand and nightly reindexing, uploads, grants, review, erasure) asks
`AccessRule.authorize` and nothing else decides access. Two questions, in this order:

1. Standing: whose gallery is it, and what may the asker do with it? The owner may do everything; a
   grantee may search and read, never reindex, erase, re-enrol or grant onward; the system submitter may only
   re-embed (and retire a rebuilt generation) on behalf of the owner; an administrator may erase and
   read. Anyone else is told the gallery does not exist, the same answer as for a gallery that does not.
   A named user (scheduler/users.py) acts for its organisation with that standing, and only within its
   roles: submitter (register, index, reindex, search, compare), reviewer (review), auditor (read the
   audit log), administrator (everything: erasure, grants and legal authorisations included, with four eyes
   on confirming an authorisation: `authorize_authorisation`). A machine key keeps the
   organisation's whole standing, but a purpose that requires human review is reviewed by users only.
2. Policy: for actions that read or write faces under a capability (register, index, reindex, search,
   compare, review), the registry's pure `decide()` for the asker at this instant; for the system
   submitter, also for the owner it acts for (a moratorium on the owner stops the nightly reindex).
   Erasure is never held back by a moratorium.

Every refusal, and every decision taken, is written to the audit log with the asker's organisation
and key.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, NoReturn, Sequence

from sqlalchemy import select

from facegate.audit import AuditLog
from facegate.db import session_scope
from facegate.paths import PathRefused, confine, confined_images
from facegate.settings import Settings
from facegate.embedding_models import known_model_versions
from facegate.vocabulary import AuditEvent
from policy import (
    ERASE_CAPABILITY,
    SYSTEM_PURPOSE,
    Decision,
    Registry,
    decide,
    held_back_by_moratoria,
    load_registry,
    requires_human_review,
)
from scheduler.keys import Principal
from scheduler.models import Gallery, GalleryGrant
from scheduler.users import ROLES, Role

# FaceGate's own maintenance submitter (nightly reindexing, retiring a rebuilt generation).
SYSTEM_ORGANISATION = "facegate-system"
# An operator acting through the admin CLI on the database (no API key): may erase and read.
ADMIN_ORGANISATION = "facegate-admin"


class Action(str, enum.Enum):
    REGISTER = "register"
    INDEX = "index"
    REINDEX = "reindex"
    SEARCH = "search"
    COMPARE = "compare"
    ERASE = "erase"
    GRANT = "grant"
    REVIEW = "review"
    READ = "read"
    # Lift an erasure's mark so that the next index or reindex indexes the image again: the owner's alone.
    ENROL = "enrol"
    # Reading the audit log (no gallery).
    AUDIT = "audit"
    # The legal authorisations jobs stand on (scheduler/authorisations.py): record one, confirm it (a court
    # approved the urgent use), withdraw it. Reading them is READ.
    RECORD_AUTHORISATION = "record-authorisation"
    CONFIRM_AUTHORISATION = "confirm-authorisation"
    WITHDRAW_AUTHORISATION = "withdraw-authorisation"


# The registry capability an action exercises; None: none (granting and reading read or write no faces).
CAPABILITY: dict[Action, str | None] = {
    Action.REGISTER: "index", Action.INDEX: "index", Action.REINDEX: "index", Action.SEARCH: "search",
    Action.COMPARE: "compare", Action.REVIEW: "search", Action.ERASE: ERASE_CAPABILITY, Action.GRANT: None,
    Action.READ: None, Action.ENROL: None, Action.AUDIT: None, Action.RECORD_AUTHORISATION: None,
    Action.CONFIRM_AUTHORISATION: None, Action.WITHDRAW_AUTHORISATION: None,
}
# What each role lets a named user do (a machine key has no roles: its organisation's standing decides).
ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    Role.SUBMITTER: frozenset({Action.REGISTER, Action.INDEX, Action.REINDEX, Action.SEARCH, Action.COMPARE,
                               Action.READ}),
    Role.REVIEWER: frozenset({Action.REVIEW, Action.READ}),
    Role.AUDITOR: frozenset({Action.AUDIT, Action.READ}),
    # Enrolling an erased image again undoes an erasure: like erasure, for administrators only. So are the legal
    # authorisations: what a warrant allows is the organisation's word, given by those who answer for it.
    Role.ADMINISTRATOR: frozenset(Action),
}
# Allowed without an audit row (reading); a refusal is audited all the same.
UNAUDITED = {Action.READ, Action.AUDIT}


def roles_for(action: Action) -> list[str]:
    """The roles that let a user take `action`, in the order of ROLES."""
    return [role for role in ROLES if action in ROLE_ACTIONS[role]]


def user_may(principal: Principal, action: Action) -> bool:
    return not principal.is_user or any(action in ROLE_ACTIONS.get(role, ()) for role in principal.roles)
# What each standing may do with a gallery.
ALLOWED = {
    "owner": set(Action),
    "grantee": {Action.SEARCH, Action.READ, Action.REVIEW},
    "system": {Action.REINDEX, Action.ERASE},
    "admin": {Action.ERASE, Action.READ},
}
# Actions that may name a gallery that does not exist yet (it is created for the asker).
CREATING = {Action.REGISTER, Action.INDEX}


def load_policy(settings: Settings) -> Registry:
    """Read fresh on every decision, so a revision takes effect for the very next request."""
    # Floors are checked against the models FaceGate knows: one for a family nobody knows is refused.
    registry = load_registry(settings.policy_registry, known_models=known_model_versions(settings))
    return registry.with_scope(settings.policy_scope) if settings.policy_scope else registry


class GalleryHidden(LookupError):
    """No such gallery for this organisation (another's gallery is reported the same way)."""


class AccessRefused(PermissionError):
    """Refused by the access rule; `access` says who asked, what, and why (the audit row says the same)."""

    def __init__(self, access: "Access") -> None:
        super().__init__(access.reason)
        self.access = access


@dataclass
class Access:
    """The answer to one request: allowed or not, the standing it was judged on, the decisions taken."""

    principal: Principal
    action: Action
    # The gallery's key (what the store, jobs and messages use); `label` is the name the asker gave.
    gallery: str | None
    owner: str | None
    standing: str  # owner | grantee | system | admin | none
    allowed: bool
    reason: str
    rule_ids: list[str]
    registry_hash: str
    purpose: str | None = None
    generation: int = 0
    model_version: str | None = None
    decisions: list[Decision] = field(default_factory=list)
    label: str | None = None

    def as_decision(self) -> Decision:
        """The outcome as a policy Decision (what a refused job records)."""
        capability = CAPABILITY[self.action] or self.action.value
        return Decision(allowed=self.allowed, rule_ids=self.rule_ids, reason=self.reason,
                        registry_hash=self.registry_hash, at=datetime.now(timezone.utc),
                        organisation_id=self.principal.organisation_id, capability=capability,
                        purpose=self.purpose)


def _not_found(gallery: str, organisation_id: str) -> str:
    return f"no gallery {gallery!r} for organisation {organisation_id!r}"


class AccessRule:
    def __init__(self, settings: Settings, audit: AuditLog) -> None:
        self.settings = settings
        self.audit = audit
        self.db_url = settings.resolved_database_url

    # The rule ---------------------------------------------------------------------------------------

    def authorize(self, principal: Principal, action: Action, gallery: str | None, *, purpose: str | None = None,
                  job_id: str | None = None, now: datetime | None = None, audit_gallery: str | None = None,
                  raise_on_denial: bool = True, by_key: bool = False, human_review: bool = False) -> Access:
        """Decide `action` on `gallery` for `principal` at `now`; audit it. Raises GalleryHidden when the
        gallery is not the asker's to know of, AccessRefused when refused (unless `raise_on_denial` is
        False, for policy denials that a job records). `human_review`: the reviewed job's matches need a
        person's confirmation (so do those of a purpose the registry says requires human review)."""
        now = now or datetime.now(timezone.utc)
        action = Action(action)
        registry = load_policy(self.settings)
        org = principal.organisation_id
        name = gallery
        row = (None if gallery is None else self._by_key(gallery) if by_key
               else self._gallery(principal, gallery, own_only=action in CREATING))
        key = row.name if row is not None else (self._allocate_key(gallery) if gallery is not None else None)
        label = key if key is not None else audit_gallery
        standing = self._standing(principal, row)

        def refuse(reason: str, rule: str, standing_: str = standing) -> Access:
            access = Access(principal, action, key, row.owner if row else None, standing_, False, reason,
                            [rule], registry.content_hash, purpose, label=name)
            self._audit_refusal(access, job_id, label)
            return access

        if gallery is not None and row is None and action not in CREATING:
            refuse(_not_found(gallery, org), "deny.unknown-gallery")
            raise GalleryHidden(_not_found(gallery, org) + ("" if action is Action.READ else ": index it first"))
        if row is not None and standing == "none":
            refuse(_not_found(name or row.name, org), "deny.not-your-gallery")
            raise GalleryHidden(_not_found(name or row.name, org))
        if row is not None and action not in ALLOWED[standing]:
            access = refuse(f"organisation {org!r} may not {action.value} gallery {name!r}: "
                            f"{self._why_not(standing, action)}", f"deny.{standing}-may-not-{action.value}")
            raise AccessRefused(access)
        if not user_may(principal, action):
            access = refuse(f"user {principal.user!r} of {org!r} (roles: {', '.join(sorted(principal.roles)) or 'none'}) "
                            f"may not {action.value}" + (f" gallery {name!r}" if name else "")
                            + f": that needs the {' or '.join(roles_for(action))} role",
                            f"deny.role-may-not-{action.value}")
            raise AccessRefused(access)
        if (action is Action.REVIEW and not principal.is_user
                and (human_review or (purpose is not None and requires_human_review(purpose, registry)))):
            access = refuse(f"purpose {purpose!r} requires human review: a match is "
                            "reviewed by a named user with the reviewer role (HTTP Basic, or the CLI's --user), "
                            "never by a machine key", "deny.key-may-not-review")
            raise AccessRefused(access)

        owner = row.owner if row is not None else org
        access = Access(principal, action, key, owner, standing if row is not None else "owner", True, "",
                        [], registry.content_hash, purpose, row.generation if row else 0,
                        row.model_version if row else None, label=name)
        capability = CAPABILITY[action]
        if capability is None or not held_back_by_moratoria(capability):
            # Standing alone decides: no registry decision to ask (erasure: the policy never holds it back).
            access.rule_ids = [f"allow.{action.value}-by-{access.standing}"]
            access.reason = (f"Allowed: {org} ({access.standing}) may {action.value} gallery {name!r}"
                             + ("." if capability is None else "; erasure is never held back by a moratorium."))
            if action not in UNAUDITED:
                self.audit.append(AuditEvent.ACCESS_DECISION, organisation_id=org, **principal.actor, job_id=job_id,
                                  capability=action.value, purpose=purpose, gallery=label,
                                  registry_hash=registry.content_hash, rule_ids=access.rule_ids, allowed=True,
                                  detail={"reason": access.reason, "standing": access.standing, "owner": owner,
                                          **_who(principal)})
            return access

        asks: list[tuple[str, str | None, dict]] = []
        if access.standing == "system":
            # Re-embedding on behalf of the owner: the system's own confinement, then the owner's standing.
            asks.append((SYSTEM_ORGANISATION, SYSTEM_PURPOSE, {"action": action.value, "on_behalf_of": owner}))
            owner_purpose = row.purpose if row is not None else None
            asks.append((owner, owner_purpose, {"action": action.value, "requested_by": org}))
        else:
            if action is Action.REINDEX and purpose is None:
                purpose = row.purpose if row is not None else None
            asks.append((org, purpose, {"action": action.value, "standing": access.standing}))
        access.purpose = purpose
        for who, why, detail in asks:
            if why is None:
                decision = Decision(allowed=False, rule_ids=["deny.no-recorded-purpose"],
                                    reason=f"Denied: gallery {name!r} has no recorded purpose to re-embed it for; "
                                           "its owner must index it with a purpose first.",
                                    registry_hash=registry.content_hash, at=now, organisation_id=who,
                                    capability=capability, purpose=None)
            else:
                decision = decide(who, capability, why, now, registry)
            self.audit.append_decision(decision, api_key_id=principal.key_id if who == org else None,
                                       username=principal.user if who == org else None, job_id=job_id,
                                       gallery=label, detail=detail)
            access.decisions.append(decision)
            if not decision.allowed:
                access.allowed = False
                access.reason = decision.reason if who == org else f"on behalf of owner {who!r}: {decision.reason}"
                access.rule_ids = list(decision.rule_ids)
                access.registry_hash = decision.registry_hash
                if raise_on_denial:
                    raise AccessRefused(access)
                return access
        last = access.decisions[-1]
        access.reason, access.rule_ids = last.reason, list(last.rule_ids)
        return access

    def check_role(self, principal: Principal, action: Action, *, job_id: str | None = None,
                   gallery: str | None = None) -> None:
        """For what touches a job rather than a gallery (cancelling it): the user's roles alone; audited
        and AccessRefused when they do not allow `action`. A machine key has no roles to check."""
        if user_may(principal, action):
            return
        self._refuse(principal, action, f"user {principal.user!r} of {principal.organisation_id!r} (roles: "
                     f"{', '.join(sorted(principal.roles)) or 'none'}) may not {action.value}: that needs the "
                     f"{' or '.join(roles_for(action))} role", f"deny.role-may-not-{action.value}", job_id, gallery)

    def authorize_authorisation(self, principal: Principal, action: Action, *, authorisation_id: str | None = None,
                                recorded_by: str | None = None) -> None:
        """Recording, confirming and withdrawing a legal authorisation. The administrator role (a machine key:
        its organisation's standing); and four eyes on a confirmation: whoever recorded it (the same user, or
        the same key) may not also confirm it, since the confirmation is what keeps an urgent use alive past
        its deadline. Reading them is open to every role (a submitter names one on a job, an auditor checks
        them). Audited and AccessRefused when refused; what is allowed is audited by the change itself."""
        action = Action(action)
        if action not in (Action.RECORD_AUTHORISATION, Action.CONFIRM_AUTHORISATION, Action.WITHDRAW_AUTHORISATION):
            raise ValueError(f"{action.value} is not an action on a legal authorisation")
        self.check_role(principal, action)
        if action is Action.CONFIRM_AUTHORISATION and recorded_by is not None and recorded_by == principal.key_id:
            who = f"user {principal.user!r}" if principal.is_user else f"key {principal.key_id}"
            self._refuse(principal, action, f"{who} recorded authorisation {authorisation_id}; another "
                         "administrator of " f"{principal.organisation_id!r} must confirm it (four eyes)",
                         "deny.confirm-own-authorisation", None, None, {"authorisation": authorisation_id})

    def _refuse(self, principal: Principal, action: Action, reason: str, rule: str, job_id: str | None,
                gallery: str | None, detail: dict | None = None) -> NoReturn:
        registry = load_policy(self.settings)
        access = Access(principal, action, gallery, None, "owner", False, reason, [rule], registry.content_hash)
        self._audit_refusal(access, job_id, gallery, detail)
        raise AccessRefused(access)

    # Paths --------------------------------------------------------------------------------------------

    def readable_paths(self, principal: Principal, paths: Sequence[str | Path], *, action: Action,
                       directory: bool = False) -> list[Path]:
        """The image files these paths name, if every one is readable by the asker; else PathRefused.

        Readable: inside the configured roots, the asker's own upload folder, and not inside a folder
        registered to another organisation's gallery (unless, for a search, the asker holds a grant on
        it). A refusal reads the same whether the path exists or not, and never says where a link points.
        """
        roots = self.settings.roots_for(principal.organisation_id)
        if directory:
            real = confine(paths[0], roots)
            if not real.is_dir():
                raise PathRefused(f"{paths[0]} is not a directory: an index job takes a gallery folder")
            images = confined_images([real], roots)
            self._check_registered_folders(principal, [real, *images], paths, action)
            return images
        images = confined_images(paths, roots)
        self._check_registered_folders(principal, images, paths, action)
        return images

    def _check_registered_folders(self, principal: Principal, reals: Iterable[Path], given: Sequence, action: Action):
        org = principal.organisation_id
        if org in (SYSTEM_ORGANISATION, ADMIN_ORGANISATION):
            return
        with session_scope(self.db_url) as s:
            foreign = [(g.name, Path(g.folder)) for g in s.scalars(
                select(Gallery).where(Gallery.owner != org, Gallery.folder.is_not(None))) if g.folder is not None]
            granted = set(s.scalars(select(GalleryGrant.gallery).where(GalleryGrant.organisation_id == org)))
        if not foreign:
            return
        for real in reals:
            for name, folder in foreign:
                if real == folder or real.is_relative_to(folder):
                    if action is Action.SEARCH and name in granted:
                        continue
                    self.audit.append(AuditEvent.ACCESS_REFUSED, organisation_id=org, **principal.actor,
                                      capability=action.value, allowed=False, rule_ids=["deny.path-not-readable"],
                                      detail={"reason": "a path lies in a folder registered to another "
                                                        "organisation's gallery", "paths": [str(p) for p in given][:20]})
                    raise PathRefused(f"{self._given_for(real, given)} is outside the folders organisation "
                                      f"{org!r} may read")

    @staticmethod
    def _given_for(real: Path, given: Sequence) -> str:
        # Name the path as the caller wrote it, never its resolved form.
        for g in given:
            if str(real).startswith(str(Path(g).expanduser().absolute())):
                return str(g)
        return str(given[0]) if len(given) == 1 else "a path given"

    # Helpers ------------------------------------------------------------------------------------------

    def _gallery(self, principal: Principal, name: str, *, own_only: bool = False) -> Gallery | None:
        """The gallery this asker means by `name`: its own of that name, else one granted to it of that
        name. The system submitter and an administrator name galleries by key."""
        org = principal.organisation_id
        with session_scope(self.db_url) as s:
            if org in (SYSTEM_ORGANISATION, ADMIN_ORGANISATION):
                return s.get(Gallery, name)
            named = (Gallery.label == name) | (Gallery.label.is_(None) & (Gallery.name == name))
            own = s.scalars(select(Gallery).where(Gallery.owner == org, named)).first()
            if own is not None or own_only:
                return own
            granted = s.scalars(select(Gallery).join(GalleryGrant, GalleryGrant.gallery == Gallery.name)
                                .where(GalleryGrant.organisation_id == org, named)).all()
            return granted[0] if len(granted) == 1 else None

    def _by_key(self, key: str) -> Gallery | None:
        with session_scope(self.db_url) as s:
            return s.get(Gallery, key)

    def _allocate_key(self, label: str) -> str:
        """A store key for a new gallery named `label`: the label, unless another gallery holds it."""
        with session_scope(self.db_url) as s:
            key = label
            while s.get(Gallery, key) is not None:
                key = f"{label.rstrip('_')[:56]}_{secrets.token_hex(4)[:7]}"
            return key

    def _standing(self, principal: Principal, row: Gallery | None) -> str:
        org = principal.organisation_id
        if row is None:
            return "owner" if org not in (SYSTEM_ORGANISATION, ADMIN_ORGANISATION) else "none"
        if org == row.owner:
            return "owner"
        if org == SYSTEM_ORGANISATION:
            return "system"
        if org == ADMIN_ORGANISATION:
            return "admin"
        with session_scope(self.db_url) as s:
            if s.get(GalleryGrant, (row.name, org)) is not None:
                return "grantee"
        return "none"

    @staticmethod
    def _why_not(standing: str, action: Action) -> str:
        return {
            "grantee": "a grant lets an organisation search a gallery, never reindex, index into, erase, "
                       "re-enrol or grant it onward",
            "system": "the system submitter only re-embeds a gallery on behalf of its owner",
            "admin": "an administrator may erase and read, nothing else",
        }.get(standing, f"{action.value} is for the owner only")

    def _audit_refusal(self, access: Access, job_id: str | None, label: str | None,
                       detail: dict | None = None) -> None:
        self.audit.append(AuditEvent.ACCESS_REFUSED, organisation_id=access.principal.organisation_id,
                          **access.principal.actor, job_id=job_id,
                          capability=CAPABILITY[access.action] or access.action.value, purpose=access.purpose,
                          gallery=label, registry_hash=access.registry_hash, rule_ids=access.rule_ids, allowed=False,
                          detail={"reason": access.reason, "action": access.action.value,
                                  "standing": access.standing, **_who(access.principal), **(detail or {})})


def _who(principal: Principal) -> dict:
    """The user and its roles, for an audit row of a user's request (a key's rows name the key alone)."""
    return {"user": principal.user, "roles": sorted(principal.roles)} if principal.is_user else {}


__all__ = ["ADMIN_ORGANISATION", "ROLE_ACTIONS", "SYSTEM_ORGANISATION", "Access", "AccessRefused", "AccessRule",
           "Action", "GalleryHidden", "load_policy", "roles_for", "user_may"]
