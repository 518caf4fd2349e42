"""Errors the server's policy decisions turn into.

The server refuses with gRPC ``PermissionDenied``, a message that starts with the stable
reason code in brackets (``[AGGREGATE_NOT_ALLOWED] aggregate max is not on ...``), and the
same code in the ``airlock-reason-code`` response header (with the call's id in
``airlock-request-id``). The header is used when the driver passes it through (ADBC
reports response metadata as error details); the message is the fallback.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["AirlockError", "PolicyViolation", "ApprovalPending", "ApprovalDenied"]

REASON_CODE_HEADER = "airlock-reason-code"
REQUEST_ID_HEADER = "airlock-request-id"


class AirlockError(Exception):
    """Any failure talking to an Airlock server. ``server_request_id`` is the id of the
    failed call (``airlock-request-id``), for the owner's logs, when the driver reports it."""

    server_request_id: str | None = None


class PolicyViolation(AirlockError):
    """The server's policy refused the query; ``code`` is its stable reason code
    (``AGGREGATE_NOT_ALLOWED``, ``EXPRESSION_NOT_ALLOWED``, ``APPROVAL_PENDING``, ...)."""

    def __init__(self, code: str, message: str, *, server_request_id: str | None = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.server_request_id = server_request_id


class ApprovalPending(PolicyViolation):
    """The result needs the data owner's approval; ``request_id`` names the approval
    request, ``reason`` says why the automatic rules did not release it, and
    ``reason_codes`` lists the codes in that reason (``["AGGREGATE_NOT_ALLOWED"]``)."""

    def __init__(self, request_id: str, reason: str, *, server_request_id: str | None = None):
        super().__init__("APPROVAL_PENDING", f"request {request_id}: {reason}", server_request_id=server_request_id)
        self.request_id = request_id
        self.reason = reason
        self.reason_codes = reason_codes(reason)


class ApprovalDenied(PolicyViolation):
    """The data owner denied the request, with ``reason``."""

    def __init__(self, request_id: str, reason: str, *, server_request_id: str | None = None):
        super().__init__("APPROVAL_DENIED", f"request {request_id}: {reason}", server_request_id=server_request_id)
        self.request_id = request_id
        self.reason = reason


_CODE = re.compile(r"\[([A-Z][A-Z0-9_]*)\] (.*)", re.S)
_REQUEST = re.compile(r"request (\w+): (.*)", re.S)
_REASON_CODE = re.compile(r"(?:^|;\s*)\[?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\]?:?\s")
_VALID_CODE = re.compile(r"[A-Z][A-Z0-9_]*")


def reason_codes(reason: str) -> list[str]:
    """The reason codes at the start of each ``;``-separated part of an approval reason
    (``"AGGREGATE_NOT_ALLOWED: ...; AGGREGATE_REQUIRED: ..."``)."""
    return list(dict.fromkeys(_REASON_CODE.findall(reason)))


def _text(value: Any) -> str | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value.strip()
    return None


def _headers(error: Exception) -> dict[str, str]:
    """Response metadata the driver attached to the error: ADBC's ``details``, a list of
    (key, value) pairs of bytes (``(b"airlock-reason-code", b"APPROVAL_PENDING")``);
    other drivers' errors have none."""
    out: dict[str, str] = {}
    details = getattr(error, "details", None)
    if not isinstance(details, (list, tuple)):
        return out
    for item in details:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        name, text = _text(key), _text(value)
        if name and text is not None:
            out.setdefault(name.lower(), text)
    return out


def translate(error: Exception) -> Exception:
    """Turns a driver error carrying ``[CODE] message`` (and, where the driver reports
    them, the ``airlock-reason-code`` and ``airlock-request-id`` headers) into the matching
    exception: :class:`PolicyViolation` (or its subclasses) for refusals, else
    :class:`AirlockError`."""
    text = str(error)
    headers = _headers(error)
    header_code = headers.get(REASON_CODE_HEADER)
    if header_code is not None and not _VALID_CODE.fullmatch(header_code):
        header_code = None
    call_id = headers.get(REQUEST_ID_HEADER)
    m = _CODE.search(text)
    if not m and header_code is None:
        e = AirlockError(text)
        e.server_request_id = call_id
        return e
    code = header_code or m.group(1)  # type: ignore[union-attr]
    message = m.group(2) if m else text
    # Drivers append their own context after the server's message.
    message = re.split(r" \((?:PermissionDenied|Unauthenticated|InvalidArgument)[;)]", message)[0].strip()
    r = _REQUEST.match(message)
    if code == "APPROVAL_PENDING" and r:
        return ApprovalPending(r.group(1), r.group(2), server_request_id=call_id)
    if code == "APPROVAL_DENIED" and r:
        return ApprovalDenied(r.group(1), r.group(2), server_request_id=call_id)
    return PolicyViolation(code, message, server_request_id=call_id)
