"""relayd: authenticated network plumbing for research facilities, in one daemon."""

__version__ = "0.1.0"
