"""Base class for a model that loads once per process and then runs many batches."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import torch


def resolve_device(setting: str) -> torch.device:
    """`auto` picks cuda when present, else cpu; anything else is taken as a torch device name."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"FACEGATE_DEVICE={setting} but no CUDA device is available")
    return device


class InferenceModel(ABC):
    """Loads lazily, once, under a lock: worker threads share one copy of the weights."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._load_lock = threading.Lock()
        self._loaded = False

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    @abstractmethod
    def _load(self) -> None:
        """Build the network and put its weights on the device."""
