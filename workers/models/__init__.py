"""The two networks of the pipeline, one per file, behind a small base class."""

from workers.models.base import InferenceModel, resolve_device
from workers.models.detector import DetectedFace, FaceDetector
from workers.models.embedder import FaceEmbedder

__all__ = ["DetectedFace", "FaceDetector", "FaceEmbedder", "InferenceModel", "resolve_device"]
