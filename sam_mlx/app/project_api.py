"""The project's HTTP endpoints (docs/app.md, "The app's HTTP API"): the objects of an image and every change to them.

Image ids are the app's (``/api/images``); an image enters the project at its first change (its pixels are read
once then, for the fingerprint that finds a moved file's work). Every write is one transaction and answers the
image's new ``revision``; a write may carry the ``revision`` it was made from, and is refused with 409 when the
image changed since (another tab or program): the page then reloads the image's objects.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..amg.mask_utils import coco_decode_rle
from ..io.images import load_image, pixel_fingerprint
from .library import ImageEntry, Library
from .limits import MAX_POINTS, TooLarge, parse_json
from .masks import MASK_FORMATS, decode_mask, encode_masks
from .project import STATES, Project, Step
from .project_export import export_project


class ProjectLink:
    """The app's images (library ids) and their rows in the project (made at an image's first change)."""

    def __init__(self, project: Project, library: Library):
        self.project = project
        self.library = library
        self._rows: dict[Path, int] = {}
        self._lock = threading.Lock()

    def relink_moved(self) -> int:
        """Find the work of images whose file moved among the app's images not in the project (by their pixels);
        return how many were found. Reads only the new images' pixels, and only when some file is missing."""
        missing = self.project.missing_images()
        if not missing:
            return 0
        known = {r["fingerprint"]: r["id"] for r in self.project.images() if r["id"] in missing}
        found = 0
        for entry in self.library.all():
            if self.project.find_image(entry.path) is None:
                pixels = load_image(entry.path)
                if pixel_fingerprint(pixels) in known:
                    self.row(entry, pixels)
                    found += 1
        return found

    def find(self, entry: ImageEntry) -> int | None:
        with self._lock:
            if entry.path not in self._rows:
                row = self.project.find_image(entry.path)
                if row is None:
                    return None
                self._rows[entry.path] = row
            return self._rows[entry.path]

    def row(self, entry: ImageEntry, pixels: np.ndarray | None = None) -> int:
        """The image's project id, added (or matched to a moved file's row) at its first change."""
        row = self.find(entry)
        if row is None:
            pixels = load_image(entry.path) if pixels is None else pixels
            row = self.project.add_image(entry.path, pixels.shape[1], pixels.shape[0], pixel_fingerprint(pixels))
            with self._lock:
                self._rows[entry.path] = row
        return row


def project_routes(project: Project, library: Library, export_set: Callable[..., dict]) -> list[Route]:
    """The routes of the project's endpoints, for ``server.create_app``; ``export_set(library, folder, write)``
    writes an export as one set of files that replaces the folder's last one (``server.export_set``)."""
    link = ProjectLink(project, library)
    # Moved images find their work in the background: the page polls the project and shows it when found.
    threading.Thread(target=link.relink_moved, name="sam-mlx-project-relink", daemon=True).start()

    def summary() -> dict:
        rows = {r["path"]: r for r in project.images()}
        images = []
        for entry in library.all():
            row = rows.get(str(entry.path))
            images.append({"id": entry.id, "state": row["state"] if row else "new",
                           "objects": row["objects"] if row else 0, "revision": row["revision"] if row else 0})
        done = sum(i["state"] in ("done", "skipped") for i in images)
        return {"path": str(project.path), "revision": project.revision, "done": done, "total": len(images),
                "cleanup": project.cleanup(), "images": images}

    def answer(image_row: int | None, **extra) -> dict:
        """A write's answer: the image's revision and state after it, the project's revision."""
        record = project.image(image_row) if image_row is not None else None
        return {**extra, "revision": record["revision"] if record else 0, "state": record["state"] if record else "new",
                "project_revision": project.revision}

    async def overview(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(summary))

    async def cleanup(request: Request) -> Response:
        body = await _body(request)
        return JSONResponse({"cleanup": project.set_cleanup(**body), "project_revision": project.revision})

    async def objects(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        if request.method == "POST":
            body = await _body(request)

            def add() -> dict:
                row = link.row(entry)
                first = _step(body["step"], project.image(row)) if body.get("step") is not None else None
                return answer(row, object=project.add_object(row, body.get("label"), body.get("color"), first,
                                                             _revision(body)))

            return JSONResponse(await run_in_threadpool(add))
        mask_format = request.query_params.get("mask_format", "png")
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        max_side = _query_int(request, "max_side")

        def load() -> dict:
            row = link.find(entry)
            listed = project.objects(row) if row is not None else []
            for obj in listed:
                for step in obj["steps"]:
                    if step["mask"] is not None:
                        step["mask"] = encode_masks(coco_decode_rle(step["mask"])[None], mask_format, max_side)[0]
                obj.pop("mask")
            return answer(row, image=entry.id, objects=listed)

        return JSONResponse(await run_in_threadpool(load))

    def object_change(change):
        async def handler(request: Request) -> Response:
            object_id = request.path_params["object_id"]
            body = await _body(request) if request.method != "DELETE" else {"revision": _query_int(request, "revision")}

            def run() -> dict:
                row = project.object_image(object_id)
                return answer(row, object=object_id, **(change(object_id, row, body) or {}))

            return JSONResponse(await run_in_threadpool(run))

        return handler

    def add_step(object_id: int, row: int, body: dict) -> dict:
        return {"cursor": project.add_step(object_id, _step(body.get("step"), project.image(row)), _revision(body))}

    def choose(object_id: int, row: int, body: dict) -> None:
        mask = _mask(body.get("mask"), project.image(row))
        project.choose(object_id, body.get("selected"), mask, _score(body.get("score")), _revision(body))

    def cursor(object_id: int, row: int, body: dict) -> dict:
        project.move_cursor(object_id, body.get("cursor"), _revision(body))
        return {"cursor": body["cursor"]}

    def update(object_id: int, row: int, body: dict) -> None:
        project.update_object(object_id, body.get("label"), body.get("color"), _revision(body))

    def delete(object_id: int, row: int, body: dict) -> None:
        project.delete_object(object_id, body.get("revision"))

    async def state(request: Request) -> Response:
        entry = library.get(request.path_params["image_id"])
        body = await _body(request)
        if body.get("state") not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {json.dumps(body.get('state'))}")

        def change() -> dict:
            row = link.row(entry)
            project.set_state(row, body["state"], _revision(body))
            return answer(row)

        return JSONResponse(await run_in_threadpool(change))

    async def export(request: Request) -> Response:
        body = await _body(request)
        folder = library.export_dir(body.get("folder") or "")
        formats = body.get("formats")
        if not isinstance(formats, list) or not formats:
            raise ValueError(f"formats must be a list of export formats, got {json.dumps(formats)}")
        return JSONResponse(await run_in_threadpool(export_set, library, folder,
                                                    lambda: export_project(project, folder, formats)))

    return [
        Route("/api/project", overview),
        Route("/api/project/cleanup", cleanup, methods=["POST"]),
        Route("/api/project/export", export, methods=["POST"]),
        Route("/api/images/{image_id:int}/objects", objects, methods=["GET", "POST"]),
        Route("/api/images/{image_id:int}/state", state, methods=["POST"]),
        Route("/api/objects/{object_id:int}", object_change(update), methods=["POST"]),
        Route("/api/objects/{object_id:int}", object_change(delete), methods=["DELETE"]),
        Route("/api/objects/{object_id:int}/steps", object_change(add_step), methods=["POST"]),
        Route("/api/objects/{object_id:int}/choose", object_change(choose), methods=["POST"]),
        Route("/api/objects/{object_id:int}/cursor", object_change(cursor), methods=["POST"]),
    ]


# ---------------------------------------------------------------- request parsing
async def _body(request: Request) -> dict:
    """The request's JSON object, as the app's other endpoints take it (``limits.parse_json``); {} for no body."""
    raw = await request.body()
    return parse_json(raw, request.headers.get("content-type")) if raw else {}


def _query_int(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"query parameter {name} must be an integer, got {text!r}") from None


def _revision(body: dict) -> int | None:
    revision = body.get("revision")
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)):
        raise ValueError(f"revision must be an integer (the image's, as last read), got {json.dumps(revision)}")
    return revision


def _score(score: object) -> float | None:
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"score must be a number, got {json.dumps(score)}")
    return None if score is None else float(score)


def _mask(data: object, image: dict) -> np.ndarray:
    """A mask as ``encode_masks`` sends it: at the image's size, or shrunk to a longer side as the page shows it."""
    width, height = image["width"], image["height"]
    mask = decode_mask(data, within=(width, height))  # its size checked before it is decoded
    side = max(mask.shape)
    scale = side / max(width, height)
    shrunk = (max(round(height * scale), 1), max(round(width * scale), 1))
    if mask.shape != (height, width) and (side >= max(width, height) or mask.shape != shrunk):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height} "
                         f"(or shrunk to {shrunk[1]}x{shrunk[0]})")
    return mask


def _step(data: object, image: dict) -> Step:
    """``{points: [[x, y, label], ...], box, multimask, selected, score, mask}`` (no mask: a cleared object, or
    background points alone)."""
    if not isinstance(data, dict):
        raise ValueError("step must be {points, box, multimask, selected, score, mask}")
    multimask = data.get("multimask", False)
    if not isinstance(multimask, bool):
        raise ValueError(f"step multimask must be true or false, got {json.dumps(multimask)}")
    if isinstance(data.get("points"), list) and len(data["points"]) > MAX_POINTS:
        raise TooLarge(f"a step has at most {MAX_POINTS} points, got {len(data['points'])}")
    points = data.get("points") or []
    decodable = data.get("box") is not None or any(isinstance(p, list) and p[-1:] == [1] for p in points)
    if decodable and data.get("mask") is None:
        raise ValueError("a step with a box or a foreground point needs the mask of its chosen candidate")
    mask = None if data.get("mask") is None else _mask(data["mask"], image)
    return Step(points=points, box=data.get("box"), multimask=multimask,
                selected=data.get("selected", 0), score=_score(data.get("score")), mask=mask)
