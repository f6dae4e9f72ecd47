"""relayd: authenticated network plumbing for research facilities, in one daemon."""

from relayd.compiled import refuse_stale

__version__ = "0.1.0"

refuse_stale()  # a compiled module built from an older source must never run instead of it
