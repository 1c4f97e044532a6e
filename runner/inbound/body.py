"""Reading a request body no further than a bound: a declared length over it is refused unread, and a body
sent chunked is cut off as soon as it passes the bound (never read whole first)."""
from __future__ import annotations

from typing import Any


async def read_bounded(request: Any, limit: int) -> bytes | None:
    """The body of a Starlette request, or None when it is longer than `limit` bytes."""
    declared = (request.headers.get("content-length") or "").strip()
    if declared.isdigit() and (len(declared) > 12 or int(declared) > limit):
        return None
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)
