"""Shared plumbing for every FaceGate package: settings, database session, queue wiring, message schemas, calibration.

It imports none of `workers`, `scheduler`, `index`, `policy` or `cli`; they all may import it.
"""

__version__ = "0.1.0"
