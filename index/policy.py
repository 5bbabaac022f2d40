"""Which vector index a gallery gets: exact FLAT while it is small or on Milvus Lite, HNSW on a server past a size.

FLAT compares a probe with every stored face: exact, and cheap enough below about 100k faces on a server
(bench/search.py: about 20 ms a probe at 100k on this CPU). Past that, HNSW answers in a few milliseconds
whatever the size, at a recall set by its search parameter `ef` (higher: closer to exact, slower); `M`
and `efConstruction` set the graph's quality and its build time. Milvus Lite only ever searches FLAT here
(it has no server to build an index on and its HNSW is pure Python).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facegate.settings import Settings

FLAT = "FLAT"
HNSW = "HNSW"
ANN_MIN_FACES = 100_000
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
# Clustered face-like vectors, M 16, efConstruction 200 (bench/README.md): recall@10 at 100k 0.937 / 0.979
# at ef 512 / 1024; at 1M 0.826 / 0.914 / 0.973 at ef 512 / 1024 / 2048, every mate found, 2048 at 0.64x
# numpy's time per probe. IVF_FLAT / IVF_SQ8 (nlist 1024) reach 0.87 at nprobe 256 at 100k.
HNSW_EF = 2048


@dataclass(frozen=True)
class IndexPolicy:
    """The settings of the choice (FACEGATE_MILVUS_ANN_MIN_FACES, FACEGATE_MILVUS_HNSW_*)."""

    ann_min_faces: int = ANN_MIN_FACES
    hnsw_m: int = HNSW_M
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION
    hnsw_ef: int = HNSW_EF

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexPolicy:
        return cls(ann_min_faces=settings.milvus_ann_min_faces, hnsw_m=settings.milvus_hnsw_m,
                   hnsw_ef_construction=settings.milvus_hnsw_ef_construction, hnsw_ef=settings.milvus_hnsw_ef)


@dataclass(frozen=True)
class IndexChoice:
    """An index type, the parameters it is built with, and those a search passes (before the top-k)."""

    index_type: str
    build_params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    def search_params_for(self, top_k: int) -> dict[str, int]:
        """HNSW needs ef >= top-k (Milvus refuses a smaller one): raised to the top-k when it is below."""
        if self.index_type == HNSW:
            return {"ef": max(self.search_params.get("ef", HNSW_EF), top_k)}
        return dict(self.search_params)

    def as_dict(self) -> dict:
        return {"type": self.index_type, "build_params": dict(self.build_params),
                "search_params": dict(self.search_params)}


def choose_index(faces: int, *, lite: bool, policy: IndexPolicy | None = None) -> IndexChoice:
    """FLAT on Milvus Lite and below `ann_min_faces` faces; HNSW with the policy's parameters at or above it."""
    policy = policy or IndexPolicy()
    if lite or faces < policy.ann_min_faces:
        return IndexChoice(FLAT)
    return IndexChoice(HNSW, {"M": policy.hnsw_m, "efConstruction": policy.hnsw_ef_construction},
                       {"ef": policy.hnsw_ef})
