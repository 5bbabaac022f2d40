"""What a worker process holds once: the settings, the pipeline (model loaded once) and the store client."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from facegate.settings import Settings, get_settings
from index import GalleryStore, IndexPolicy
from workers.pipeline import FacePipeline


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pipeline: FacePipeline | None = None
        self._store: GalleryStore | None = None
        self._gate = None
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    @property
    def roots(self) -> list[Path]:
        return self.settings.resolved_gallery_roots  # shared roots only; uploads via roots_for(organisation)

    def gate(self):
        from facegate.audit import AuditLog
        from workers.gate import ExecutionGate

        with self._lock:
            if self._gate is None:
                self._gate = ExecutionGate(self.settings, AuditLog(self.settings.resolved_database_url))
            return self._gate

    def pipeline(self) -> FacePipeline:
        with self._lock:
            if self._pipeline is None:
                self._pipeline = FacePipeline.from_settings(self.settings)
            return self._pipeline

    def store(self) -> GalleryStore:
        with self._lock:
            if self._store is None:
                self._store = GalleryStore(self.settings.resolved_milvus_uri, self.settings.milvus_token,
                                           IndexPolicy.from_settings(self.settings))
            return self._store


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(get_settings())
        return _runtime
