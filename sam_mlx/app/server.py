"""The app's local HTTP server: the page, the JSON API (README, "The app's HTTP API") and the hover WebSocket.

Starlette routes served by uvicorn on a thread of their own; the MLX work is the engine's: decoding on the
thread that calls ``serve`` (the main thread of ``sam-mlx app``), encoding on one more. Security: the server
listens on 127.0.0.1 only; requests whose Host header is not 127.0.0.1 or localhost are refused (DNS rebinding);
every ``/api/`` request must carry the run's token (header ``X-SAM-Token`` or query ``token``), which the command
prints in the page's address; paths stay inside the opened and export folders (``library``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
import signal
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .. import __version__
from ..io.atomic import atomic_write
from ..io.images import load_image
from ..io.tokens import model_identity
from .engine import Engine, HintExpired, Prompt
from .library import Forbidden, Library, UnknownImage, display_image
from .masks import MASK_FORMATS, clean_mask, clean_shown_mask, decode_mask
from .project import Conflict, NotFound, Project
from .project_api import project_routes

STATIC = Path(__file__).parent / "static"
HOST = "127.0.0.1"
ALLOWED_HOSTS = ("127.0.0.1", "localhost")
TOKEN_HEADER = "x-sam-token"
PROMPTS_FORMAT = "sam_mlx_app_prompts"
# The page's own files only: no inline script, nothing from elsewhere, never inside another site's frame.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class TokenGuard:
    """ASGI middleware: ``/api/`` requests need the run's token; WebSockets also a same-site Origin, if any."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith("/api/"):
            headers = Headers(scope=scope)
            given = headers.get(TOKEN_HEADER) or parse_qs(scope["query_string"].decode()).get("token", [""])[0]
            origin = headers.get("origin")
            if not hmac.compare_digest(given.encode(), self.token):
                reason = "missing or wrong token: open the address `sam-mlx app` printed"
                return await self._refuse(scope, receive, send, reason)
            if scope["type"] == "websocket" and origin and urlsplit(origin).hostname not in ALLOWED_HOSTS:
                return await self._refuse(scope, receive, send, f"WebSocket from a foreign origin {origin}")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
        else:
            await JSONResponse({"error": reason}, status_code=403)(scope, receive, send)


def create_app(engine: Engine, token: str, prefetch: int = 2, project: Project | None = None) -> Starlette:
    """The Starlette application of one app run (with ``project``: its endpoints, ``project_api``)."""
    library = engine.library

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def info(request: Request) -> Response:
        export = _export_module()
        return JSONResponse({
            "version": __version__, "model": model_identity(engine.model), "sizing": engine.sizing,
            "size": engine.size, "mask_formats": list(MASK_FORMATS), "export_root": str(library.export_root),
            "export_formats": list(export.FORMATS) if export else [],
            "default_simplify": export.DEFAULT_SIMPLIFY if export else None, "prefetch": prefetch,
            "hovers_dropped": engine.hovers_dropped,
        })

    def describe(entry) -> dict:
        return entry.describe(engine.expected_encode_seconds())

    async def images(request: Request) -> Response:
        if request.method == "POST":
            body = await _json(request)
            added = library.open(_field(body, "path", str))
            return JSONResponse({"images": [describe(e) for e in added]})
        return JSONResponse({"images": [describe(e) for e in library.all()],
                             "expected_encode_seconds": engine.expected_encode_seconds()})

    async def image(request: Request) -> Response:
        return JSONResponse(describe(library.get(request.path_params["image_id"])))

    async def image_file(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        data, media_type = await run_in_threadpool(display_image, entry)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    async def encode(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        body = await _json(request) if await request.body() else {}
        ahead = _field(body, "prefetch", int, prefetch)
        if not 0 <= ahead <= 64:
            raise ValueError(f"prefetch must be 0..64 images, got {ahead}")
        engine.focus(entry.id, ahead)
        return JSONResponse(describe(entry))

    async def decode(request: Request) -> Response:
        start = time.perf_counter()
        body = await _json(request)
        image_id = library.get(_field(body, "image", int)).id
        mask_format = _mask_format(body)
        return_low_res = _field(body, "return_low_res", bool, False)
        future = engine.decode(image_id, _prompt(body), mask_format, return_low_res, _max_side(body))
        result = await asyncio.wrap_future(future)
        if return_low_res:
            low_res = result.pop("low_res")
            result["low_res"] = {"shape": list(low_res.shape), "float32": _b64(low_res)}
        result["server_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        return JSONResponse(result)

    async def cleanup(request: Request) -> Response:
        body = await _json(request)
        mask_format = _mask_format(body)
        holes = _field(body, "fill_holes", (int, float), 0)
        islands = _field(body, "remove_islands", (int, float), 0)
        image_id = _field(body, "image", int, None)
        size = library.get(image_id).size if image_id is not None else None

        def clean() -> dict:
            mask = decode_mask(body.get("mask"))
            return clean_shown_mask(mask, size or mask.shape[::-1], holes, islands, mask_format)

        return JSONResponse(await run_in_threadpool(clean))

    async def polygons(request: Request) -> Response:
        body = await _json(request)
        image_id = _field(body, "image", int, None)
        size = library.get(image_id).size if image_id is not None else None
        simplify = _field(body, "simplify", (int, float), None)
        return JSONResponse(await run_in_threadpool(_polygons, decode_mask(body.get("mask")), size, simplify))

    async def export(request: Request) -> Response:
        body = await _json(request)
        return JSONResponse(await run_in_threadpool(_export, engine, body))

    async def prompts(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        folder = library.export_dir(request.query_params.get("folder", ""))
        path = folder / f"{entry.stem}.prompts.json"
        if not path.is_file():
            return JSONResponse({"error": f"no saved prompts for {entry.path.name} in {folder}"}, status_code=404)
        return JSONResponse(json.loads(path.read_text()))

    async def hover(websocket: WebSocket) -> None:
        await websocket.accept()
        key, sending, tasks = object(), asyncio.Lock(), set()

        async def deliver(request: dict, future) -> None:
            try:
                result = await asyncio.wrap_future(future)
                reply = {**request, "ready": False} if result is None else {**request, "ready": True, **result}
            except asyncio.CancelledError:
                if future.cancelled():
                    return  # dropped: a newer position came before this one started
                raise
            except (ValueError, KeyError) as exc:
                reply = {**request, "error": _message(exc)}
            async with sending:
                await websocket.send_json(reply)

        try:
            while True:
                message = await websocket.receive_json()
                try:
                    request = {"seq": _field(message, "seq", int, 0),
                               "image": library.get(_field(message, "image", int)).id}
                    x, y = (float(_field(message, k, (int, float))) for k in ("x", "y"))
                    mask_format, max_side = _mask_format(message), _max_side(message)
                except (ValueError, KeyError) as exc:
                    async with sending:
                        await websocket.send_json({"error": _message(exc)})
                    continue
                future = engine.hover(key, request["image"], x, y, mask_format, max_side)
                task = asyncio.create_task(deliver(request, future))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (WebSocketDisconnect, json.JSONDecodeError):
            pass
        finally:
            for task in tasks:
                task.cancel()

    def error(status: int) -> Callable:
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": _message(exc)}, status_code=status)

        return handler

    routes = [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/info", info),
        Route("/api/images", images, methods=["GET", "POST"]),
        Route("/api/images/{image_id:int}", image),
        Route("/api/images/{image_id:int}/file", image_file),
        Route("/api/images/{image_id:int}/encode", encode, methods=["POST"]),
        Route("/api/images/{image_id:int}/prompts", prompts),
        Route("/api/decode", decode, methods=["POST"]),
        Route("/api/cleanup", cleanup, methods=["POST"]),
        Route("/api/polygons", polygons, methods=["POST"]),
        Route("/api/export", export, methods=["POST"]),
        WebSocketRoute("/api/hover", hover),
    ] + (project_routes(project, library) if project else [])
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(ALLOWED_HOSTS)),
                  Middleware(TokenGuard, token=token)]
    handlers = {Forbidden: error(403), UnknownImage: error(404), HintExpired: error(409), ValueError: error(400),
                ExportUnavailable: error(501), Conflict: error(409), NotFound: error(404)}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


# ---------------------------------------------------------------- request parsing
def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


async def _json(request: Request) -> dict:
    body = await request.json()
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


_MISSING = object()


def _field(body: dict, name: str, kind, default: Any = _MISSING) -> Any:
    """``body[name]`` checked to be of ``kind`` (bool is not taken for a number), else ``default``."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise ValueError(f"missing field {name!r}")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"field {name!r} must be {names}, got {json.dumps(value)[:40]}")
    return value


def _mask_format(body: dict) -> str:
    mask_format = _field(body, "mask_format", str, "png")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    return mask_format


def _max_side(body: dict) -> int | None:
    max_side = _field(body, "max_side", int, None)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    return max_side


def _prompt(body: dict) -> Prompt:
    """The decode request's prompt: points + labels, box, mask hint, multimask (values checked by the predictor)."""
    points = labels = box = hint = None
    if body.get("points") is not None:
        points = np.asarray(_field(body, "points", list), dtype=np.float64)
        labels = np.asarray(_field(body, "labels", list))
    if body.get("box") is not None:
        box = np.asarray(_field(body, "box", list), dtype=np.float64)
    mask_input = _field(body, "mask_input", dict, None)
    if mask_input is not None:
        if "result" in mask_input:
            hint = (_field(mask_input, "result", str), _field(mask_input, "candidate", int, 0))
        elif "float32" in mask_input:
            shape = tuple(_field(mask_input, "shape", list))
            data = np.frombuffer(base64.b64decode(_field(mask_input, "float32", str)), dtype="<f4")
            if data.size != np.prod(shape):
                raise ValueError(f"mask_input: {data.size} float32 values do not fill shape {list(shape)}")
            hint = data.reshape(shape)
        else:
            raise ValueError('mask_input must be {"result": id, "candidate": i} '
                             'or {"float32": base64, "shape": [1, h, w]}')
    return Prompt(points, labels, box, hint, _field(body, "multimask", bool, True))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


# ---------------------------------------------------------------- export
class ExportUnavailable(RuntimeError):
    """sam_mlx.io.export (the export formats) is not there."""


def _export_module():
    try:
        from ..io import export
    except ImportError:
        return None
    return export


def _polygons(mask: np.ndarray, image_size: tuple[int, int] | None, simplify: float | None) -> dict:
    """The polygons the COCO export would write for a mask (a shrunk one: scaled to the image's pixels)."""
    export = _export_module()
    if export is None:
        raise ExportUnavailable("this sam_mlx has no export module (sam_mlx.io.export)")
    simplify = export.DEFAULT_SIMPLIFY if simplify is None else float(simplify)
    if not simplify >= 0:
        raise ValueError(f"simplify must be a number of pixels >= 0, got {simplify}")
    width, height = image_size or mask.shape[::-1]
    scale = np.array([width / mask.shape[1], height / mask.shape[0]])
    try:
        traced = export.mask_polygons(mask, simplify / scale.max(), outline=True)
    except ImportError as exc:
        raise ExportUnavailable(str(exc)) from None
    return {"polygons": [(polygon * scale).round(2).tolist() for polygon in traced],
            "vertices": sum(len(polygon) for polygon in traced)}


def _steps(item: dict) -> list[tuple[Prompt, int]]:
    """An object's prompt steps: [{points: [[x, y, label], ...], box, multimask, selected}, ...]."""
    steps = []
    for step in _field(item, "steps", list):
        if not isinstance(step, dict):
            raise ValueError("a step must be a JSON object")
        triples = np.asarray(_field(step, "points", list, []), dtype=np.float64).reshape(-1, 3)
        points = {"points": triples[:, :2].tolist(), "labels": triples[:, 2].astype(int).tolist()} if len(triples) \
            else {}
        prompt = _prompt({**points, "box": step.get("box"), "multimask": _field(step, "multimask", bool)})
        steps.append((prompt, _field(step, "selected", int)))
    return steps


def _export(engine: Engine, body: dict) -> dict:
    """Write the export formats of the given images' objects and, per image, the prompts that reopen them.

    An object's mask is given (``mask``) or made again here from its prompt steps (``steps``), exactly as the
    page showed it, at the image's full size; the clean-up is applied to every object.
    """
    library = engine.library
    folder = library.export_dir(_field(body, "folder", str, ""))
    export = _export_module()
    if export is None:
        raise ExportUnavailable("this sam_mlx has no export module (sam_mlx.io.export)")
    formats = _field(body, "formats", list)
    unknown = [f for f in formats if f not in export.FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {', '.join(export.FORMATS)}, got {formats}")
    simplify = float(_field(body, "simplify", (int, float), export.DEFAULT_SIMPLIFY))
    cleanup = {k: _field(body, k, (int, float), 0) for k in ("fill_holes", "remove_islands")}
    # Everything is checked and decoded before the first file is written.
    work = []
    for item in _field(body, "images", list):
        entry = library.get(_field(item, "image", int))
        image = load_image(entry.path)
        size = (image.shape[1], image.shape[0])
        objects, saved = [], []
        for given in _field(item, "objects", list):
            label = _field(given, "label", str, None)
            if given.get("steps") is not None:
                steps = _steps(given)
                mask, score = engine.replay(entry.id, steps).result()
                saved.append({"label": label, "color": _field(given, "color", str, None), "steps": given["steps"]})
                last = steps[-1][0]
                prompt = {"prompt": {"points": None if last.points is None else last.points.tolist(),
                                     "labels": None if last.labels is None else last.labels.tolist(),
                                     "box": None if last.box is None else last.box.tolist()}}
            else:
                mask, prompt = decode_mask(given.get("mask"), size), None
                score = _field(given, "score", (int, float), None)
            objects.append(export.ExportObject(mask=clean_mask(mask, **cleanup), label=label, score=score,
                                               extra=prompt))
        work.append((entry, image, objects, saved))
    folder.mkdir(parents=True, exist_ok=True)
    exporter = export.Exporter(folder, formats, simplify=simplify)
    written: list[Path] = []
    for entry, image, objects, saved in work:
        written += exporter.add(entry.path, image, objects, stem=entry.stem)
        if not saved:
            continue
        record = {"format": PROMPTS_FORMAT, "version": 1, "image": str(entry.path), "width": image.shape[1],
                  "height": image.shape[0], "model": model_identity(engine.model), "sizing": engine.sizing,
                  "size": engine.size, "cleanup": {**cleanup, "simplify": simplify}, "objects": saved}
        path = folder / f"{entry.stem}.prompts.json"
        written.append(atomic_write(path, lambda tmp, r=record: Path(tmp).write_text(json.dumps(r, indent=1) + "\n"),
                                    suffix=".json"))
    written += exporter.close()
    return {"folder": str(folder), "files": [str(Path(p).relative_to(folder)) for p in written]}


# ---------------------------------------------------------------- running
def serve(library: Library, model, sizing: str = "original", size: int | None = None, port: int = 8000,
          open_browser: bool = True, tokens_dir: Path | None = None, prefetch: int = 2, token: str | None = None,
          tokens_cache_bytes: int = 2 << 30, project: Project | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
          announce: Callable[[dict], None] | None = None) -> None:
    """Serve the app until Ctrl+C / SIGTERM; the model's decoding runs on this (the calling) thread.

    ``announce``: called with ``{url, port, token}`` once the server listens (``sam-mlx app --json``).
    """
    from ..checkpoints.hub import default_cache_dir

    token = token or secrets.token_urlsafe(24)
    engine = Engine(model, library, tokens_dir or default_cache_dir() / "app_tokens", sizing, size,
                    tokens_cache_bytes=tokens_cache_bytes, log=log)
    app = create_app(engine, token, prefetch, project)
    listener = _listen(port)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="sam-mlx-app-http")
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not thread.is_alive():
        raise RuntimeError("the HTTP server did not start (see the messages above)")
    url = f"http://{HOST}:{port}/#token={token}"
    count = len(library.all())
    kept = f", work kept in {project.path}" if project else ""
    log(f"sam-mlx app: {count} image{'s' * (count != 1)}, exports to {library.export_root}{kept}")
    log(f"sam-mlx app: serving {url}  (Ctrl+C stops)")
    if announce:
        announce({"url": url, "port": port, "token": token})
    if library.all():
        engine.focus(0, prefetch)
    if open_browser:
        webbrowser.open(url)
    stop = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    for number in stop:
        signal.signal(number, lambda *_: engine.stop())
    try:
        engine.run(until=lambda: not thread.is_alive())
    finally:
        for number, handler in stop.items():
            signal.signal(number, handler)
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
    log("sam-mlx app: stopped")


def _listen(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:port (0: any free port)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, port))
    except OSError as exc:
        listener.close()
        message = f"cannot listen on {HOST}:{port} ({exc.strerror}): choose another --port (0: any free one)"
        raise ValueError(message) from None
    return listener
