"""Errors the server's policy decisions turn into."""

from __future__ import annotations

import re

__all__ = ["AirlockError", "PolicyViolation", "ApprovalPending", "ApprovalDenied"]


class AirlockError(Exception):
    """Any failure talking to an Airlock server."""


class PolicyViolation(AirlockError):
    """The server's policy refused the query; ``code`` is its stable reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ApprovalPending(PolicyViolation):
    """The result needs the data owner's approval; ``request_id`` names the request."""

    def __init__(self, request_id: str, reason: str):
        super().__init__("APPROVAL_PENDING", f"request {request_id}: {reason}")
        self.request_id = request_id
        self.reason = reason


class ApprovalDenied(PolicyViolation):
    """The data owner denied the request, with ``reason``."""

    def __init__(self, request_id: str, reason: str):
        super().__init__("APPROVAL_DENIED", f"request {request_id}: {reason}")
        self.request_id = request_id
        self.reason = reason


_CODE = re.compile(r"\[([A-Z_]+)\] (.*)", re.S)
_REQUEST = re.compile(r"request (\w+): (.*)", re.S)


def translate(error: Exception) -> Exception:
    """Turns a driver error carrying ``[CODE] message`` into the matching exception."""
    text = str(error)
    m = _CODE.search(text)
    if not m:
        return AirlockError(text)
    code, message = m.group(1), m.group(2)
    # Drivers append their own context after the server's message.
    message = re.split(r" \((?:PermissionDenied|Unauthenticated|InvalidArgument)[;)]", message)[0].strip()
    r = _REQUEST.match(message)
    if code == "APPROVAL_PENDING" and r:
        return ApprovalPending(r.group(1), r.group(2))
    if code == "APPROVAL_DENIED" and r:
        return ApprovalDenied(r.group(1), r.group(2))
    return PolicyViolation(code, message)
