"""The audit log lives in `facegate.audit` (workers write refusals to it too); re-exported here for the scheduler."""

from facegate.audit import *  # noqa: F403 -- a re-export of the whole module, by design
from facegate.audit import __all__  # noqa: F401 -- re-exported with it
