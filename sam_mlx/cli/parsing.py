"""The ``sam-mlx`` argument parser: its subcommands, options and argument types (usage errors on one line)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

import numpy as np

import sam_mlx

from ..examples import EXAMPLES
from ..io.export import DEFAULT_SIMPLIFY, FORMATS, parse_formats
from ..label_studio.command import add_arguments as add_label_studio_arguments
from .commands import (
    cmd_app,
    cmd_convert,
    cmd_encode,
    cmd_everything,
    cmd_export,
    cmd_info,
    cmd_label_studio,
    cmd_segment,
)
from .jobs import MODEL_ENV
from .run import FAILURES_FILE
from .work import TOKENS_SUFFIX


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, and negative coordinates as values (``--point -5,400``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's negative numbers are single numbers: "-5,400" would be an unknown option without this.
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number, ``least`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number, {least} or more, got {text!r}")
        return value

    return parse


_positive_int, _count = _whole_number(1), _whole_number(0)


def _formats(text: str) -> tuple[str, ...]:
    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
    return value


def _amount(text: str) -> float:
    return _non_negative(text, "an amount")


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    if not name.strip() or not amount:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (e.g. mlx=1), got {text!r}")
    return name.strip(), _amount(amount)


def _pixels(text: str) -> float:
    return _non_negative(text, "a number of pixels")


def _example_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--example", choices=EXAMPLES, metavar="NAME",
                        help=f"the sample photo shipped in the package ({', '.join(EXAMPLES)}: 900 x 600), "
                        "instead of or beside IMAGE|DIR")


def _common_options(json_help: str) -> _Parser:
    """Every command's --debug and --json (what --json prints differs: ``json_help``)."""
    common = _Parser(add_help=False)
    # SUPPRESS: a subcommand's absent --debug / --json must not reset one given before the subcommand.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-mlx`` argument parser with its subcommands."""
    common = _common_options("print one JSON object per image on stdout (files written, scores, timings)")
    model = _Parser(add_help=False)
    model.add_argument("--model", metavar="NAME|PATH", help=f"sam-vit-base|large|huge, mobile_sam, "
                       f"sam-hq-vit-base|large|huge|tiny, slimsam-50|77, medsam, a Hub repo id, "
                       f"or a checkpoint file (.pth / .safetensors); default: ${MODEL_ENV}")
    model.add_argument("--sizing", choices=("original", "stretch"),
                       help="original: longest side to SIZE, padded square (as Meta's SAM); "
                       "stretch: longest side to SIZE, sides rounded to multiples of 16, no padding "
                       "(default: original)")
    model.add_argument("--size", type=_positive_int, metavar="N", help="encoder input size (default: 1024)")
    model.add_argument("--quantize", type=int, choices=(8, 4), metavar="BITS",
                       help="quantize the image encoder's weights to 8 or 4 bits when loading (ViT-H: 2.6 GB of "
                       "float32 weights -> ~0.8 GB at 8 bits; docs/gpu-and-quantization.md)")
    outputs = _Parser(add_help=False)
    outputs.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    outputs.add_argument("--export", type=_formats, default=("png",), metavar="FORMAT[,FORMAT...]",
                         help=f"what to write besides the overlay and the JSON report: {', '.join(FORMATS)} "
                         "(default: png). png: a 0/255 PNG per mask; cutout: the image with the mask as alpha "
                         "(RGBA PNG); coco / coco-rle: one COCO instances file for the run (coco.json with "
                         "polygons, coco_rle.json with RLE); yolo: yolo/STEM.txt segmentation labels; labelme: "
                         "labelme/STEM.json. Polygons need OpenCV: pip install 'sam-mlx[export]'")
    outputs.add_argument("--simplify", type=_pixels, default=DEFAULT_SIMPLIFY, metavar="PIXELS",
                         help=f"polygon simplification tolerance (default: {DEFAULT_SIMPLIFY}; 0 keeps every corner)")
    outputs.add_argument("--best", action="store_true",
                         help="export only the top-scoring mask of each prompt (of each image for everything)")
    runs = _Parser(add_help=False)
    runs.add_argument("--recursive", action="store_true", help="take the images in subfolders of folders too")
    runs.add_argument("--fail-fast", action="store_true",
                      help="stop at the first image that fails (default: go on, list failures at the end "
                      f"and in {FAILURES_FILE}, exit code 1)")
    runs.add_argument("--resume", action="store_true",
                      help="skip the images whose outputs a run with the same model and settings completed: "
                      "segment and everything, its JSON report and every file it lists (the image is taken to be "
                      "unchanged); encode, its tokens file, made from the same pixels")
    ray = runs.add_argument_group("Ray", "run the images on Ray Data workers: pip install 'sam-mlx[ray]'. The "
                                  "outputs are those of a run without --ray. Workers find the images, the model and "
                                  "--out-dir at the command's paths (on a cluster: a shared file system)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="alone: start a local Ray instance for the run; ADDRESS (host:port, ray://host:port or "
                     "auto): join that Ray cluster")
    ray.add_argument("--workers", type=_positive_int, metavar="N",
                     help="Ray workers, each loading the model once (default: as many as the cluster has room for, "
                     "at most one per image batch)")
    ray.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="images per task given to a worker; a retried task redoes its batch (default: 1)")
    ray.add_argument("--worker-cpus", type=_amount, metavar="C", help="CPUs each worker reserves (default: 1)")
    ray.add_argument("--worker-gpus", type=_amount, metavar="G",
                     help="GPUs each worker reserves (Linux with mlx[cuda]; default: 0)")
    ray.add_argument("--worker-resource", type=_resource, action="append", metavar="NAME=AMOUNT",
                     help="a custom Ray resource each worker reserves, e.g. mlx=1 for one worker per Mac whose "
                     "node was started with --resources='{\"mlx\": 1}' (repeatable)")
    ray.add_argument("--worker-threads", type=_positive_int, metavar="N",
                     help="MLX row bands and OpenBLAS threads of each worker on a CPU (default: its CPUs, at least 1)")

    parser = _Parser(prog="sam-mlx", description="Segment Anything (SAM v1) in MLX.")
    parser.add_argument("--version", action="version", version=f"sam-mlx {sam_mlx.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image on stdout")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser("segment", parents=[common, model, outputs, runs], help="masks for point and box prompts",
                              description="Segment images with point and box prompts (pixel coordinates; "
                              "negative ones too: --point -5,400), or with a prompts file giving each "
                              "image its own prompts. Writes per image an overlay PNG, a JSON of scores, areas, "
                              "bboxes and prompts, and the --export formats (default: one PNG per mask). A bbox "
                              "in that JSON is x, y, w, h with w = x2 - x1, h = y2 - y1 of the mask's first and "
                              "last pixel columns and rows (as Meta's SAM: one less than COCO's).")
    seg.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="image files or folders of images")
    _example_argument(seg)
    seg.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y", help="foreground point")
    seg.add_argument("--bg-point", type=_point, action="append", default=[], metavar="X,Y", help="background point")
    seg.add_argument("--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                     help="box; several boxes are separate prompts decoded together, each with all the points")
    seg.add_argument("--label", metavar="NAME", help="the object's name in the exports (default: object)")
    seg.add_argument("--prompts", metavar="FILE",
                     help="JSON or CSV of prompts per image, instead of IMAGE and the prompt options: entries "
                     '{"image": PATH, "points": [[X, Y], ...], "labels": [1, 0, ...], "boxes": [[X1, Y1, X2, Y2], '
                     '...], "label": NAME}, or CSV columns image,points,labels,boxes,label (paths relative to FILE)')
    mode = seg.add_mutually_exclusive_group()
    mode.add_argument("--multimask", dest="multimask", action="store_const", const=True,
                      help="three candidate masks per prompt (default for a single point)")
    mode.add_argument("--single", dest="multimask", action="store_const", const=False,
                      help="one mask per prompt (default unless the prompt is a single point)")
    seg.add_argument("--hq-token-only", action="store_true",
                     help="HQ-SAM: the HQ token's mask alone (default: SAM's mask plus it, as the original)")
    seg.add_argument("--clip-boxes", action="store_true",
                     help="clip boxes that cross the image's border to the image (default: used as given, as the "
                     "original SAM takes them; clipping moves the corners SAM reads, and so the mask)")
    seg.add_argument("--tokens", metavar="FILE", help="image tokens from `sam-mlx encode` to skip the encoder")
    seg.set_defaults(func=cmd_segment)

    enc = commands.add_parser("encode", parents=[common, model, runs], help="save images' tokens for later prompting",
                              description="Run the image encoder once per image and save the image tokens "
                              "(safetensors) for `sam-mlx segment --tokens` or "
                              "sam_mlx.load_image_tokens.")
    enc.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    where = enc.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE", help="tokens file of a single image (.safetensors)")
    where.add_argument("--out-dir", default=".", metavar="DIR",
                       help=f"output folder: one STEM{TOKENS_SUFFIX} per image (default: current folder)")
    enc.set_defaults(func=cmd_encode)

    conv = commands.add_parser("convert", parents=[common], help="convert a checkpoint to sam_mlx safetensors",
                               description="Convert a Meta .pth, MobileSAM .pt, transformers safetensors, model "
                               "name or Hub repo id to a sam_mlx safetensors file.")
    conv.add_argument("checkpoint", metavar="CHECKPOINT")
    conv.add_argument("--out", required=True, metavar="FILE")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    conv.add_argument("--quantize", type=int, choices=(8, 4), metavar="BITS",
                      help="save the image encoder's Linear weights quantized to 8 or 4 bits (the file's config "
                      "records it; --dtype then sets the other weights and the quantization scales)")
    conv.set_defaults(func=cmd_convert)

    every = commands.add_parser("everything", parents=[common, model, outputs, runs],
                                help="masks for everything in images",
                                description="Segment everything with SAM's automatic mask generator (a grid of "
                                "point prompts, filtered and de-duplicated). Writes per image an overlay PNG of all "
                                "masks, a JSON of annotations as Meta's generator makes them (COCO RLE "
                                "segmentation, area, bbox, predicted_iou, stability_score, point_coords, crop_box) "
                                "and the --export formats (default: one PNG per mask). The bbox in that JSON is x, "
                                "y, w, h with w = x2 - x1, h = y2 - y1 of the mask's first and last pixel columns "
                                "and rows: one less than COCO's w, h (the coco export uses COCO's).")
    every.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="image files or folders of images")
    _example_argument(every)
    every.add_argument("--points-per-side", type=_positive_int, default=32, metavar="N",
                       help="N x N grid of point prompts (default: 32)")
    every.add_argument("--points-per-batch", type=_positive_int, default=64, metavar="N",
                       help="point prompts decoded together (default: 64)")
    every.add_argument("--pred-iou-thresh", type=_fraction, default=0.88, metavar="T",
                       help="keep masks whose predicted IoU exceeds T (default: 0.88)")
    every.add_argument("--stability-score-thresh", type=_fraction, default=0.95, metavar="T",
                       help="keep masks whose stability score is at least T (default: 0.95)")
    every.add_argument("--crop-n-layers", type=_count, default=0, metavar="N",
                       help="also run on N layers of zoomed-in crops (default: 0)")
    every.add_argument("--min-mask-region-area", type=_count, default=0, metavar="A",
                       help="fill holes and drop islands smaller than A pixels (default: 0)")
    every.set_defaults(func=cmd_everything)

    app_common = _common_options("print the page's url, port and token on stdout as one JSON object once the app "
                                 "serves")
    app = commands.add_parser("app", parents=[app_common, model], help="the local segmentation app in the browser",
                              description="Serve the segmentation app on 127.0.0.1 and open it in the browser: "
                              "hover, click and drag for masks, several objects per image, export. Other local "
                              "programs can use the same HTTP API (docs/app.md). Needs the sam-mlx[app] extra.")
    app.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="images or folders (default: this folder)")
    app.add_argument("--port", type=_count, default=8000, metavar="N", help="port on 127.0.0.1 (default: 8000; 0: any)")
    app.add_argument("--no-browser", action="store_true", help="do not open the browser")
    app.add_argument("--out-dir", default="sam-mlx-export", metavar="DIR",
                     help="export folder; the page exports into it or its sub-folders (default: sam-mlx-export)")
    app.add_argument("--project", metavar="FILE", help="the project file that keeps every image's objects and "
                     "prompts as they are made (SQLite; default: OUT_DIR/sam-mlx.sqlite)")
    app.add_argument("--tokens-dir", metavar="DIR", help="image tokens cache (default: the model cache's app_tokens)")
    app.add_argument("--tokens-cache-mb", type=_count, default=2048, metavar="MB",
                     help="the tokens folder's size limit: the tokens used longest ago are removed first "
                     "(default: 2048, about 500 images; each image's tokens take ~4 MB)")
    app.add_argument("--prefetch", type=_count, default=2, metavar="N",
                     help="images ahead to encode in the background (default: 2)")
    app.add_argument("--token", metavar="TOKEN", help="the API token (default: a new random one per run)")
    app.set_defaults(func=cmd_app)

    export = commands.add_parser("export", parents=[common], help="export an app project's objects (no model)",
                                 description="Write the objects of a project of `sam-mlx app` (its SQLite file) from "
                                 "their stored masks, with the project's clean-up: the files the app's export "
                                 "writes, and a STEM.prompts.json per image.")
    export.add_argument("project", metavar="PROJECT", help="the project file (sam-mlx app's OUT_DIR/sam-mlx.sqlite)")
    export.add_argument("--export", type=_formats, default=("png",), metavar="FORMAT[,FORMAT...]",
                        help=f"formats: {', '.join(FORMATS)} (default: png)")
    export.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    export.add_argument("--simplify", type=_pixels, metavar="PIXELS",
                        help="polygon simplification tolerance (default: the project's setting)")
    export.set_defaults(func=cmd_export)

    studio = commands.add_parser("label-studio", parents=[common, model], help="a Label Studio ML backend",
                                 description="Serve Label Studio's ML backend protocol: masks for smart keypoints "
                                 "and boxes (docs/label-studio.md). Needs the sam-mlx[app] extra.")
    add_label_studio_arguments(studio)
    studio.set_defaults(func=cmd_label_studio)
    info = commands.add_parser("info", parents=[common], help="versions, device, BLAS and a model's config",
                               description="Show the sam_mlx and MLX versions, the default device, the BLAS "
                               f"in use, the model cache and, with --model or ${MODEL_ENV}, the model's config, "
                               "the dtypes its file stores and the dtypes it computes in.")
    info.add_argument("--model", metavar="NAME|PATH", help=f"a model to load and describe (default: ${MODEL_ENV})")
    info.set_defaults(func=cmd_info)
    return parser
