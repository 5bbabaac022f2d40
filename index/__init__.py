"""The gallery store: one Milvus collection per gallery of face vectors, by Milvus Lite file or server URI."""

from index.errors import StoreFailed, StoreUnavailable, describe, is_transient, store_errors
from index.policy import IndexChoice, IndexPolicy, choose_index
from index.store import (
    FaceRecord,
    GalleryInfo,
    GalleryNotFound,
    GalleryStore,
    InvalidGalleryName,
    ModelVersionMismatch,
    StoredFace,
    StoredMatch,
    face_id,
    gallery_index,
)

__all__ = [
    "FaceRecord",
    "GalleryInfo",
    "GalleryNotFound",
    "GalleryStore",
    "InvalidGalleryName",
    "ModelVersionMismatch",
    "StoreFailed",
    "StoreUnavailable",
    "StoredFace",
    "StoredMatch",
    "describe",
    "is_transient",
    "store_errors",
    "face_id",
    "gallery_index",
    "IndexChoice",
    "IndexPolicy",
    "choose_index",
]
