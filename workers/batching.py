"""How work is grouped on a device: faces per embedding pass, images per detection call, decode threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

# Faces per embedding forward pass. On CPU, throughput flattens past ~32 (stack notes); a GPU wants far
# larger batches (InceptionResnetV1 in fp16 at 160x160 takes a few MB of activations per face).
_DEFAULT_BATCH = {"cpu": 32, "cuda": 512}
# Images per MTCNN call. Batching equal-size (letterboxed) images gains nothing on CPU (stack notes),
# and does on a GPU, where one image leaves most of the device idle.
_DEFAULT_DETECT_IMAGES = {"cpu": 1, "cuda": 16}
# Embed on a thread of its own, overlapped with detection. On a GPU both stages queue kernels and the
# CPU-side work overlaps; even on a 2-core CPU it gains a little, as MTCNN leaves cores idle between its
# many small ops (bench/README.md).
_DEFAULT_EMBED_THREAD = {"cpu": True, "cuda": True}


def _default_detect_threads(device: torch.device) -> int:
    # CPU: one MTCNN per core pair or core, up to 4 (its ops are too small to spread one image over many
    # cores); CUDA: one thread feeds the GPU with batches.
    if device.type != "cpu":
        return 1
    return max(1, min(4, torch.get_num_threads()))


def _default_decode_threads() -> int:
    # JPEG decoding and resizing release the GIL: a few threads keep the model fed. On a 2-core CPU,
    # two threads overlap decoding with detection; more only contend with torch for the cores.
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class BatchPolicy:
    max_faces: int
    detect_images: int = 1
    decode_threads: int = 2
    embed_thread: bool = True
    detect_threads: int = 1

    @classmethod
    def for_device(cls, device: torch.device, override: int | None = None, *, detect_images: int | None = None,
                   decode_threads: int | None = None, embed_thread: bool | None = None,
                   detect_threads: int | None = None) -> "BatchPolicy":
        max_faces = override or _DEFAULT_BATCH.get(device.type, 32)
        if override is None and device.type == "cuda":
            # Sized for the device: a small GPU gets smaller batches.
            total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
            max_faces = 256 if total_gib < 12 else 1024 if total_gib >= 40 else 512
        return cls(max_faces=max_faces,
                   detect_images=detect_images or _DEFAULT_DETECT_IMAGES.get(device.type, 1),
                   decode_threads=decode_threads or _default_decode_threads(),
                   embed_thread=_DEFAULT_EMBED_THREAD.get(device.type, True) if embed_thread is None
                   else bool(embed_thread),
                   detect_threads=detect_threads or _default_detect_threads(device))

    @property
    def prefetch(self) -> int:
        """Images decoded ahead of detection: enough to keep the device fed, few enough to bound memory."""
        return max(2 * self.decode_threads, 2 * self.detect_images * self.detect_threads)

    def slices(self, total: int, *, partial: bool = True) -> Iterator[slice]:
        """The embedding batches over `total` faces: consecutive slices of `max_faces`, and the shorter rest
        last only if `partial` (else those faces wait for more to fill a batch)."""
        end = total if partial else total - total % self.max_faces
        for start in range(0, end, self.max_faces):
            yield slice(start, min(start + self.max_faces, end))
