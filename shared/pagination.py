"""AIP-158 pagination: page sizes and opaque page tokens.

A page token records where the next page starts and a fingerprint of the
request it belongs to, so a token sent with a different filter or ordering is
refused instead of silently returning the wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from conveyor.shared.errors import FieldViolation, InvalidArgumentError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """0 means the default, values above the maximum are lowered, negatives refused."""
    if requested < 0:
        raise InvalidArgumentError(
            "page_size must not be negative",
            violations=[FieldViolation("page_size", f"got {requested}; use 0 for the default")],
        )
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class PageCursor:
    """Where a page starts: an offset into the ordered, filtered collection."""

    offset: int


def fingerprint(*request_fields: object) -> str:
    """A short digest of the request fields a token must be reused with."""
    text = json.dumps([str(field) for field in request_fields])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_page_token(cursor: PageCursor, request_fingerprint: str) -> str:
    payload = json.dumps({"o": cursor.offset, "f": request_fingerprint}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_page_token(token: str, request_fingerprint: str) -> PageCursor:
    """The cursor in ``token`` (the first page when empty)."""
    if not token:
        return PageCursor(offset=0)
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        offset, owner = int(payload["o"]), str(payload["f"])
    except (ValueError, KeyError, TypeError) as error:
        raise _bad_token("not a page token from this service") from error
    if owner != request_fingerprint:
        raise _bad_token("the page token belongs to a request with other parameters")
    if offset < 0:
        raise _bad_token("not a page token from this service")
    return PageCursor(offset=offset)


def next_page_token(has_more: bool, cursor: PageCursor, size: int, request_fingerprint: str) -> str:
    """The token of the page after ``cursor``'s (of ``size`` items); empty when
    there is none."""
    if not has_more:
        return ""
    return encode_page_token(PageCursor(cursor.offset + size), request_fingerprint)


def newest_first(order_by: str) -> bool:
    """For a listing ordered by creation: ``create_time desc`` (the default,
    newest first) or ``create_time`` / ``create_time asc``."""
    text = " ".join(order_by.split())
    if text in ("", "create_time desc"):
        return True
    if text in ("create_time", "create_time asc"):
        return False
    description = "'create_time desc' (the default) or 'create_time asc'"
    raise InvalidArgumentError(
        f"order_by: {description}", violations=[FieldViolation("order_by", description)]
    )


def _bad_token(description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"invalid page_token: {description}",
        violations=[FieldViolation("page_token", description)],
        reason="INVALID_PAGE_TOKEN",
    )
