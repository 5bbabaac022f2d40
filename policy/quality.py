"""Probe quality floors: is this face good enough to be searched (or enrolled) for this purpose?

Microsoft refused a police force because body-camera images "would not produce good enough images to be
able to have an accurate system". A purpose in the registry may state `min_quality`: a probe face below
it is never searched, and its item says why ("face 38 px wide; purpose missing-children needs 80"). The
same floors serve as an enrolment filter for galleries (Rekognition's QualityFilter), named in the
registry's `quality_filters`.

Pure: the signals are measured by the workers (`workers/quality.py` says how and what the numbers can and
cannot tell); this module only compares them with a floor. It imports nothing of FaceGate's outside
`policy`, reads no file and no clock.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DENY_PROBE_QUALITY",
    "FaceQuality",
    "QualityFloor",
    "QualityVerdict",
    "check_quality",
    "floor_from_claim",
    "floor_to_claim",
    "stricter",
]

DENY_PROBE_QUALITY = "deny.probe-quality-below-floor"


class FaceQuality(BaseModel):
    """The measured signals of one detected face (see workers/quality.py for the method and limits).

    width_px, height_px: the detected box in original-image pixels.
    sharpness: variance of the Laplacian of the face, grey levels 0-255, on a 160x160 resample of the box.
    brightness: mean luminance of the face, 0 (black) to 1 (white).
    yaw_deg, roll_deg: head pose estimated from the five MTCNN landmarks; None when there are none
      (an aligned crop given as the probe).
    probability: the detector's confidence that this is a face.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    width_px: float
    height_px: float
    sharpness: float
    brightness: float
    yaw_deg: float | None = None
    roll_deg: float | None = None
    probability: float


class QualityFloor(BaseModel):
    """The least quality a face must have; every limit is optional, an absent one does not apply."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_face_px: float | None = Field(default=None, ge=0)
    min_sharpness: float | None = Field(default=None, ge=0)
    min_brightness: float | None = Field(default=None, ge=0, le=1)
    max_brightness: float | None = Field(default=None, ge=0, le=1)
    max_yaw_deg: float | None = Field(default=None, ge=0, le=90)
    max_roll_deg: float | None = Field(default=None, ge=0, le=180)
    min_probability: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _brightness_range(self) -> QualityFloor:
        if (self.min_brightness is not None and self.max_brightness is not None
                and self.min_brightness >= self.max_brightness):
            raise ValueError(f"min_brightness {self.min_brightness} is not below max_brightness {self.max_brightness}")
        return self

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())

    def describe(self) -> str:
        """One line naming every limit, e.g. 'face >= 80 px wide, sharpness >= 40, ...'."""
        parts = []
        if self.min_face_px is not None:
            parts.append(f"face >= {_n(self.min_face_px)} px wide")
        if self.min_sharpness is not None:
            parts.append(f"sharpness >= {_n(self.min_sharpness)}")
        if self.min_brightness is not None:
            parts.append(f"brightness >= {_n(self.min_brightness)}")
        if self.max_brightness is not None:
            parts.append(f"brightness <= {_n(self.max_brightness)}")
        if self.max_yaw_deg is not None:
            parts.append(f"yaw <= {_n(self.max_yaw_deg)} deg")
        if self.max_roll_deg is not None:
            parts.append(f"roll <= {_n(self.max_roll_deg)} deg")
        if self.min_probability is not None:
            parts.append(f"detection probability >= {_n(self.min_probability)}")
        return ", ".join(parts) or "no limits"


class QualityVerdict(NamedTuple):
    passed: bool
    # One sentence per limit the face fails, e.g. "face 38 px wide; purpose missing-children needs 80".
    reasons: list[str]

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None


def _n(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def check_quality(quality: FaceQuality, floor: QualityFloor | None, who: str) -> QualityVerdict:
    """Compare one face with a floor. `who` names whose floor it is in the reasons ("purpose
    missing-children", "gallery filter 'medium'"). No floor, or an empty one, passes every face."""
    if floor is None:
        return QualityVerdict(True, [])
    reasons = []
    if floor.min_face_px is not None and quality.width_px < floor.min_face_px:
        reasons.append(f"face {quality.width_px:.0f} px wide; {who} needs {_n(floor.min_face_px)}")
    if floor.min_sharpness is not None and quality.sharpness < floor.min_sharpness:
        reasons.append(f"face sharpness {quality.sharpness:.1f} (variance of Laplacian); {who} needs "
                       f"{_n(floor.min_sharpness)}")
    if floor.min_brightness is not None and quality.brightness < floor.min_brightness:
        reasons.append(f"face too dark (brightness {quality.brightness:.2f}); {who} needs at least "
                       f"{_n(floor.min_brightness)}")
    if floor.max_brightness is not None and quality.brightness > floor.max_brightness:
        reasons.append(f"face too bright (brightness {quality.brightness:.2f}); {who} allows at most "
                       f"{_n(floor.max_brightness)}")
    if floor.max_yaw_deg is not None and quality.yaw_deg is not None and abs(quality.yaw_deg) > floor.max_yaw_deg:
        reasons.append(f"face turned {abs(quality.yaw_deg):.0f} deg (yaw); {who} allows at most "
                       f"{_n(floor.max_yaw_deg)}")
    if floor.max_roll_deg is not None and quality.roll_deg is not None and abs(quality.roll_deg) > floor.max_roll_deg:
        reasons.append(f"face tilted {abs(quality.roll_deg):.0f} deg (roll); {who} allows at most "
                       f"{_n(floor.max_roll_deg)}")
    if floor.min_probability is not None and quality.probability < floor.min_probability:
        reasons.append(f"detection probability {quality.probability:.3f}; {who} needs {_n(floor.min_probability)}")
    return QualityVerdict(not reasons, reasons)


def stricter(*floors: QualityFloor | None) -> QualityFloor | None:
    """One floor holding the strictest limit of each kind among `floors` (None when none is given)."""
    given = [f for f in floors if f is not None]
    if not given:
        return None
    merged: dict[str, float] = {}
    for floor in given:
        for name, value in floor.model_dump().items():
            if value is None:
                continue
            if name not in merged:
                merged[name] = value
            elif name.startswith("min_"):
                merged[name] = max(merged[name], value)
            else:
                merged[name] = min(merged[name], value)
    return QualityFloor(**merged)


def floor_to_claim(floor: QualityFloor | None) -> str:
    """Canonical JSON of a floor, for a ticket claim ("" for none)."""
    if floor is None or floor.empty:
        return ""
    return json.dumps(floor.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


def floor_from_claim(text: str) -> QualityFloor | None:
    return QualityFloor.model_validate_json(text) if text else None
