"""The audit log lives in `facegate.audit` (workers write refusals to it too); re-exported here for the scheduler."""

from facegate.audit import *  # noqa: F401,F403
from facegate.audit import __all__  # noqa: F401
