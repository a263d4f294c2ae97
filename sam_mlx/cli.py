"""The ``sam-mlx`` command: segment images from the shell, cache their encodings, convert checkpoints.

Every error ends as one line on stderr and a non-zero exit code (1, or 2 for bad
arguments); ``--debug`` re-raises it with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import sam_mlx  # before mlx: loads OpenBLAS first

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .checkpoint import atomic_write, load_checkpoint, save_model  # noqa: E402
from .hub import HubError, default_cache_dir  # noqa: E402
from .image_io import load_image  # noqa: E402
from .image_tokens import load_image_tokens, model_identity, read_image_tokens, save_image_tokens  # noqa: E402
from .mask_utils import batched_mask_to_box, box_xyxy_to_xywh, coco_encode_rle, rle_to_mask  # noqa: E402
from .overlay import draw_overlay  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MODEL_ENV = "SAM_MLX_MODEL"


class CliError(Exception):
    """A user-facing failure: its message is printed as is, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types
def _numbers(text: str, count: int, what: str, syntax: str) -> tuple[float, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}: expected {syntax} (pixel numbers)")
    return values


def _point(text: str) -> tuple[float, ...]:
    return _numbers(text, 2, "point", "X,Y")


def _box(text: str) -> tuple[float, ...]:
    return _numbers(text, 4, "box", "X1,Y1,X2,Y2")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


# ---------------------------------------------------------------- helpers
def _model_name(args: argparse.Namespace) -> str | None:
    return args.model or os.environ.get(MODEL_ENV)


def _load_model(args: argparse.Namespace):
    name = _model_name(args)
    if not name:
        raise CliError(f"no model: pass --model NAME|PATH (e.g. sam-vit-base or a .pth file) or set {MODEL_ENV}")
    return sam_mlx.load(name)


def _predictor(args: argparse.Namespace, model, default_sizing: str = "original", default_size=None):
    """A SamPredictor with the --sizing / --size options, else the given defaults."""
    sizing = args.sizing or default_sizing
    size = args.size or (default_size if sizing == default_sizing else None)
    return sam_mlx.SamPredictor(model, sizing=sizing, size=size)


def _expand_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders as the images directly inside them (sorted)."""
    images: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise CliError(f"image not found: {path}")
    return images


def _output_stems(images: Sequence[Path]) -> list[str]:
    """File-name stems for the outputs, made unique when two inputs share a name."""
    stems, seen = [], set()
    for path in images:
        stem, n = path.stem, 1
        while stem in seen:
            n += 1
            stem = f"{path.stem}-{n}"
        seen.add(stem)
        stems.append(stem)
    return stems


def _check_prompts(points: np.ndarray, boxes: np.ndarray, width: int, height: int, name: str) -> None:
    """Reject points outside the image and boxes that are inverted or outside it, before encoding."""
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise CliError(f"point {x:g},{y:g} is outside {name} ({width}x{height}: x in 0..{width}, y in 0..{height})")
    for x1, y1, x2, y2 in boxes:
        if x2 < x1 or y2 < y1:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has X2 < X1 or Y2 < Y1")
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} is outside {name} ({width}x{height})")


def _mask_record(mask: np.ndarray) -> dict:
    """Area and bbox of an H x W bool mask, as the automatic mask generator reports them.

    The bbox is x, y, x2 - x1, y2 - y1 of the inclusive corner pixels: Meta's convention,
    one less than COCO's width and height.
    """
    return {"area": int(mask.sum()), "bbox": box_xyxy_to_xywh(batched_mask_to_box(mask)).tolist()}


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def _write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"), suffix=".json")


def _remove_old_masks(out_dir: Path, stem: str) -> None:
    """Delete ``{stem}_mask<n>.png`` of an earlier run, so none outlives the JSON that lists them."""
    pattern = re.compile(rf"{re.escape(stem)}_mask\d+\.png")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- commands
def cmd_segment(args: argparse.Namespace) -> None:
    points = np.array(args.point + args.bg_point, dtype=np.float64).reshape(-1, 2)
    labels = np.array([1] * len(args.point) + [0] * len(args.bg_point), dtype=np.int32)
    boxes = np.array(args.box, dtype=np.float64).reshape(-1, 4)
    if not len(points) and not len(boxes):
        raise CliError("no prompt: give at least one --point, --bg-point or --box")
    # A lone point is ambiguous (part or whole?): return SAM's three candidates unless told otherwise.
    multimask = args.multimask if args.multimask is not None else (len(points) == 1 and not len(boxes))
    images = _expand_images(args.images)
    if args.tokens and len(images) != 1:
        raise CliError("--tokens goes with exactly one image (the one it was encoded from)")
    saved = read_image_tokens(args.tokens) if args.tokens else None
    # Tokens bring their own sizing: it is used unless --sizing / --size say otherwise (then refused).
    predictor = _predictor(args, _load_model(args), *((saved.sizing, saved.size) if saved else ()))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (path, stem) in enumerate(zip(images, _output_stems(images)), 1):
        start = time.perf_counter()
        image = load_image(path)
        height, width = image.shape[:2]
        _check_prompts(points, boxes, width, height, path.name)
        if args.tokens:
            loaded = load_image_tokens(predictor, args.tokens)
            if loaded.geometry.original_size != (height, width):
                h, w = loaded.geometry.original_size
                raise CliError(f"{args.tokens} was encoded from a {w}x{h} image, but {path} is {width}x{height}")
        else:
            predictor.set_image(image)
        report = _segment(predictor, image, points, labels, boxes, multimask, stem, out_dir)
        _write_json({"image": str(path), **report}, out_dir / f"{stem}.json")
        seconds, count = time.perf_counter() - start, len(report["masks"])
        _log(f"[{i}/{len(images)}] {path}: {count} masks in {seconds:.1f} s -> {out_dir / report['overlay']}")


def _segment(
    predictor: sam_mlx.SamPredictor,
    image: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    multimask: bool,
    stem: str,
    out_dir: Path,
) -> dict:
    """Decode the prompts on the predictor's image, write the mask PNGs and the overlay; return the JSON report.

    points: N x 2 with labels N (shared by every prompt); boxes: B x 4. Every box is one
    prompt (with all the points), all B decoded as one batch; no box is one prompt of points.
    """
    n_prompts = max(len(boxes), 1)
    masks, scores, _ = predictor.predict_batch(
        np.broadcast_to(points, (n_prompts, *points.shape)) if len(points) else None,
        np.broadcast_to(labels, (n_prompts, len(labels))) if len(points) else None,
        boxes if len(boxes) else None,
        multimask_output=multimask,
        return_low_res=False,
    )  # masks: n_prompts x C x H x W
    _remove_old_masks(out_dir, stem)
    records = []
    for b in range(n_prompts):
        box = boxes[b].tolist() if len(boxes) else None
        prompt = {"points": points.tolist(), "labels": labels.tolist(), "box": box}
        for c in range(masks.shape[1]):
            name = f"{stem}_mask{len(records)}.png"
            _save_png(Image.fromarray(masks[b, c].astype(np.uint8) * 255), out_dir / name)
            records.append({"file": name, "prompt_index": b, "mask_index": c, "score": float(scores[b, c]),
                            **_mask_record(masks[b, c]), "prompt": prompt})
    overlay = f"{stem}_overlay.png"
    drawn = draw_overlay(image, list(masks.reshape(-1, *masks.shape[2:])), points, labels, boxes)
    _save_png(drawn, out_dir / overlay)
    height, width = image.shape[:2]
    return {"width": width, "height": height, "model": model_identity(predictor.model), "sizing": predictor.sizing,
            "size": predictor.size, "multimask": multimask, "overlay": overlay, "masks": records}


def cmd_encode(args: argparse.Namespace) -> None:
    image = load_image(args.image)
    predictor = _predictor(args, _load_model(args))
    start = time.perf_counter()
    predictor.set_image(image)
    path = save_image_tokens(predictor, args.out)
    h, w = predictor.geometry.grid_size
    _log(f"{args.image}: {h}x{w} image tokens in {time.perf_counter() - start:.1f} s -> {path}")


def cmd_convert(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint).expanduser()
    # A local file is converted directly (no cache copy); names and repo ids go through the Hub cache.
    # float32, not the device's default (a half-precision encoder on a GPU): --dtype alone decides the precision.
    model = load_checkpoint(source, mx.float32) if source.is_file() else sam_mlx.load(args.checkpoint, mx.float32)
    path = save_model(model, args.out, dtype=args.dtype, source=str(args.checkpoint))
    _log(f"{args.checkpoint}: {model.config.name} -> {path} ({args.dtype}, {path.stat().st_size / 1e6:.1f} MB)")


class _ProgressBar:
    """One self-overwriting status line on a terminal; only the final state elsewhere (logs stay clean)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.live:
            filled = self.width * done // max(total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r{self.label} [{bar}] {done}/{total} points", end="", file=sys.stderr, flush=True)

    def finish(self, message: str) -> None:
        print(("\r\033[K" if self.live else "") + f"{self.label} {message}", file=sys.stderr, flush=True)


def cmd_everything(args: argparse.Namespace) -> None:
    from .automatic_mask_generator import SamAutomaticMaskGenerator

    images = _expand_images([args.images])
    model = _load_model(args)
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
        output_mode="uncompressed_rle", sizing=args.sizing or "original", size=args.size,
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (path, stem) in enumerate(zip(images, _output_stems(images)), 1):
        start = time.perf_counter()
        image = load_image(path)
        progress = _ProgressBar(f"[{i}/{len(images)}] {path}")
        records = generator.generate(image, progress=progress)
        overlay = f"{stem}_overlay.png"
        _save_png(draw_overlay(image, [rle_to_mask(r["segmentation"]) for r in records]), out_dir / overlay)
        annotations = [{**r, "segmentation": coco_encode_rle(r["segmentation"])} for r in records]
        height, width = image.shape[:2]
        _write_json(
            {"image": str(path), "width": width, "height": height, "model": model_identity(model),
             "overlay": overlay, "annotations": annotations},
            out_dir / f"{stem}.json",
        )
        seconds = time.perf_counter() - start
        progress.finish(f"{len(records)} masks in {seconds:.1f} s -> {out_dir / overlay}")


def cmd_info(args: argparse.Namespace) -> None:
    from mlx.utils import tree_flatten

    from ._blas import blas_description
    from .token_bands import band_count

    print(f"sam_mlx {sam_mlx.__version__}")
    print(f"mlx {mx.__version__} (default device: {mx.default_device()})")
    print(f"BLAS: {blas_description()}")
    print(f"mask decoder: image tokens in {band_count()} row band(s), one MLX stream each")
    print(f"model cache: {default_cache_dir()}")
    name = _model_name(args)
    if name:
        model = sam_mlx.load(name)
        count = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(f"model: {name}: {model_identity(model)}, {count / 1e6:.1f} M parameters")
        print(json.dumps(model.config.to_dict(), indent=1))


def cmd_app(args: argparse.Namespace) -> None:
    try:
        from .app.library import Library
        from .app.server import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        raise CliError(f"the app needs {exc.name}: pip install 'sam-mlx[app]'") from None
    library = Library(args.images or ["."], args.out_dir)
    serve(library, _load_model(args), sizing=args.sizing or "original", size=args.size, port=args.port,
          open_browser=not args.no_browser, tokens_dir=args.tokens_dir, prefetch=args.prefetch, token=args.token)


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-mlx`` argument parser with its subcommands."""
    debug = _Parser(add_help=False)
    # SUPPRESS: a subcommand's absent --debug must not reset one given before the subcommand.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    model = _Parser(add_help=False)
    model.add_argument("--model", metavar="NAME|PATH", help=f"sam-vit-base|large|huge, a Hub repo id, or a "
                       f"checkpoint file (.pth / .safetensors); default: ${MODEL_ENV}")
    model.add_argument("--sizing", choices=("original", "stretch"),
                       help="original: longest side to SIZE, padded square (as Meta's SAM); "
                       "stretch: longest side to SIZE, sides rounded to multiples of 16, no padding "
                       "(default: original)")
    model.add_argument("--size", type=_positive_int, metavar="N", help="encoder input size (default: 1024)")

    parser = _Parser(prog="sam-mlx", description="Segment Anything (SAM v1) in MLX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser("segment", parents=[debug, model], help="masks for point and box prompts",
                              description="Segment images with point and box prompts (pixel coordinates; "
                              "write negative numbers as --box=-5,0,90,80). Writes per image: one PNG per mask, "
                              "an overlay PNG and a JSON of scores, areas, bboxes and prompts. A bbox is x, y, w, h "
                              "with w = x2 - x1, h = y2 - y1 of the mask's first and last pixel columns and rows "
                              "(as Meta's SAM: one less than COCO's).")
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    seg.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y", help="foreground point")
    seg.add_argument("--bg-point", type=_point, action="append", default=[], metavar="X,Y", help="background point")
    seg.add_argument("--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                     help="box; several boxes are separate prompts decoded together, each with all the points")
    mode = seg.add_mutually_exclusive_group()
    mode.add_argument("--multimask", dest="multimask", action="store_const", const=True,
                      help="three candidate masks per prompt (default for a single point)")
    mode.add_argument("--single", dest="multimask", action="store_const", const=False,
                      help="one mask per prompt (default unless the prompt is a single point)")
    seg.add_argument("--tokens", metavar="FILE", help="image tokens from `sam-mlx encode` to skip the encoder")
    seg.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    seg.set_defaults(func=cmd_segment)

    enc = commands.add_parser("encode", parents=[debug, model], help="save an image's tokens for later prompting",
                              description="Run the image encoder once and save the image tokens (safetensors) "
                              "for `sam-mlx segment --tokens` or sam_mlx.image_tokens.load_image_tokens.")
    enc.add_argument("image", metavar="IMAGE")
    enc.add_argument("--out", required=True, metavar="FILE", help="tokens file to write (.safetensors)")
    enc.set_defaults(func=cmd_encode)

    conv = commands.add_parser("convert", parents=[debug], help="convert a checkpoint to sam_mlx safetensors",
                               description="Convert a Meta .pth, MobileSAM .pt, transformers safetensors, model "
                               "name or Hub repo id to a sam_mlx safetensors file.")
    conv.add_argument("checkpoint", metavar="CHECKPOINT")
    conv.add_argument("--out", required=True, metavar="FILE")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    conv.set_defaults(func=cmd_convert)

    every = commands.add_parser("everything", parents=[debug, model], help="masks for everything in images",
                                description="Segment everything with SAM's automatic mask generator (a grid of "
                                "point prompts, filtered and de-duplicated). Writes per image an overlay PNG of all "
                                "masks and a JSON of annotations as Meta's generator makes them: COCO RLE "
                                "segmentation, area, bbox, predicted_iou, stability_score, point_coords, crop_box. "
                                "The bbox is x, y, w, h with w = x2 - x1, h = y2 - y1 of the mask's first and last "
                                "pixel columns and rows: one less than COCO's w, h.")
    every.add_argument("images", metavar="IMAGE|DIR", help="an image file or a folder of images")
    every.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    every.add_argument("--points-per-side", type=_positive_int, default=32, metavar="N",
                       help="N x N grid of point prompts (default: 32)")
    every.add_argument("--points-per-batch", type=_positive_int, default=64, metavar="N",
                       help="point prompts decoded together (default: 64)")
    every.add_argument("--pred-iou-thresh", type=float, default=0.88, metavar="T",
                       help="keep masks whose predicted IoU exceeds T (default: 0.88)")
    every.add_argument("--stability-score-thresh", type=float, default=0.95, metavar="T",
                       help="keep masks whose stability score is at least T (default: 0.95)")
    every.add_argument("--crop-n-layers", type=int, default=0, metavar="N",
                       help="also run on N layers of zoomed-in crops (default: 0)")
    every.add_argument("--min-mask-region-area", type=int, default=0, metavar="A",
                       help="fill holes and drop islands smaller than A pixels (default: 0)")
    every.set_defaults(func=cmd_everything)

    app = commands.add_parser("app", parents=[debug, model], help="the local segmentation app in the browser",
                              description="Serve the segmentation app on 127.0.0.1 and open it in the browser: "
                              "hover, click and drag for masks, several objects per image, export. Other local "
                              "programs can use the same HTTP API (README). Needs the sam-mlx[app] extra.")
    app.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="images or folders (default: this folder)")
    app.add_argument("--port", type=int, default=8000, metavar="N", help="port on 127.0.0.1 (default: 8000; 0: any)")
    app.add_argument("--no-browser", action="store_true", help="do not open the browser")
    app.add_argument("--out-dir", default="sam-mlx-export", metavar="DIR",
                     help="export folder; the page exports into it or its sub-folders (default: sam-mlx-export)")
    app.add_argument("--tokens-dir", metavar="DIR", help="image tokens cache (default: the model cache's app_tokens)")
    app.add_argument("--prefetch", type=int, default=2, metavar="N",
                     help="images ahead to encode in the background (default: 2)")
    app.add_argument("--token", metavar="TOKEN", help="the API token (default: a new random one per run)")
    app.set_defaults(func=cmd_app)

    info = commands.add_parser("info", parents=[debug], help="versions, device, BLAS and a model's config",
                               description="Show the sam_mlx and MLX versions, the default device, the BLAS "
                               f"in use, the model cache and, with --model or ${MODEL_ENV}, the model's config.")
    info.add_argument("--model", metavar="NAME|PATH", help=f"a model to load and describe (default: ${MODEL_ENV})")
    info.set_defaults(func=cmd_info)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, ValueError, OSError, HubError)):  # CheckpointError is a ValueError
        return text
    return f"{type(exc).__name__}: {text} (unexpected: run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sam-mlx`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # warnings as one line too, restored on return
            warnings.showwarning = lambda message, *_, **__: _log(f"sam-mlx {args.command}: warning: {message}")
            args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        _log("sam-mlx: interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        _log(f"sam-mlx {args.command}: error: {_one_line(exc)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
