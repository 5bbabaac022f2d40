"""A match's review state, read from every review of it (appended, never overwritten).

`confirmed` only when the required number of *different* reviewers of the organisation confirmed it (the
same user twice counts once); `rejected` as soon as anyone rejected it (a rejection is kept, whatever
follows); otherwise `unconfirmed` where review is required, `not_required` where it is not and nobody
reviewed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from facegate.vocabulary import ReviewDecision

UNCONFIRMED, NOT_REQUIRED = "unconfirmed", "not_required"


@dataclass(frozen=True)
class ReviewEntry:
    reviewer: str
    # Who counts as one reviewer: the user id (or, where no person is required, the key id).
    identity: str
    decision: ReviewDecision
    at: datetime
    note: str | None = None


def needed_reviewers(reviewers_required: int, review_required: bool) -> int:
    """The job's stated number; for a job from before it was stated, 2 where review is required, else 1."""
    if reviewers_required > 0:
        return reviewers_required
    return 2 if review_required else 1


def review_state(entries: Iterable[ReviewEntry], *, needed: int, review_required: bool) -> dict:
    """What a match shows of its reviews: state, distinct confirmations, how many are needed, the history."""
    history = sorted(entries, key=lambda e: e.at)
    confirmers = {e.identity for e in history if e.decision is ReviewDecision.CONFIRMED}
    rejected = any(e.decision is ReviewDecision.REJECTED for e in history)
    if rejected:
        state = ReviewDecision.REJECTED.value
    elif history and len(confirmers) >= needed:
        state = ReviewDecision.CONFIRMED.value
    elif review_required or history:
        state = UNCONFIRMED
    else:
        state = NOT_REQUIRED
    last = history[-1] if history else None
    return {"review": state, "confirmations": len(confirmers), "reviewers_required": needed if review_required
            or history else 0,
            "reviewer": last.reviewer if last else None, "reviewed_at": last.at.isoformat() if last else None,
            "reviewed_by": sorted({e.reviewer for e in history}),
            "reviews": [{"reviewer": e.reviewer, "decision": e.decision.value, "at": e.at.isoformat(), "note": e.note}
                        for e in history]}


__all__ = ["NOT_REQUIRED", "UNCONFIRMED", "ReviewEntry", "needed_reviewers", "review_state"]
