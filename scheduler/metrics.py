"""Prometheus metrics: jobs by state, policy denials by rule, faces indexed, search latency."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from facegate.db import session_scope
from facegate.vocabulary import AuditEvent

# Observed by whichever process folds a finished search job (the API does, as clients poll it).
SEARCH_LATENCY = Histogram("facegate_search_job_seconds", "Search job time from submission to result",
                           buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200))


class DatabaseCollector:
    """Counts read from the job database at scrape time, so every API replica reports the same numbers."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def collect(self):
        from scheduler.audit import AuditRow
        from scheduler.models import GalleryImage, Job

        with session_scope(self.db_url) as s:
            by_state = s.execute(select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)).all()
            faces = s.scalar(select(func.coalesce(func.sum(GalleryImage.faces), 0)).where(GalleryImage.ok.is_(True)))
            denied = s.scalars(select(AuditRow.rule_ids).where(AuditRow.event == AuditEvent.POLICY_DECISION,
                                                               AuditRow.allowed.is_(False))).all()
        jobs = GaugeMetricFamily("facegate_jobs", "Jobs by state and kind", labels=["state", "kind"])
        for state, kind, count in by_state:
            jobs.add_metric([state, kind], count)
        yield jobs
        yield GaugeMetricFamily("facegate_faces_indexed", "Faces in the galleries' inventories", value=int(faces or 0))
        denials = CounterMetricFamily("facegate_policy_denials", "Policy denials by deciding rule", labels=["rule"])
        for rule, count in Counter(rule for rules in denied for rule in (rules or ["unknown"])).items():
            denials.add_metric([rule], count)
        yield denials


def registry_for(db_url: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db_url))
    registry.register(SEARCH_LATENCY)
    return registry
