"""The commands: ``segment``, ``encode`` and ``everything`` hand their images and work to ``run``;
``convert``, ``info``, ``app`` and ``export`` do theirs here."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import mlx.core as mx

import sam_mlx

from ..checkpoints.hub import default_cache_dir, resolve_checkpoint
from ..checkpoints.load import load_checkpoint, read_state_dict, save_model
from ..examples import EXAMPLES, example_image
from ..io.atomic import remove_abandoned_temporaries
from ..io.folders import ImageInput, expand_images
from ..io.tokens import model_identity
from .jobs import ImageJob, _jobs, _model_name, _model_to_load
from .messages import CliError, _emit, _log
from .prompts import _prompt, read_prompts
from .run import _run_images
from .work import TOKENS_SUFFIX, _EncodeWork, _EverythingWork, _SegmentWork


def _images(args: argparse.Namespace, alternative: str = "") -> list[str]:
    """IMAGE|DIR ... and the --example photo (the package's own file, so that a first run needs no photo)."""
    images = [*args.images, *([str(example_image(args.example))] if args.example else [])]
    if not images:
        raise CliError(f"no image: give IMAGE|DIR ..., --example {EXAMPLES[0]}{alternative}")
    return images


def _expanded(args: argparse.Namespace, inputs: list[str], out_dir: Path | None) -> list[ImageInput]:
    """The images of IMAGE|DIR inputs. Among several, a path that is not there is an image of the run that will
    fail (listed with the other failures, as a bad file is), unless --fail-fast stops the run first."""
    images = []
    for text in inputs:
        try:
            images += expand_images([text], args.recursive, out_dir)
        except FileNotFoundError:
            if len(inputs) == 1 or args.fail_fast:
                raise
            images.append(ImageInput(Path(text).expanduser(), Path(text).name))
    return images


def _segment_jobs(args: argparse.Namespace) -> list[ImageJob]:
    """The images and their prompts: from --prompts FILE, or the command line's prompt for every image."""
    if args.prompts:
        if args.images or args.example or args.point or args.bg_point or args.box or args.label:
            raise CliError("--prompts FILE gives the images and prompts: no IMAGE, --example, --point, --bg-point, "
                           "--box or --label beside it")
        pairs = [(ImageInput(path, path.name), prompts) for path, prompts in read_prompts(args.prompts)]
    else:
        images = _images(args, " or --prompts FILE")
        points = args.point + args.bg_point
        if not points and not args.box:
            raise CliError("no prompt: give at least one --point, --bg-point or --box")
        prompt = _prompt(points, [1] * len(args.point) + [0] * len(args.bg_point), args.box, args.label,
                         "the command line")
        pairs = [(image, [prompt]) for image in _expanded(args, images, Path(args.out_dir))]
    return _jobs([image for image, _ in pairs], [prompts for _, prompts in pairs])


def cmd_segment(args: argparse.Namespace) -> int:
    jobs = _segment_jobs(args)
    if args.tokens and len(jobs) != 1:
        raise CliError("--tokens goes with exactly one image (the one it was encoded from)")
    if args.tokens and args.ray is not None:
        raise CliError("--tokens goes with one image, encoded already: run it without --ray")
    labels = [p.label for job in jobs for p in job.prompts if p.label]
    return _run_images(args, _SegmentWork(args, list(dict.fromkeys(labels))), jobs)


def cmd_encode(args: argparse.Namespace) -> int:
    images = _expanded(args, args.images, None if args.out else Path(args.out_dir))
    if args.out and (len(images) != 1 or Path(args.images[0]).is_dir()):
        raise CliError("--out FILE takes one image: for folders or several images give --out-dir DIR "
                       f"(one STEM{TOKENS_SUFFIX} per image)")
    return _run_images(args, _EncodeWork(args), _jobs(images))


def cmd_convert(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint).expanduser()
    # A local file is converted directly (no cache copy); names and repo ids go through the Hub cache.
    # float32, not the device's default (a half-precision encoder on a GPU): --dtype alone decides the precision.
    bits = args.quantize
    model = (load_checkpoint(source, mx.float32, quantize=bits) if source.is_file()
             else sam_mlx.load(args.checkpoint, mx.float32, quantize=bits))
    out = Path(args.out).expanduser()
    if out.parent.is_dir():
        remove_abandoned_temporaries(out.parent, re.escape(out.name))  # those a killed convert left
    path = save_model(model, out, dtype=args.dtype, source=str(args.checkpoint))
    kind = f"{args.dtype}, image encoder quantized to {bits} bits" if bits else args.dtype
    _log(f"{args.checkpoint}: {model.config.name} -> {path} ({kind}, {path.stat().st_size / 1e6:.1f} MB)")
    _emit(args, {"checkpoint": str(args.checkpoint), "files": [str(path)], "dtype": args.dtype, "quantize": bits})


def cmd_everything(args: argparse.Namespace) -> int:
    images = _expanded(args, _images(args), Path(args.out_dir))
    return _run_images(args, _EverythingWork(args), _jobs(images))


# A file's own dtype names (safetensors' and torch's storage classes) as numpy names.
_STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                  "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16"}


def _stored_dtypes(path: Path) -> dict[str, int]:
    """How many tensors of each dtype a checkpoint file stores (read from its header, not its data)."""
    state, _ = read_state_dict(path)
    return _counts(_STORED_DTYPES.get(v.stored_type, v.stored_type) for v in state.values())


def _counts(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def cmd_info(args: argparse.Namespace) -> None:
    from mlx.utils import tree_flatten

    from ..ops.bands import band_count
    from ..ops.blas import blas_description

    info: dict = {"sam_mlx": sam_mlx.__version__, "mlx": mx.__version__, "device": str(mx.default_device()),
                  "blas": blas_description(), "row_bands": band_count(), "model_cache": str(default_cache_dir())}
    lines = [f"sam_mlx {info['sam_mlx']}", f"mlx {info['mlx']} (default device: {info['device']})",
             f"BLAS: {info['blas']}",
             f"mask decoder: image tokens in {info['row_bands']} row band(s), one MLX stream each",
             f"model cache: {info['model_cache']}"]
    name = _model_name(args)
    if name:
        local = Path(name).expanduser()
        path = resolve_checkpoint(name)
        model = load_checkpoint(path)
        stored_in = local if local.is_file() else path
        stored = _stored_dtypes(stored_in)
        params = tree_flatten(model.parameters())
        dtypes = [(k.startswith("image_encoder."), str(v.dtype).removeprefix("mlx.core.")) for k, v in params]
        encoder = dict.fromkeys(dtype for in_encoder, dtype in dtypes if in_encoder)
        rest = dict.fromkeys(dtype for in_encoder, dtype in dtypes if not in_encoder)
        info["model"] = {"name": name, "identity": model_identity(model),
                         "parameters": sum(v.size for _, v in params), "stored_dtypes": stored,
                         "stored_in": str(stored_in),
                         "compute_dtypes": {"image_encoder": "+".join(encoder),
                                            "prompt_encoder_and_mask_decoder": "+".join(rest)},
                         "config": model.config.to_dict()}
        lines += [f"model: {name}: {info['model']['identity']}, {info['model']['parameters'] / 1e6:.1f} M parameters",
                  f"stored dtype: {', '.join(f'{k} ({n} tensors)' for k, n in stored.items())} in {stored_in}",
                  f"compute dtype: image encoder {'+'.join(encoder)}, prompt encoder and mask decoder {'+'.join(rest)}",
                  json.dumps(info["model"]["config"], indent=1)]
    if args.json:
        print(json.dumps(info))
    else:
        print("\n".join(lines))


def cmd_app(args: argparse.Namespace) -> None:
    try:
        from ..app.library import Library
        from ..app.server import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        raise CliError(f"the app needs {exc.name}: pip install 'sam-mlx[app]'") from None
    library = Library(args.images or ["."], args.out_dir)
    project = _open_project(Path(args.project or Path(args.out_dir) / "sam-mlx.sqlite"), create=True)
    model = sam_mlx.load(_model_to_load(args), quantize=args.quantize)
    project.set_meta("model", json.dumps({"model": model_identity(model), "sizing": args.sizing or "original",
                                          "size": args.size}))
    serve(library, model, sizing=args.sizing or "original", size=args.size, port=args.port,
          open_browser=not args.no_browser, tokens_dir=args.tokens_dir, prefetch=args.prefetch, token=args.token,
          tokens_cache_bytes=args.tokens_cache_mb << 20, project=project,
          announce=(lambda info: print(json.dumps(info), flush=True)) if args.json else None)


def cmd_export(args: argparse.Namespace) -> None:
    """Write a project's objects from its stored masks (no model): the files the app's export writes."""
    from ..app.project_export import export_project

    with _open_project(Path(args.project), create=False) as project:
        written = export_project(project, args.out_dir, args.export, args.simplify,
                                 log=_log)
    _emit(args, {"project": str(project.path), "out_dir": str(Path(args.out_dir).resolve()),
                 "files": [str(p) for p in written]})
    _log(f"sam-mlx export: {len(written)} files -> {args.out_dir}")


def _open_project(path: Path, create: bool):
    """The app's project file (``app.project.Project``), made if ``create`` (and its folder); errors as CliError."""
    from ..app.project import Project, ProjectError

    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise CliError(f"{path}: no such project file")
    try:
        return Project(path)
    except ProjectError as exc:
        raise CliError(str(exc)) from None


def cmd_label_studio(args: argparse.Namespace) -> None:
    try:
        from ..label_studio.command import run
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        raise CliError(f"the Label Studio backend needs {exc.name}: pip install 'sam-mlx[app]'") from None
    run(args, sam_mlx.load(_model_to_load(args), quantize=args.quantize))
