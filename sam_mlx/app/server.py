"""The app's local HTTP server: the page, the JSON API (docs/app.md, "The app's HTTP API") and the hover WebSocket.

Starlette routes served by uvicorn on a thread of their own; the MLX work is the engine's: decoding on the
thread that calls ``serve`` (the main thread of ``sam-mlx app``), encoding on one more. Security: the server
listens on 127.0.0.1 only; requests whose Host header is not 127.0.0.1 or localhost are refused (DNS rebinding);
every ``/api/`` request must carry the run's token (header ``X-SAM-Token`` or query ``token``), which the command
prints in the page's address, and an Origin, when it carries one, of this server exactly; paths stay inside the
opened and export folders (``library``), checked again when used. Bounds on what one request may ask, and the
checked reading of bodies, are ``limits``'.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import json
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

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
from ..io.atomic import atomic_write, locked_folder, one_set_of_files, remove_abandoned_temporaries
from ..io.images import load_image
from ..io.tokens import model_identity
from ..resources import format_bytes
from .engine import Engine, EngineStopped, HintExpired, Prompt
from .library import Forbidden, Library, UnknownImage, display_image
from .limits import (
    MAX_EXPORT_IMAGES,
    MAX_EXPORT_POINTS,
    MAX_EXPORT_STEPS,
    MAX_HINT_VALUES,
    MAX_OBJECTS,
    MAX_SIMPLIFY,
    MAX_STEPS,
    MAX_WEBSOCKET_BYTES,
    BodyLimit,
    RequestTimeout,
    TooLarge,
    UnsupportedMediaType,
    finite,
    numbers,
    one_line,
    parse_json,
    shape,
    timed_h11_protocol,
)
from .masks import MASK_FORMATS, clean_mask, clean_shown_mask, decode_mask, mask_outline
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
    """ASGI middleware: ``/api/`` requests need the run's token, and an Origin, if they carry one, of this server
    exactly (scheme, host and port: a page of another local server is another site)."""

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
            if origin is not None and origin not in _own_origins(scope):
                reason = f"request from a foreign origin {one_line(origin)[:80]}"
                return await self._refuse(scope, receive, send, reason)
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
        else:
            await JSONResponse({"error": reason}, status_code=403)(scope, receive, send)


def _own_origins(scope) -> set[str]:
    """The origins of this server's page: http://127.0.0.1:PORT and http://localhost:PORT."""
    port = scope["server"][1] if scope.get("server") else None
    return {f"http://{host}:{port}" for host in ALLOWED_HOSTS}


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
            added = await run_in_threadpool(library.open, _field(body, "path", str))  # a large folder: not here
            return JSONResponse({"images": [describe(e) for e in added]})
        return JSONResponse({"images": [describe(e) for e in library.all()],
                             "expected_encode_seconds": engine.expected_encode_seconds()})

    async def image(request: Request) -> Response:
        return JSONResponse(describe(library.get(request.path_params["image_id"])))

    async def image_file(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        data, media_type = await run_in_threadpool(lambda: display_image(entry, library.image_path(entry)))
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    async def encode(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        body = await _json(request) if await request.body() else {}  # an empty body: no Content-Type needed
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
        holes, islands = _areas(body)
        image_id = _field(body, "image", int, None)
        size = library.get(image_id).size if image_id is not None else None

        def clean() -> dict:
            mask = decode_mask(body.get("mask"), within=size)
            return clean_shown_mask(mask, size or mask.shape[::-1], holes, islands, mask_format)

        return JSONResponse(await run_in_threadpool(clean))

    async def polygons(request: Request) -> Response:
        body = await _json(request)
        image_id = _field(body, "image", int, None)
        size = library.get(image_id).size if image_id is not None else None
        simplify = _simplify(body, None)
        mask = await run_in_threadpool(decode_mask, body.get("mask"), None, size)
        return JSONResponse(await run_in_threadpool(_polygons, mask, size, simplify))

    async def export(request: Request) -> Response:
        body = await _json(request)
        return JSONResponse(await run_in_threadpool(_export, engine, body))

    async def prompts(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        folder = library.export_dir(request.query_params.get("folder", ""))

        def read() -> dict | None:
            path = library.export_file(folder / f"{entry.stem}.prompts.json")  # a link out of the folder: 403
            if not path.is_file():
                return None
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not a prompts file ({exc})") from None

        saved = await run_in_threadpool(read)
        if saved is None:
            return Response(status_code=204)  # none saved (yet): expected, not an error
        return JSONResponse(saved)

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
                frame = await websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                try:
                    if frame.get("text") is None:
                        raise ValueError("hover messages are JSON text, not binary frames")
                    message = json.loads(frame["text"])
                    if not isinstance(message, dict):
                        raise ValueError('a hover message is a JSON object {"seq", "image", "x", "y"}')
                    request = {"seq": _field(message, "seq", int, 0),
                               "image": library.get(_field(message, "image", int)).id}
                    x, y = (finite(message.get(k), k, -1e9, 1e9) for k in ("x", "y"))
                    mask_format, max_side = _mask_format(message), _max_side(message)
                except (ValueError, KeyError, RecursionError) as exc:
                    reason = "JSON nested too deep" if isinstance(exc, RecursionError) else _message(exc)
                    async with sending:
                        await websocket.send_json({"error": reason})
                    continue
                future = engine.hover(key, request["image"], x, y, mask_format, max_side)
                task = asyncio.create_task(deliver(request, future))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()

    def error(status: int) -> Callable:
        async def handler(request: Request, exc: Exception) -> Response:
            return JSONResponse({"error": _message(exc)}, status_code=status)

        return handler

    async def export_failed(request: Request, exc: Exception) -> Response:
        status = 507 if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 500
        return JSONResponse({"error": _message(exc)}, status_code=status)

    routes = [
        Route("/", index),
        Route("/static/index.html", index),  # the page by its file's name: with the page's headers
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
    ] + (project_routes(project, library, export_set) if project else [])
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(ALLOWED_HOSTS)),
                  Middleware(TokenGuard, token=token), Middleware(BodyLimit)]
    handlers = {Forbidden: error(403), UnknownImage: error(404), HintExpired: error(409), ValueError: error(400),
                TooLarge: error(413), UnsupportedMediaType: error(415), ExportUnavailable: error(501),
                EngineStopped: error(503), RequestTimeout: error(408), ExportConflict: error(409),
                Conflict: error(409), NotFound: error(404),
                ExportFailed: export_failed, Exception: error(500)}  # the last: JSON even for a defect of ours
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


# ---------------------------------------------------------------- request parsing
def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return one_line(text) or type(exc).__name__


async def _json(request: Request) -> dict:
    """The request's JSON object (``limits.parse_json``: JSON sent as such, within the body limit)."""
    return parse_json(await request.body(), request.headers.get("content-type"))


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


def _areas(body: dict) -> tuple[float, float]:
    """The clean-up's areas in pixels: fill_holes, remove_islands (0: off)."""
    return tuple(finite(body.get(k, 0) or 0, k, 0, 1e12) for k in ("fill_holes", "remove_islands"))


def _simplify(body: dict, default: float | None) -> float | None:
    value = body.get("simplify")
    return default if value is None else finite(value, "simplify", 0, MAX_SIMPLIFY)


def _prompt(body: dict) -> Prompt:
    """The decode request's prompt: points + labels, box, mask hint, multimask (values checked by the predictor)."""
    points = labels = box = hint = None
    if body.get("points") is not None:
        points = numbers(body["points"], "points", columns=2)
        labels = numbers(_field(body, "labels", list), "labels")
        if not np.array_equal(labels, labels.round()):
            raise ValueError(f"field 'labels' must hold whole numbers (1 foreground, 0 background), got {labels}")
        labels = labels.astype(np.int64)
    if body.get("box") is not None:
        box = numbers(body["box"], "box")
    mask_input = _field(body, "mask_input", dict, None)
    if mask_input is not None:
        if "result" in mask_input:
            hint = (_field(mask_input, "result", str), _field(mask_input, "candidate", int, 0))
        elif "float32" in mask_input:
            hint_shape = shape(mask_input.get("shape"), "mask_input.shape", 3, MAX_HINT_VALUES)
            text = _field(mask_input, "float32", str)
            if len(text) > 4 * MAX_HINT_VALUES * 4 / 3 + 4:
                raise TooLarge(f"mask_input is over the app's limit of {MAX_HINT_VALUES} float32 values")
            try:
                data = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4")
            except ValueError as exc:
                raise ValueError(f"mask_input.float32 is not base64 float32 values ({exc})") from None
            if data.size != np.prod(hint_shape):
                raise ValueError(f"mask_input: {data.size} float32 values do not fill shape {list(hint_shape)}")
            hint = data.reshape(hint_shape)
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
    """The polygons the COCO export would write for a mask (a shrunk one: scaled to the image's pixels), and
    ``rings``: the mask's boundary at the same simplification (outsides and holes' edges, uncut), which the page
    draws."""
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
        rings = mask_outline(mask, simplify / scale.max())
    except ImportError as exc:
        raise ExportUnavailable(str(exc)) from None
    return {"polygons": [(polygon * scale).round(2).tolist() for polygon in traced],
            "vertices": sum(len(polygon) for polygon in traced),
            "rings": [(ring * scale).round(2).tolist() for ring in rings]}


def _steps(item: dict) -> list[tuple[Prompt, int]]:
    """An object's prompt steps: [{points: [[x, y, label], ...], box, multimask, selected}, ...]."""
    steps = []
    given = _field(item, "steps", list)
    if len(given) > MAX_STEPS:
        raise TooLarge(f"an object has {len(given)} prompt steps: the app takes at most {MAX_STEPS}")
    for step in given:
        if not isinstance(step, dict):
            raise ValueError("a step must be a JSON object")
        triples = numbers(_field(step, "points", list, []), "steps.points", columns=3)
        points = {"points": triples[:, :2].tolist(), "labels": triples[:, 2].tolist()} if len(triples) else {}
        prompt = _prompt({**points, "box": step.get("box"), "multimask": _field(step, "multimask", bool)})
        steps.append((prompt, _field(step, "selected", int)))
    return steps


@dataclass
class _Wanted:
    """One object of an export request, checked: its prompt steps (made again here) or its mask (as sent)."""

    label: str | None
    color: str | None
    steps: list[tuple[Prompt, int]] | None
    sent_steps: list | None
    mask: dict | None
    score: float | None


class ExportFailed(OSError):
    """An export that could not be written (a full disk): no file of it was replaced."""


# The app's record of an export folder's last set: the files it wrote, removed when the next set replaces them.
EXPORT_RECORD = ".sam-mlx-app-export.json"
_EXPORT_SUBFOLDERS = ("yolo", "labelme")  # where the export formats write besides the folder itself


def _export_request(engine: Engine, body: dict) -> tuple[list[str], float, dict, list]:
    """An export request checked whole before any work: (formats, simplify, clean-up, [(image entry, objects)])."""
    export = _export_module()
    if export is None:
        raise ExportUnavailable("this sam_mlx has no export module (sam_mlx.io.export)")
    formats = _field(body, "formats", list)
    unknown = [f for f in formats if f not in export.FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {', '.join(export.FORMATS)}, got {_message(ValueError(formats))}")
    simplify = _simplify(body, export.DEFAULT_SIMPLIFY)
    cleanup = dict(zip(("fill_holes", "remove_islands"), _areas(body)))
    items = _field(body, "images", list)
    if len(items) > MAX_EXPORT_IMAGES:
        raise TooLarge(f"an export of {len(items)} images: the app takes at most {MAX_EXPORT_IMAGES} at once")
    work, seen, total_steps, total_points = [], set(), 0, 0
    for item in items:
        if not isinstance(item, dict):
            raise ValueError('each of "images" must be a JSON object {"image": id, "objects": [...]}')
        entry = engine.library.get(_field(item, "image", int))
        if entry.id in seen:
            raise ValueError(f"image {entry.id} ({entry.path.name}) is listed twice in the export")
        seen.add(entry.id)
        objects = _field(item, "objects", list)
        if len(objects) > MAX_OBJECTS:
            raise TooLarge(f"{entry.path.name} has {len(objects)} objects: the app exports at most {MAX_OBJECTS}")
        wanted = []
        for given in objects:
            if not isinstance(given, dict):
                raise ValueError('each object must be a JSON object {"label", "steps"} or {"label", "mask"}')
            label, color = _field(given, "label", str, None), _field(given, "color", str, None)
            if given.get("steps") is not None:
                steps = _steps(given)
                if not steps:
                    raise ValueError("an object needs at least one prompt step")
                total_steps += len(steps)
                total_points += sum(0 if prompt.points is None else len(prompt.points) for prompt, _ in steps)
                wanted.append(_Wanted(label, color, steps, given["steps"], None, None))
            else:
                if not isinstance(given.get("mask"), dict):
                    raise ValueError('an object needs "steps" or a "mask"')
                score = None if given.get("score") is None else finite(given["score"], "score", -1e9, 1e9)
                wanted.append(_Wanted(label, color, None, None, given["mask"], score))
        work.append((entry, wanted))
    if total_steps > MAX_EXPORT_STEPS:
        raise TooLarge(f"the export asks for {total_steps} prompt steps: the app takes at most {MAX_EXPORT_STEPS}")
    if total_points > MAX_EXPORT_POINTS:
        raise TooLarge(f"the export's prompt steps hold {total_points} points: the app takes at most "
                       f"{MAX_EXPORT_POINTS}")
    return formats, simplify, cleanup, work


def _export(engine: Engine, body: dict) -> dict:
    """Write the export formats of the given images' objects and, per image, the prompts that reopen them, as one
    set that replaces the folder's previous one (``export_set``).

    An object's mask is given (``mask``) or made again here from its prompt steps (``steps``), exactly as the
    page showed it, at the image's full size; the clean-up is applied to every object. The request is checked
    whole first; then one image at a time is made and written (so memory holds one image's masks).
    """
    library = engine.library
    folder = library.export_dir(_field(body, "folder", str, ""))
    formats, simplify, cleanup, work = _export_request(engine, body)
    export = _export_module()
    return export_set(library, folder, lambda: _write_set(engine, folder, formats, simplify, cleanup, work, export))


def export_set(library: Library, folder: Path, write: Callable[[], list[Path]]) -> dict:
    """Call ``write()`` (it writes an export's files into ``folder`` and returns them) so that they are one set that
    replaces the folder's previous one (docs/app.md: "What an export replaces").

    The files are written to temporaries and all renamed into place at the end, under a lock of the folder: a
    failure (a full disk, a stop) replaces nothing, and two exports into one folder take turns. Then the files of
    the previous set that this one did not write are removed. A file this set would replace that no export of the
    app wrote (the user's own) stops the export with 409, and nothing is replaced.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for sub in _EXPORT_SUBFOLDERS:  # a link there must not carry the files out of the export folder
            library.export_file(folder / sub)
        with locked_folder(folder):
            previous = _recorded_set(folder)
            for sub in ("", *_EXPORT_SUBFOLDERS):
                if (folder / sub).is_dir():
                    remove_abandoned_temporaries(folder / sub, r"[^/]+\.(png|json|txt)")
            with one_set_of_files():
                written = write()
                names = {path.relative_to(folder).as_posix() for path in written}
                theirs = sorted(name for name in names - previous if (folder / name).exists())
                if theirs:
                    raise ExportConflict(f"{folder / theirs[0]} was not written by an export of the app: not replaced "
                                         f"(move it, or export to another folder)")
                record = {"format": "sam_mlx_app_export", "version": 1, "files": sorted(names)}
                atomic_write(folder / EXPORT_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)),
                             suffix=".json")
            for name in sorted(previous - names):  # the last set's files this one does not replace
                if (folder / name).parent.resolve().is_relative_to(folder):
                    (folder / name).unlink(missing_ok=True)
    except OSError as exc:
        if isinstance(exc, ExportFailed):
            raise
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # atomic_write's: the system's error
        free = format_bytes(shutil.disk_usage(folder).free) if folder.is_dir() else "?"
        failed = ExportFailed(f"the export was not written ({cause.strerror or _message(cause)}; {free} free in "
                              f"{folder}): no file of it was replaced")
        failed.errno = cause.errno
        raise failed from exc
    return {"folder": str(folder), "files": sorted(names)}


def _write_set(engine: Engine, folder: Path, formats: list[str], simplify: float, cleanup: dict, work: list,
               export) -> list[Path]:
    """(Inside ``one_set_of_files``.) Each image's objects made and its files written; the run-level files."""
    exporter = export.Exporter(folder, formats, simplify=simplify)
    written: list[Path] = []
    for entry, wanted in work:
        image = load_image(engine.library.image_path(entry))
        size = (image.shape[1], image.shape[0])
        objects, saved = [], []
        for obj in wanted:
            if obj.steps is not None:
                mask, score = engine.replay(entry.id, obj.steps).result()
                saved.append({"label": obj.label, "color": obj.color, "steps": obj.sent_steps})
                last = obj.steps[-1][0]
                extra = {"prompt": {"points": None if last.points is None else last.points.tolist(),
                                    "labels": None if last.labels is None else last.labels.tolist(),
                                    "box": None if last.box is None else last.box.tolist()}}
            else:
                mask, score, extra = decode_mask(obj.mask, size), obj.score, None
            objects.append(export.ExportObject(mask=clean_mask(mask, **cleanup), label=obj.label, score=score,
                                               extra=extra))
        written += exporter.add(entry.path, image, objects, stem=entry.stem)
        del objects, image  # one image's masks in memory at a time
        if not saved:
            continue
        record = {"format": PROMPTS_FORMAT, "version": 1, "image": str(entry.path), "width": size[0],
                  "height": size[1], "model": model_identity(engine.model), "sizing": engine.sizing,
                  "size": engine.size, "cleanup": {**cleanup, "simplify": simplify}, "objects": saved}
        path = folder / f"{entry.stem}.prompts.json"
        written.append(atomic_write(path, lambda tmp, r=record: Path(tmp).write_text(json.dumps(r, indent=1) + "\n"),
                                    suffix=".json"))
    return written + exporter.close()


def _recorded_set(folder: Path) -> set[str]:
    """The files the folder's last export wrote (its record); none if there is no record of ours."""
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text())
        names = record["files"] if record.get("format") == "sam_mlx_app_export" else []
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()
    return {name for name in names if isinstance(name, str) and ".." not in Path(name).parts
            and not Path(name).is_absolute()}


class ExportConflict(ValueError):
    """An export that would replace a file no export of the app wrote: answered 409."""


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
    listener = listen(port)
    port = listener.getsockname()[1]
    # A stop ends the requests still running after 2 s; a hover message is small; a request's head must come
    # whole within the keep-alive time (limits.timed_h11_protocol).
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=2,
                            ws_max_size=MAX_WEBSOCKET_BYTES, http=timed_h11_protocol())
    server = uvicorn.Server(config)
    thread = start_in_thread(server, listener, "sam-mlx-app-http")
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


def listen(port: int, host: str = HOST) -> socket.socket:
    """A socket bound to host:port (0: any free port), whose connections send without Nagle's delay.

    Made with protocol IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets of
    that protocol, and a response written in two parts (head, body) would otherwise wait ~40 ms for the
    client's delayed ACK on every request after the first on a kept-open connection. The option is set on the
    listener too, whose accepted connections inherit it. The app and the Label Studio backend both listen so.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        message = f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port (0: any free one)"
        raise ValueError(message) from None
    return listener


def start_in_thread(server: uvicorn.Server, listener: socket.socket, name: str) -> threading.Thread:
    """Run a uvicorn server on `listener` in a thread of its own; returns once it serves, raises if it died."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name=name)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not thread.is_alive():
        raise RuntimeError("the HTTP server did not start (see the messages above)")
    return thread
