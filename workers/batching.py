"""How many faces go into one forward pass: a policy object, chosen per device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

# On CPU, throughput flattens past ~32 (stack notes); a GPU wants far larger batches.
_DEFAULT_BATCH = {"cpu": 32, "cuda": 512}


@dataclass(frozen=True)
class BatchPolicy:
    max_faces: int

    @classmethod
    def for_device(cls, device: torch.device, override: int | None = None) -> "BatchPolicy":
        return cls(max_faces=override or _DEFAULT_BATCH.get(device.type, 32))

    def slices(self, total: int) -> Iterator[slice]:
        """Consecutive slices over `total` faces, each at most `max_faces` long."""
        for start in range(0, total, self.max_faces):
            yield slice(start, min(start + self.max_faces, total))
