"""Each command's work on one image (``encode``, ``segment``, ``everything``): the same here and on Ray workers."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

import sam_mlx

from ..amg.mask_utils import (
    batched_mask_to_box,
    box_xyxy_to_xywh,
    coco_decode_rle,
    coco_encode_rle,
    mask_to_rle,
    rle_to_mask,
)
from ..io.export import COCO_FILES, Exporter, ExportObject
from ..io.images import load_image, pixel_fingerprint
from ..io.overlay import draw_overlay
from ..io.tokens import load_image_tokens, model_fingerprint, model_identity, read_image_tokens, save_image_tokens
from .jobs import ImageDone, ImageJob, ImageWork
from .messages import CliError, _plural
from .outputs import _REPORT_KEYS, _replacing_outputs, _save_png, _write_json
from .prompts import Prompt

TOKENS_SUFFIX = ".tokens.safetensors"  # encode --out-dir: one STEM.tokens.safetensors per image


def _predictor(args: argparse.Namespace, model, default_sizing: str = "original", default_size=None):
    """A SamPredictor with the --sizing / --size options, else the given defaults."""
    sizing = args.sizing or default_sizing
    size = args.size or (default_size if sizing == default_sizing else None)
    return sam_mlx.SamPredictor(model, sizing=sizing, size=size)


class _Laps:
    """Seconds spent in each named step of an image's processing."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self.last, 4)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 4)}


def _exporter(args: argparse.Namespace, labels: Sequence[str] = ()) -> Exporter:
    return Exporter(args.out_dir, args.export, simplify=args.simplify, best_only=args.best, labels=labels)


class _EncodeWork(ImageWork):
    """``encode``: the image tokens of each image, ``--out FILE`` or ``OUT_DIR/STEM.tokens.safetensors``."""

    command = "encode"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if args.out:
            self.out_dir = Path(args.out).parent

    def setup(self) -> None:
        self.predictor = _predictor(self.args, sam_mlx.load(self.model_name))

    def output(self, job: ImageJob) -> Path:
        return Path(self.args.out) if self.args.out else self.out_dir / f"{job.stem}{TOKENS_SUFFIX}"

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        laps = _Laps()
        image = load_image(job.path)
        laps("load")
        self.predictor.set_image(image)
        laps("encode")
        path = save_image_tokens(self.predictor, self.output(job), image_name=str(job.path))
        laps("write")
        h, w = self.predictor.geometry.grid_size
        seconds = laps.total()
        return ImageDone({"image": str(job.path), "files": [str(path)], "seconds": seconds},
                         f"{h}x{w} image tokens in {seconds['total']:.1f} s -> {path}")

    def resumed(self, job: ImageJob) -> ImageDone | None:
        path = self.output(job)
        try:
            saved = read_image_tokens(path)
        except (OSError, ValueError):
            return None
        predictor = self.predictor
        if (saved.model_fingerprint, saved.sizing, saved.size) != (
                model_fingerprint(predictor.model), predictor.sizing, predictor.size):
            return None
        try:
            if saved.image_fingerprint != pixel_fingerprint(load_image(job.path)):  # the image has changed
                return None
        except (OSError, ValueError):
            return None
        return ImageDone({"image": str(job.path), "files": [str(path)], "skipped": True},
                         f"tokens complete from an earlier run -> {path}")


class _MaskWork(ImageWork):
    """What ``segment`` and ``everything`` share: an overlay, exports and a JSON report per image, the report
    written last; a report whose ``expected`` keys match and whose files all exist is complete."""

    def expected(self, job: ImageJob) -> dict:
        """The report's keys that must match for --resume: the model and the settings that shape the outputs."""
        raise NotImplementedError

    def _settings(self) -> dict:
        return {"export": list(self.args.export), "simplify": self.args.simplify, "best": self.args.best}

    def objects(self, report: dict) -> list[ExportObject]:
        """The exported masks as the report describes them (to remake the run-level exports of a resumed image)."""
        raise NotImplementedError

    def resumed(self, job: ImageJob) -> ImageDone | None:
        path = self.out_dir / f"{job.stem}.json"
        try:
            report = json.loads(path.read_text())
            expected = json.loads(json.dumps(self.expected(job)))  # tuples as lists, as the report has them
            if any(report.get(key) != value for key, value in expected.items()):
                return None
            files = [self.out_dir / name for name in (report["overlay"], *report["exports"])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not all(file.is_file() for file in files):
            return None
        entry = None
        if any(kind in COCO_FILES for kind in self.args.export):
            entry = self.exporter.entry(job.name, report["width"], report["height"], self.objects(report))
        return ImageDone({"image": str(job.path), "files": [str(f) for f in (*files, path)], "skipped": True},
                         f"outputs complete from an earlier run -> {path}", entry)


class _SegmentWork(_MaskWork):
    command = "segment"

    def __init__(self, args: argparse.Namespace, labels: Sequence[str]):
        super().__init__(args, _exporter(args, labels))

    def setup(self) -> None:
        self.saved = read_image_tokens(self.args.tokens) if self.args.tokens else None
        # Tokens bring their own sizing: it is used unless --sizing / --size say otherwise (then refused).
        model = sam_mlx.load(self.model_name)
        if self.args.hq_token_only and not model.config.hq:
            raise CliError(f"--hq-token-only needs an HQ-SAM model; {self.model_name} ({model.config.name}) has no "
                           "HQ token")
        self.predictor = _predictor(self.args, model, *((self.saved.sizing, self.saved.size) if self.saved else ()))

    def expected(self, job: ImageJob) -> dict:
        predictor = self.predictor
        settings = {"prompts": [p.describe() for p in job.prompts], "multimask": self.args.multimask,
                    **({"hq_token_only": True} if self.args.hq_token_only else {}),
                    **({"clip_boxes": True} if self.args.clip_boxes else {}), **self._settings()}
        return {"model": model_identity(predictor.model), "sizing": predictor.sizing, "size": predictor.size,
                "settings": settings}

    def objects(self, report: dict) -> list[ExportObject]:
        return [ExportObject(coco_decode_rle(m["segmentation"]), label=m["label"], score=m["score"],
                             extra={"prompt": m["prompt"]}, group=m["prompt_index"]) for m in report["masks"]]

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        laps = _Laps()
        image = load_image(job.path)
        height, width = image.shape[:2]
        laps("load")
        for prompt in job.prompts:
            prompt.check(width, height, job.path.name)
        if self.saved:
            if self.saved.geometry.original_size != (height, width):
                h, w = self.saved.geometry.original_size
                raise CliError(f"{self.args.tokens} was encoded from a {w}x{h} image, but {job.path} is "
                               f"{width}x{height}")
            load_image_tokens(self.predictor, self.args.tokens, image, image_name=str(job.path))
        else:
            self.predictor.set_image(image)
        laps("encode")
        report, objects, overlay = _segment(self.predictor, image, job.prompts, self.args.multimask, job.stem,
                                            self.exporter, self.args.hq_token_only, self.args.clip_boxes)
        laps("decode")
        out_dir = self.out_dir
        with _replacing_outputs(out_dir, job.stem):
            files, entry = self.exporter.write(job.path, image, objects, stem=job.stem, file_name=job.name)
            _save_png(overlay, out_dir / report["overlay"])
            report["exports"] = [p.relative_to(out_dir).as_posix() for p in files]
            report["settings"] = self.expected(job)["settings"]
            _write_json({"image": str(job.path), **report}, out_dir / f"{job.stem}.json")
        laps("write")
        seconds = laps.total()
        written = [*files, out_dir / report["overlay"], out_dir / f"{job.stem}.json"]
        return ImageDone({"image": str(job.path), "files": [str(p) for p in written],
                          "scores": [m["score"] for m in report["masks"]], "seconds": seconds},
                         f"{_plural(len(objects), 'mask')} in {seconds['total']:.1f} s -> "
                         f"{out_dir / report['overlay']}", entry)


class _EverythingWork(_MaskWork):
    command = "everything"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, _exporter(args))

    def setup(self) -> None:
        args = self.args
        self.model = sam_mlx.load(self.model_name)
        self.generator = sam_mlx.SamAutomaticMaskGenerator(
            self.model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
            crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
            output_mode="uncompressed_rle", sizing=args.sizing or "original", size=args.size,
        )

    def expected(self, job: ImageJob) -> dict:
        args = self.args
        settings = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                    "stability_score_thresh": args.stability_score_thresh, "crop_n_layers": args.crop_n_layers,
                    "min_mask_region_area": args.min_mask_region_area, "sizing": args.sizing or "original",
                    "size": args.size, **self._settings()}
        return {"model": model_identity(self.model), "settings": settings}

    def objects(self, report: dict) -> list[ExportObject]:
        return [_everything_object(coco_decode_rle(r["segmentation"]), r) for r in report["annotations"]]

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        path, out_dir = job.path, self.out_dir
        laps = _Laps()
        image = load_image(path)
        laps("load")
        records = self.generator.generate(image, progress=progress)
        laps("generate")
        masks = [rle_to_mask(r["segmentation"]) for r in records]
        objects = [_everything_object(mask, r) for mask, r in zip(masks, records)]
        overlay = f"{job.stem}_overlay.png"
        annotations = [{**r, "segmentation": coco_encode_rle(r["segmentation"])} for r in records]
        height, width = image.shape[:2]
        expected = self.expected(job)
        with _replacing_outputs(out_dir, job.stem):
            files, entry = self.exporter.write(path, image, objects, stem=job.stem, file_name=job.name)
            _save_png(draw_overlay(image, masks), out_dir / overlay)
            _write_json(
                {"image": str(path), "width": width, "height": height, "model": expected["model"],
                 "overlay": overlay, "exports": [p.relative_to(out_dir).as_posix() for p in files],
                 "settings": expected["settings"], "annotations": annotations},
                out_dir / f"{job.stem}.json",
            )
        laps("write")
        seconds = laps.total()
        written = [*files, out_dir / overlay, out_dir / f"{job.stem}.json"]
        return ImageDone({"image": str(path), "files": [str(p) for p in written],
                          "scores": [r["predicted_iou"] for r in records], "seconds": seconds},
                         f"{_plural(len(records), 'mask')} in {seconds['total']:.1f} s -> {out_dir / overlay}", entry)


def _everything_object(mask: np.ndarray, record: dict) -> ExportObject:
    return ExportObject(mask, score=record["predicted_iou"], stability_score=record["stability_score"],
                        extra={"point_coords": record["point_coords"], "crop_box": record["crop_box"]})


def _mask_record(mask: np.ndarray) -> dict:
    """Area and bbox of an H x W bool mask, as the automatic mask generator reports them.

    The bbox is x, y, x2 - x1, y2 - y1 of the inclusive corner pixels: Meta's convention,
    one less than COCO's width and height.
    """
    return {"area": int(mask.sum()), "bbox": box_xyxy_to_xywh(batched_mask_to_box(mask)).tolist()}


def segment_prompts(
    predictor: sam_mlx.SamPredictor,
    prompts: Sequence[Prompt],
    multimask: bool | None,
    hq_token_only: bool = False,
    clip_boxes: bool = False,
) -> tuple[list[dict], list[ExportObject]]:
    """Decode the prompts on the predictor's image: a record per mask (prompt_index, mask_index, multimask,
    score, area, bbox, segmentation as COCO RLE, label, prompt) and the masks to export, in the same order.

    Every box of a prompt is one prompt (with all its points), all B decoded as one batch; no box is
    one prompt of points. ``multimask`` None: three candidates for a lone point, else one mask (HQ-SAM: always
    one, its HQ mask alone with ``hq_token_only``). Boxes crossing the image's border are used as given, as the
    original takes them, or with ``clip_boxes`` clipped to the image.
    """
    records, objects = [], []
    group = 0  # SAM's candidates for one prompt (one box) form a group: --best keeps its top one
    for prompt in prompts:
        points, labels, boxes = prompt.points, prompt.labels, prompt.boxes
        # A lone point is ambiguous (part or whole?): return SAM's three candidates unless told otherwise.
        several = multimask if multimask is not None else (len(points) == 1 and not len(boxes))
        n_prompts = max(len(boxes), 1)
        masks, scores, _ = predictor.predict_batch(
            np.broadcast_to(points, (n_prompts, *points.shape)) if len(points) else None,
            np.broadcast_to(labels, (n_prompts, len(labels))) if len(points) else None,
            boxes if len(boxes) else None,
            multimask_output=several,
            return_low_res=False,
            hq_token_only=hq_token_only,
            clip_boxes=clip_boxes,
        )  # masks: n_prompts x C x H x W
        for b in range(n_prompts):
            box = boxes[b].tolist() if len(boxes) else None
            described = {"points": points.tolist(), "labels": labels.tolist(), "box": box}
            for c in range(masks.shape[1]):
                mask = masks[b, c]
                records.append({"prompt_index": group, "mask_index": c, "multimask": several,
                                "score": float(scores[b, c]), **_mask_record(mask),
                                "segmentation": coco_encode_rle(mask_to_rle(mask[None])[0]),
                                "label": prompt.label, "prompt": described})
                objects.append(ExportObject(mask, label=prompt.label, score=float(scores[b, c]),
                                            extra={"prompt": described}, group=group))
            group += 1
    return records, objects


def _segment(
    predictor: sam_mlx.SamPredictor,
    image: np.ndarray,
    prompts: Sequence[Prompt],
    multimask: bool | None,
    stem: str,
    exporter: Exporter,
    hq_token_only: bool = False,
    clip_boxes: bool = False,
) -> tuple[dict, list[ExportObject], Image.Image]:
    """Decode the prompts on the predictor's image; return the JSON report, the masks to export and the overlay."""
    records, objects = segment_prompts(predictor, prompts, multimask, hq_token_only, clip_boxes)
    chosen = set(exporter.selected(objects))
    records = [{**({_REPORT_KEYS[kind]: name for kind, name in exporter.object_files(stem, i).items()}
                   if i in chosen else {}), **record}  # --best: no files for the others
               for i, record in enumerate(records)]
    all_points = np.concatenate([p.points for p in prompts])
    all_labels = np.concatenate([p.labels for p in prompts])
    all_boxes = np.concatenate([p.boxes for p in prompts])
    height, width = image.shape[:2]
    report = {"width": width, "height": height, "model": model_identity(predictor.model), "sizing": predictor.sizing,
              "size": predictor.size, "overlay": f"{stem}_overlay.png", "masks": records}
    overlay = draw_overlay(image, [obj.mask for obj in objects], all_points, all_labels, all_boxes)
    return report, objects, overlay
