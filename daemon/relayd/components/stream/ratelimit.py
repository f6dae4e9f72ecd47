"""The session token bucket lives with the reusable byte pumps (`relayd.pump.gate`)."""

from relayd.pump.gate import TokenBucket

__all__ = ["TokenBucket"]
