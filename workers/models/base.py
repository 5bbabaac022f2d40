"""Base class for a model that loads once per process and then runs many batches; device and precision."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    """`auto` picks cuda when present, else cpu; anything else is taken as a torch device name."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"FACEGATE_DEVICE={setting} but no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions natively (AVX512-BF16 or AMX), so bf16 is a speed-up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device: torch.device) -> torch.dtype:
    """The embedding network's compute dtype.

    `auto`: fp16 on CUDA (tensor cores); on CPU bf16 where oneDNN runs it natively (AMX/AVX512-BF16:
    about 2x the fp32 embedding rate, bench/README.md), else fp32. Both half precisions stay within 0.01
    cosine distance of fp32 (tests/test_perf_precision.py), so galleries and probes embedded at either
    precision compare. `fp32` gives facenet-pytorch's reference embeddings to float rounding.
    """
    setting = (setting or "auto").lower()
    if setting not in PRECISIONS:
        raise ValueError(f"embedding precision {setting!r} is not one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    if setting == "fp16" and device.type == "cpu":
        raise ValueError("fp16 embedding is for CUDA devices; on CPU use bf16 (or fp32)")
    return _DTYPES[setting]


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
