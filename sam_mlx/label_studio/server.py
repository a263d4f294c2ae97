"""The Label Studio ML backend's HTTP server: ``/health``, ``/setup``, ``/predict``, ``/webhook``, ``/versions``;
and X-AnyLabeling's remote server protocol, ``/v1/models`` and ``/v1/predict`` (``anylabeling``).

Request and response shapes are Label Studio's (``label_studio/ml/api_connector.py`` sends them): ``/setup`` gets
``{project: "<id>.<timestamp>", schema: <labelling config XML>, ...}`` and answers ``{model_version}``;
``/predict`` gets ``{tasks, project, label_config, params: {context}}`` and answers ``{results: [prediction, ...]}``.

Security, as ``sam-mlx app``: the server listens on 127.0.0.1 unless told otherwise, and then answers only requests
whose Host header is 127.0.0.1 or localhost (DNS rebinding); listening elsewhere needs basic auth (Label Studio's
"Basic Authentication" option of the model, checked on every request). POST bodies must be JSON
(``Content-Type: application/json``, which a foreign web page cannot send without the browser asking first) and at
most ``max_body_bytes``. Errors are one-line JSON: ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import hmac
import signal
import sys
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..app.limits import one_line, parse_json
from ..app.server import listen, start_in_thread
from ..io.tokens import model_identity
from . import anylabeling
from .backend import SamBackend
from .images import ImageAccessError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class RequestTooLarge(ValueError):
    """A request body over the server's limit."""


class Guard:
    """ASGI middleware: Host header, basic auth, JSON bodies (see the module's docstring)."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, basic_auth: tuple[str, str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.basic_auth = basic_auth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return await _error(f"Host {host!r} is not served: use http://127.0.0.1:PORT", 400)(scope, receive, send)
        if self.basic_auth is not None and not self._authorised(headers.get("authorization", "")):
            response = _error("basic auth required: the user and password set on the backend", 401)
            response.headers["WWW-Authenticate"] = 'Basic realm="sam-mlx label-studio"'
            return await response(scope, receive, send)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and content_type != "application/json":
            return await _error(f"POST bodies must be JSON (Content-Type: application/json), got "
                                f"{content_type or 'none'!r}", 415)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorised(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        expected_user, expected_password = self.basic_auth
        # Both compared, whatever the first gives: the time does not tell which one was wrong.
        same_user = hmac.compare_digest(user.encode(), expected_user.encode())
        return hmac.compare_digest(password.encode(), expected_password.encode()) and same_user


def create_app(backend: SamBackend, allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
               basic_auth: tuple[str, str] | None = None, max_body_bytes: int = 16 << 20,
               log: Callable[[str], None] = lambda message: None) -> Starlette:
    """The Starlette application serving ``backend``. ``allowed_hosts=None``: any Host header."""

    async def body_of(request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > max_body_bytes:
            raise RequestTooLarge(f"request body of {size} bytes is over the limit of {max_body_bytes} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise RequestTooLarge(f"request body is over the limit of {max_body_bytes} bytes")
        return parse_json(bytes(data), request.headers.get("content-type"))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "UP", "model_class": "sam_mlx", "version": __version__,
                             "model": model_identity(backend.model), "model_version": backend.model_version})

    async def setup(request: Request) -> Response:
        body = await body_of(request)
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise ValueError("missing field 'schema' (the project's labelling config)")
        answer = await run_in_threadpool(backend.setup, body.get("project"), schema)
        log(f"sam-mlx label-studio: setup of project {body.get('project')}: {answer['controls']}")
        return JSONResponse(answer)

    async def predict(request: Request) -> Response:
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(backend.predict, body))

    async def webhook(request: Request) -> Response:
        body = await body_of(request)
        return JSONResponse({"status": "ok", "action": body.get("action"), "trained": False})

    async def anylabeling_models(request: Request) -> Response:
        return JSONResponse(anylabeling.models(backend))

    async def anylabeling_predict(request: Request) -> Response:
        body = await body_of(request)
        return JSONResponse(await run_in_threadpool(anylabeling.predict, backend, body))

    async def versions(request: Request) -> Response:
        return JSONResponse({"versions": [backend.model_version]})

    def error(status: int) -> Callable:
        async def handler(request: Request, exc: Exception) -> Response:
            if status >= 500:
                log(f"sam-mlx label-studio: {request.url.path}: {type(exc).__name__}: {_message(exc)}")
            return _error(_message(exc), status)

        return handler

    routes = [
        Route("/", health), Route("/health", health), Route("/versions", versions),
        Route("/setup", setup, methods=["POST"]), Route("/predict", predict, methods=["POST"]),
        Route("/webhook", webhook, methods=["POST"]),
        Route("/v1/models", anylabeling_models), Route("/v1/predict", anylabeling_predict, methods=["POST"]),
    ]
    handlers = {RequestTooLarge: error(413), ImageAccessError: error(422), ValueError: error(400),
                KeyError: error(400), Exception: error(500)}
    return Starlette(routes=routes, middleware=[Middleware(Guard, allowed_hosts=allowed_hosts, basic_auth=basic_auth)],
                     exception_handlers=handlers)


def _message(exc: BaseException) -> str:
    """One line, at most MAX_MESSAGE_CHARS: a message never echoes a request back at length."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return one_line(text) or type(exc).__name__


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def serve(backend: SamBackend, host: str = "127.0.0.1", port: int = 9090, basic_auth: tuple[str, str] | None = None,
          max_body_bytes: int = 16 << 20, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
          announce: Callable[[dict], None] | None = None) -> None:
    """Serve until Ctrl+C / SIGTERM. Listening on an address other than loopback needs ``basic_auth``."""
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not loopback and basic_auth is None:
        raise ValueError(f"--host {host} makes the backend reachable from other machines: set a basic auth user "
                         "and password (BASIC_AUTH_USER and BASIC_AUTH_PASS) and the same in Label Studio's model "
                         "settings")
    app = create_app(backend, LOOPBACK_HOSTS + ("::1",) if loopback else None, basic_auth, max_body_bytes, log)
    listener = listen(port, host)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    # uvicorn on a thread: Ctrl+C / SIGTERM are this thread's, and end the command with exit code 0.
    stop = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in stop:
        signal.signal(number, lambda *_: setattr(server, "should_exit", True))
    thread = None
    try:
        thread = start_in_thread(server, listener, "sam-mlx-label-studio-http")
        url = f"http://{'127.0.0.1' if host == 'localhost' else host}:{port}"
        log(f"sam-mlx label-studio: {model_identity(backend.model)} serving {url}  (Ctrl+C stops)")
        if announce:
            announce({"url": url, "port": port, "model_version": backend.model_version})
        while thread.is_alive():
            thread.join(0.2)
    finally:
        server.should_exit = True
        if thread is not None:
            thread.join(timeout=10)
        for number, handler in stop.items():
            signal.signal(number, handler)
        listener.close()
        backend.close()
    log("sam-mlx label-studio: stopped")
