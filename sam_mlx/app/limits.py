"""The app's bounds on one request, and the checked reading of request bodies.

No real use comes near these limits; they keep one careless or hostile request from taking the app down
(minutes of decoding, gigabytes of memory). Beyond them a request is refused with 413 (too large) or 400 (not
valid), with a one-line ``{"error": ...}`` that never echoes the request back at length.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

MAX_BODY_BYTES = 32 << 20  # one request's body: ~10,000 exported masks as PNG
MAX_POINTS = 200  # points in one prompt: the page adds one per click (MobileSAM: ~0.3-1 s for 200 on a CPU)
MAX_STEPS = 200  # prompt steps of one exported object: one per click on it
MAX_OBJECTS = 1000  # objects of one image in an export (segment everything finds ~100)
MAX_EXPORT_IMAGES = 1000  # images in one export, each listed once
MAX_EXPORT_STEPS = 20_000  # prompt steps decoded again in one export (~15 minutes of MobileSAM on a laptop CPU)
MAX_EXPORT_POINTS = 100_000  # points over those steps (a step lists all its object's points so far)
MAX_MASK_PIXELS = 1 << 26  # a mask not tied to an image (64 M pixels: 8192 x 8192)
MAX_HINT_VALUES = 4 * 256 * 256  # a mask hint's low-res logits: C x 256 x 256
MAX_SIMPLIFY = 10_000.0  # pixels of polygon simplification
MAX_PATH_CHARS = 4096  # a path sent to the app (Linux's PATH_MAX)
MAX_MESSAGE_CHARS = 300  # an error message's length
MAX_WEBSOCKET_BYTES = 64 << 10  # one hover message
REQUEST_HEAD_SECONDS = 5.0  # from a connection's first byte (or its opening) to a request's whole head
REQUEST_BODY_SECONDS = 20.0  # from a request's head to the end of its body (32 MB on 127.0.0.1: < 1 s)


class TooLarge(ValueError):
    """A request beyond one of the limits above: answered 413."""


class UnsupportedMediaType(ValueError):
    """A request body that is not JSON: answered 415."""


class RequestTimeout(ValueError):
    """A request body that did not arrive whole in time: answered 408."""


def one_line(text: object) -> str:
    """``text`` on one line, cut to ``MAX_MESSAGE_CHARS`` (an error never carries a request's bulk back)."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


class BodyLimit:
    """ASGI middleware: an HTTP body over ``max_bytes`` is refused 413, by its Content-Length before it is read,
    or as it streams in (a chunked body): the endpoint's read raises ``TooLarge``. A body that has not arrived
    whole ``seconds`` after the request's head raises ``RequestTimeout`` (408) in the endpoint."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, seconds: float = REQUEST_BODY_SECONDS):
        self.app = app
        self.max_bytes = max_bytes
        self.seconds = seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_bytes:
            message = f"the request body ({length} bytes) is over the app's limit of {self.max_bytes} bytes"
            return await JSONResponse({"error": one_line(message)}, status_code=413)(scope, receive, send)
        received, whole, deadline = 0, False, asyncio.get_running_loop().time() + self.seconds

        async def counted() -> dict:
            nonlocal received, whole
            if whole:  # after the body: a wait for the client's disconnection, not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.seconds:g} s") from None
            received += len(message.get("body", b""))
            whole = not message.get("more_body", False)
            if received > self.max_bytes:
                raise TooLarge(f"the request body is over the app's limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def timed_h11_protocol(seconds: float = REQUEST_HEAD_SECONDS) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head has not come whole ``seconds`` after the
    connection opened or after the first byte of the head (uvicorn's keep-alive timer stops at the first byte:
    half a request would hold the connection for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._expect_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:
                self._expect_head()
            elif self.head_timer is not None:  # the head came whole
                self.head_timer.cancel()
                self.head_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def _expect_head(self) -> None:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(seconds, self._head_late)

        def _head_late(self) -> None:
            self.head_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            # (a WebSocket has taken the connection over: not ours to close)
            if waiting and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def parse_json(raw: bytes, content_type: str | None) -> dict:
    """A request body -> its JSON object; ``UnsupportedMediaType`` unless sent as ``application/json`` (a
    cross-site form or ``no-cors`` fetch cannot send that type), ValueError if not a JSON object."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("the request body must be sent as Content-Type: application/json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("the request body's JSON is nested too deep") from None
    except UnicodeDecodeError:
        raise ValueError("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the request body is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _no_constant(name: str) -> float:
    raise ValueError(f"the request body's JSON holds {name}, which is not a number")


def numbers(value: Any, name: str, columns: int | None = None, limit: int = MAX_POINTS) -> np.ndarray:
    """A JSON list of finite numbers (``columns`` given: a list of lists of that many) -> float64 array.

    Refused: anything else (null, text, true/false), more than ``limit`` rows (413), inf (``1e400``).
    """
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} must be a list, got {_kind(value)}")
    if len(value) > limit:
        raise TooLarge(f"field {name!r} has {len(value)} entries: the app takes at most {limit}")
    rows = value if columns is not None else [value]
    for row in rows:
        if columns is not None and (not isinstance(row, list) or len(row) != columns):
            raise ValueError(f"field {name!r} must be a list of [{', '.join(['number'] * columns)}], got {_kind(row)}")
        for item in row:
            if not _finite(item):
                raise ValueError(f"field {name!r} must hold finite numbers, got {_kind(item)}")
    return np.array(value, dtype=np.float64).reshape((-1, columns) if columns is not None else (-1,))


def finite(value: Any, name: str, low: float, high: float) -> float:
    """A number from ``low`` to ``high`` (both included)."""
    if not _finite(value) or not low <= value <= high:
        raise ValueError(f"field {name!r} must be a number from {low:g} to {high:g}, got {_kind(value)}")
    return float(value)


def shape(value: Any, name: str, dims: int, limit: int) -> tuple[int, ...]:
    """A shape of ``dims`` positive integers whose product is at most ``limit`` (else 413)."""
    if not (isinstance(value, list) and len(value) == dims
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"field {name!r} must be {dims} positive integers, got {_kind(value)}")
    if math.prod(value) > limit:
        raise TooLarge(f"field {name!r} {value} is over the app's limit of {limit} values")
    return tuple(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)}"
    return one_line(json.dumps(value))[:40]
