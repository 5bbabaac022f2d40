"""The HTTP API: jobs, galleries, erasure and review over the same gate, audit log and queue as the CLI."""

from scheduler.api.app import create_app

__all__ = ["create_app"]
