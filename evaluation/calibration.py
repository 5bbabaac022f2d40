"""Moved to `facegate.calibration` (both gates read it, so it lives in the shared layer); this name
re-exports it for code written before the move and goes away once nothing imports it."""

from facegate.calibration import *  # noqa: F403 -- a temporary alias of the moved module, by design
from facegate.calibration import __all__, calibrated_threshold_lookup  # noqa: F401 -- re-exported

