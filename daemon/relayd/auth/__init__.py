"""Authentication methods: declared once under [auth.NAME], referenced by components."""

from relayd.auth.base import AuthError, AuthFailure, AuthMethod, Identity

__all__ = ["AuthError", "AuthFailure", "AuthMethod", "Identity"]
