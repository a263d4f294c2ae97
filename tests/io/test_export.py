"""sam_mlx.io.export: every format written by the Exporter and read back the way its consumers read it.

COCO files are loaded with pycocotools; LabelMe files are checked against the keys and types labelme's
loader asserts and rasterised as labelme's ``shape_to_mask`` does (PIL ``polygon(outline=1, fill=1)``,
shapes of one ``group_id`` joined); YOLO lines are rasterised as ultralytics' ``polygon2mask`` does
(coordinates times the image size, truncated to int32, ``cv2.fillPoly``).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as coco_mask

from export_readers import coco_masks, iou, labelme_masks, yolo_masks
from helpers import IMAGES, REFERENCE
from sam_mlx.io import export
from sam_mlx.io.export import DEFAULT_SIMPLIFY, FORMATS, Exporter, ExportObject, parse_formats

# pycocotools trips numpy deprecation warnings inside itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_all(out_dir: Path, masks: list[np.ndarray], simplify: float, labels=None, image=None) -> Exporter:
    height, width = masks[0].shape
    image = np.zeros((height, width, 3), np.uint8) if image is None else image
    exporter = Exporter(out_dir, FORMATS, simplify=simplify)
    labels = labels or [None] * len(masks)
    exporter.add(out_dir / "image.png", image, [ExportObject(m, label=n, score=0.9) for m, n in zip(masks, labels)])
    exporter.close()
    return exporter


def read_back(out_dir: Path, width: int, height: int):
    """The masks of every format, in the order written: COCO, COCO RLE, LabelMe, YOLO."""
    _, polygons = coco_masks(out_dir / "coco.json")
    _, rles = coco_masks(out_dir / "coco_rle.json")
    _, labelme = labelme_masks(out_dir / "labelme" / "image.json")
    yolo = yolo_masks(out_dir / "yolo" / "image.txt", width, height)
    return list(polygons.values()), list(rles.values()), list(labelme.values()), [m for _, m in yolo]


# ---------------------------------------------------------------- shapes
def shape(rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)


EDGE_CASES = {
    "hole": shape("""......  .####.  .#..#.  .#..#.  .####.  ......"""),
    "island in a hole": shape("""#######  #.....#  #.###.#  #.#.#.#  #.###.#  #.....#  #######"""),
    "two holes": shape("""#######  #.#.#.#  #######"""),
    "diagonal hole": shape("""####.  #.#..  ##.##  .####"""),
    "parts touching at a corner": shape("""##...  ##...  ..##.  ..##.  ....#"""),
    "one pixel": shape("""...  .#.  ..."""),
    "one pixel in a corner": shape("""#..  ...  ..."""),
    "one pixel in the other corner": shape("""...  ...  ..#"""),
    "a pixel line": shape(""".....  #####  .....  ..#..  ..#.."""),
    "the whole image": shape("""####  ####  ####"""),
    "on every border": shape("""#####  #...#  #...#  #####"""),
    "checkerboard": shape("""#.#.  .#.#  #.#.  .#.#"""),
    "1x1 image": shape("#"),
}


@pytest.mark.parametrize("mask", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_polygons_rasterise_back_exactly(mask, tmp_path):
    """Holes, parts touching at a corner, one-pixel masks and masks on the border, at simplify 0."""
    write_all(tmp_path, [mask], simplify=0)
    coco, rle, labelme, yolo = read_back(tmp_path, mask.shape[1], mask.shape[0])
    for name, masks in (("coco", coco), ("coco-rle", rle), ("labelme", labelme)):
        assert len(masks) == 1 and np.array_equal(masks[0], mask), name
    assert len(yolo) == 1 and not (mask & ~yolo[0]).any(), "a YOLO line covers its mask"
    if cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] == 2:  # one part: bridges cross no gap
        assert np.array_equal(yolo[0], mask)


def test_hole_is_cut_into_pieces_without_holes():
    pieces = list(export.hole_free_pieces(EDGE_CASES["island in a hole"]))
    assert len(pieces) >= 3  # the ring, cut at least once, and the island
    union = np.zeros((7, 7), bool)
    for piece, x0, y0 in pieces:
        assert not (union[y0:y0 + piece.shape[0], x0:x0 + piece.shape[1]] & piece).any(), "pieces overlap"
        union[y0:y0 + piece.shape[0], x0:x0 + piece.shape[1]] |= piece
        _, hierarchy = cv2.findContours(np.pad(piece, 1).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        assert (hierarchy[0][:, 3] == -1).all(), "a piece has a hole"
    assert np.array_equal(union, EDGE_CASES["island in a hole"])


@pytest.mark.parametrize("tree_vertices", [4000, 0], ids=["shortest tree", "reading chain"])
def test_bridged_polygon_covers_every_part(tree_vertices, monkeypatch):
    """YOLO's one polygon per object: filled by ultralytics, it covers every part, plus only its bridges' pixels."""
    monkeypatch.setattr(export, "_TREE_VERTICES", tree_vertices)
    mask = np.random.default_rng(1).random((40, 60)) < 0.08
    mask[5:20, 5:30] = True
    polygons = export.mask_polygons(mask, 0, outline=False)
    joined = export.bridged(polygons)
    assert len(polygons) > 20 and len(joined) == sum(map(len, polygons)) + 2 * (len(polygons) - 1)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(filled, [joined.astype(np.int32)], 1)
    assert not (mask & ~filled.astype(bool)).any()
    lines = np.zeros(mask.shape, np.uint8)  # the bridges: the segments between consecutive polygons' vertices
    path = joined.tolist()
    for a, b in zip(path, path[1:]):
        if max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 1:
            cv2.line(lines, tuple(a), tuple(b), 1)
    outlines = np.zeros(mask.shape, np.uint8)
    cv2.polylines(outlines, [p.astype(np.int32) for p in polygons], True, 1)
    assert not (filled.astype(bool) & ~mask & ~lines.astype(bool) & ~outlines.astype(bool)).any()


def test_one_pixel_polygons():
    pixel = EDGE_CASES["one pixel"]
    assert export.mask_polygons(pixel, 0, outline=True)[0].tolist() == [[1, 1], [1, 2], [2, 2], [2, 1]]
    assert export.mask_polygons(pixel, 0, outline=False)[0].tolist() == [[1, 1]] * 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 14), st.integers(1, 14), st.floats(0.15, 0.85), st.integers(0, 2**32 - 1))
def test_random_masks_rasterise_back_exactly(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    if not mask.any():
        mask[height // 2, width // 2] = True
    with tempfile.TemporaryDirectory() as folder:
        write_all(Path(folder), [mask], simplify=0)
        coco, rle, labelme, yolo = read_back(Path(folder), width, height)
    assert np.array_equal(coco[0], mask) and np.array_equal(rle[0], mask) and np.array_equal(labelme[0], mask)
    assert not (mask & ~yolo[0]).any()


def reference_masks() -> list[np.ndarray]:
    """Every final mask of the shared PyTorch reference outputs (three photos, multimask and single)."""
    masks = []
    for path in sorted(REFERENCE.glob("*.npz")):
        data = np.load(path)
        width = int(data["original_size"][1])
        for key in data.files:
            if key.endswith("masks_packed") and not key.startswith("per_axis"):
                masks += list(np.unpackbits(data[key], axis=-1, count=width).astype(bool))
    return masks


def test_shared_photos_masks_read_back_at_the_default_tolerance(tmp_path):
    """COCO polygons and LabelMe shapes at IoU >= 0.98 with the masks; YOLO's bridges cost a little more."""
    masks = reference_masks()
    assert len(masks) == 48
    ious: dict[str, list[float]] = {"coco": [], "labelme": [], "yolo": []}
    for i, mask in enumerate(masks):
        folder = tmp_path / str(i)
        write_all(folder, [mask], simplify=DEFAULT_SIMPLIFY)
        coco, rle, labelme, yolo = read_back(folder, mask.shape[1], mask.shape[0])
        assert np.array_equal(rle[0], mask)
        for name, read in (("coco", coco), ("labelme", labelme), ("yolo", yolo)):
            ious[name].append(iou(read[0], mask))
    assert min(ious["coco"]) >= 0.98 and min(ious["labelme"]) >= 0.98, {k: min(v) for k, v in ious.items()}
    assert min(ious["yolo"]) >= 0.9 and np.mean(ious["yolo"]) >= 0.98, (min(ious["yolo"]), np.mean(ious["yolo"]))


def test_simplify_drops_vertices():
    mask = reference_masks()[0]
    counts = [sum(len(p) for p in export.mask_polygons(mask, tolerance)) for tolerance in (0, DEFAULT_SIMPLIFY, 3)]
    assert counts[0] > counts[1] > counts[2], counts


# ---------------------------------------------------------------- the files
@pytest.fixture
def dog() -> np.ndarray:
    return np.asarray(Image.open(IMAGES / "dog.jpg").convert("RGB"))


def two_objects(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.zeros((2, height, width), bool)
    first[100:300, 200:500] = True
    first[150:200, 300:350] = False  # a hole
    second[400:450, 50:60] = True
    second[460:470, 80:90] = True  # two parts
    return first, second


def test_every_format_of_a_run(dog, tmp_path):
    height, width = dog.shape[:2]
    first, second = two_objects(height, width)
    exporter = Exporter(tmp_path, FORMATS)
    objects = [ExportObject(first, label="dog", score=0.9, stability_score=0.97, extra={"prompt": {"box": [1, 2]}}),
               ExportObject(second, score=np.float32(0.8)), ExportObject(np.zeros((height, width), bool))]
    written = exporter.add(IMAGES / "dog.jpg", dog, objects, stem="dog")
    written += exporter.add(IMAGES / "dog.jpg", dog, objects[1:2], stem="dog-2", file_name="again/dog.jpg")
    written += exporter.close()
    expected = {f"dog_{kind}{i}.png" for kind in ("mask", "cutout") for i in range(3)} | {
        "dog-2_mask0.png", "dog-2_cutout0.png", "yolo/dog.txt", "yolo/dog-2.txt", "labelme/dog.json",
        "labelme/dog-2.json", "coco.json", "coco_rle.json", "yolo/classes.txt"}
    assert {p.relative_to(tmp_path).as_posix() for p in written} == expected
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(expected)

    # png and cutout
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dog_mask0.png")), first.astype(np.uint8) * 255)
    cutout = np.asarray(Image.open(tmp_path / "dog_cutout1.png"))
    assert cutout.shape == (height, width, 4) and np.array_equal(cutout[..., :3], dog * second[..., None])
    assert np.array_equal(cutout[..., 3], second.astype(np.uint8) * 255)

    # COCO: the empty mask is left out; labels are categories in order of first appearance
    for name in ("coco.json", "coco_rle.json"):
        coco, masks = coco_masks(tmp_path / name)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog", "object"]
        assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco.dataset["images"]] == [
            (1, "dog.jpg", width, height), (2, "again/dog.jpg", width, height)]
        anns = [coco.anns[i] for i in sorted(coco.anns)]
        assert [(a["image_id"], a["category_id"]) for a in anns] == [(1, 1), (1, 2), (2, 2)]
        for ann, mask in zip(anns, (first, second, second)):
            assert np.array_equal(masks[ann["id"]], mask)
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["area"] == int(coco_mask.area(rle)) and ann["bbox"] == coco_mask.toBbox(rle).tolist()
            assert ann["iscrowd"] == 0 and ann["score"] == ann["predicted_iou"]
        assert anns[0]["score"] == 0.9 and anns[0]["stability_score"] == 0.97 and anns[0]["prompt"] == {"box": [1, 2]}
        assert anns[1]["score"] == pytest.approx(0.8) and anns[1]["stability_score"] is None
    assert len(json.loads((tmp_path / "coco.json").read_text())["annotations"][0]["segmentation"]) >= 2  # hole cut

    # YOLO: classes by label, one line per object, the same classes file order
    assert (tmp_path / "yolo/classes.txt").read_text() == "dog\nobject\n"
    lines = yolo_masks(tmp_path / "yolo/dog.txt", width, height)
    assert [cls for cls, _ in lines] == [0, 1]
    assert iou(lines[0][1], first) > 0.99 and not (first & ~lines[0][1]).any()
    assert iou(lines[1][1], second) > 0.85 and not (second & ~lines[1][1]).any()  # a bridge joins its parts

    # LabelMe: the image path resolves from the JSON's folder; shapes grouped per object
    document, instances = labelme_masks(tmp_path / "labelme/dog.json")
    assert (tmp_path / "labelme" / document["imagePath"]).resolve() == (IMAGES / "dog.jpg").resolve()
    assert (document["imageWidth"], document["imageHeight"]) == (width, height) and document["imageData"] is None
    assert set(instances) == {("dog", 0), ("object", 1)}
    assert iou(instances["dog", 0], first) > 0.99 and iou(instances["object", 1], second) > 0.99
    assert len([s for s in document["shapes"] if s["group_id"] == 1]) == 2  # two parts, two shapes
    assert document["shapes"][0]["score"] == 0.9 and document["shapes"][0]["prompt"] == {"box": [1, 2]}


def test_unlabelled_run_is_class_zero_without_classes_file(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:25] = True
    exporter = Exporter(tmp_path, ["yolo", "coco"])
    exporter.add(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8), [ExportObject(mask), ExportObject(mask)])
    exporter.close()
    assert [cls for cls, _ in yolo_masks(tmp_path / "yolo/a.txt", 30, 20)] == [0, 0]
    assert not (tmp_path / "yolo/classes.txt").exists()
    assert json.loads((tmp_path / "coco.json").read_text())["categories"] == [
        {"id": 1, "name": "object", "supercategory": ""}]


def test_labels_given_up_front_come_first(tmp_path):
    mask = np.ones((4, 4), bool)
    exporter = Exporter(tmp_path, ["yolo"], labels=["cat", "dog"])
    exporter.add(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8), [ExportObject(mask, label="dog")])
    exporter.close()
    assert (tmp_path / "yolo/a.txt").read_text().startswith("1 ")
    assert (tmp_path / "yolo/classes.txt").read_text() == "cat\ndog\n"


def test_best_only_keeps_each_groups_top_mask(tmp_path):
    masks = np.zeros((5, 8, 8), bool)
    for i in range(5):
        masks[i, i:i + 2, i:i + 3] = True
    scores, groups = [0.5, 0.9, 0.7, 0.6, 0.95], [0, 0, 0, 1, 1]
    objects = [ExportObject(m, score=s, group=g) for m, s, g in zip(masks, scores, groups)]
    exporter = Exporter(tmp_path, ["png", "cutout"], best_only=True)
    assert exporter.selected(objects) == [1, 4]
    written = exporter.add(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8), objects)
    assert sorted(p.name for p in written) == ["a_cutout1.png", "a_cutout4.png", "a_mask1.png", "a_mask4.png"]
    assert exporter.object_files("a", 4) == {"png": "a_mask4.png", "cutout": "a_cutout4.png"}
    ungrouped = [ExportObject(m, score=s) for m, s in zip(masks, scores)]
    assert exporter.selected(ungrouped) == [4] and Exporter(tmp_path, ["png"]).selected(ungrouped) == list(range(5))


@pytest.mark.parametrize("formats, message", [
    ("png,tiff", "unknown export format 'tiff' (choose from png, cutout, coco, coco-rle, yolo, labelme)"),
    (",", "no export format given"),
])
def test_bad_formats(formats, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_formats(formats)


def test_formats_parse():
    assert parse_formats("PNG, coco,png") == ("png", "coco") and parse_formats(["yolo"]) == ("yolo",)


def test_bad_input_is_named(tmp_path):
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match=r"mask 1 has shape \(5, 4\), the image is 4x5"):
        Exporter(tmp_path, ["png"]).add(tmp_path / "a.png", image, [ExportObject(np.ones((4, 5))),
                                                                    ExportObject(np.ones((5, 4)))])
    with pytest.raises(ValueError, match=r"image must be H x W x 3 uint8 RGB, got \(4, 5\) float64"):
        Exporter(tmp_path, ["png"]).add(tmp_path / "a.png", np.zeros((4, 5)), [])
    with pytest.raises(ValueError, match="simplify must be a number of pixels >= 0, got -1"):
        Exporter(tmp_path, ["coco"], simplify=-1)
    with pytest.raises(ValueError, match="extra key 'area' is a field of the export format"):
        Exporter(tmp_path, ["coco"]).add(tmp_path / "a.png", image, [ExportObject(np.ones((4, 5)), extra={"area": 1})])
    assert list(tmp_path.iterdir()) == []


def test_missing_opencv_is_a_clear_error_only_for_polygon_formats(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    for name in ("coco", "yolo", "labelme"):
        with pytest.raises(ImportError, match=r"trace polygons with OpenCV.*pip install 'sam-mlx\[export\]'"):
            Exporter(tmp_path, ["png", name])
    exporter = Exporter(tmp_path, ["png", "cutout", "coco-rle"])
    exporter.add(tmp_path / "a.png", np.zeros((4, 5, 3), np.uint8), [ExportObject(np.ones((4, 5), bool))])
    assert [p.name for p in exporter.close()] == ["coco_rle.json"]
