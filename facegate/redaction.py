"""What monitoring (task events, Flower, worker logs) may show of a task's arguments: never a ticket or paths.

Decided on the arguments themselves, before Celery turns them into text: `facegate.queue` makes every send
use `args_display` for its `argsrepr`, and the worker does the same for a message it did not get from us.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from celery.utils.saferepr import saferepr

REDACTED = "<redacted>"
HIDDEN = "(details hidden)"
# The fields `task_display` writes, in its order.
_DISPLAY_FIELDS = ("job", "chunk", "gallery", "generation", "images", "pairs")
# As long as Celery's own argsrepr may be (celery.app.amqp.AMQP.argsrepr_maxsize).
_REPR_MAXSIZE = 1024


def is_chunk(value: Any) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(value, Mapping) and "job_id" in value and "chunk_no" in value


def task_display(message: Mapping) -> str:
    """A chunk message as monitoring shows it: which job and chunk, how much work, never the ticket or paths."""
    parts = [f"job={message.get('job_id')}", f"chunk={message.get('chunk_no')}", f"gallery={message.get('gallery')}"]
    if message.get("generation"):
        parts.append(f"generation={message['generation']}")
    if "paths" in message:
        parts.append(f"images={len(message['paths'])}")
    if "pairs" in message:
        parts.append(f"pairs={len(message['pairs'])}")
    return "(" + " ".join(parts) + ")"


def is_task_display(text: str) -> bool:
    """Whether `text` has the form `task_display` writes: fields it writes, one word each, nothing else."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    fields = [part.partition("=") for part in text[1:-1].split(" ")]
    names = [name for name, _, _ in fields]
    return (all(sep and value for _, sep, value in fields) and len(set(names)) == len(names)
            and names[:3] == list(_DISPLAY_FIELDS[:3]) and set(names) <= set(_DISPLAY_FIELDS))


def redacted(value: Any) -> Any:
    """`value` with every `ticket` value replaced, however deep in mappings and sequences."""
    if isinstance(value, Mapping):
        return {k: REDACTED if k == "ticket" and v is not None else redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(v) for v in value)
    return value


def args_display(args: Sequence | None) -> str:
    """A task's positional arguments as monitoring shows them: a chunk message as its display, else their
    repr with tickets redacted."""
    if args and is_chunk(args[0]):
        return task_display(args[0])
    return saferepr(redacted(tuple(args or ())), _REPR_MAXSIZE)


def kwargs_display(kwargs: Mapping | None) -> str:
    return saferepr(redacted(dict(kwargs or {})), _REPR_MAXSIZE)
