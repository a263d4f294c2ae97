"""The docs render and run as written: README.md (the front page) and the manual in docs/.

Every table row has its header's columns (a bare | inside a cell splits it), every picture exists beside the file
that shows it, every link between the docs resolves (file and #anchor), measurement tables carry their date and
command, the example outputs are ignored by git, and the README's Python example, its first command and the
prompts-file example of docs/command.md run and segment what they say.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import IMAGES, MOBILE_SAM
from sam_mlx.amg.mask_utils import coco_decode_rle

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a # or | in code is not Markdown)."""
    return re.sub(r"^```.*?^```", "", text(page), flags=re.S | re.M)


def tables(page: Path) -> list[list[str]]:
    found, current = [], []
    for line in prose(page).splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def cells(row: str) -> int:
    """Columns of a Markdown table row: pipes that are not escaped, outside the outer two."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", prose(page), re.M)}


def code_block(page: Path, language: str, after: str = "") -> str:
    """The first ```language block of the page after the heading or text ``after``."""
    source = text(page)
    return re.search(rf"```{language}\n(.*?)```", source[source.index(after):], re.S).group(1)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_table_rows_have_their_headers_columns(page):
    for table in tables(page):
        for row in table[1:]:
            assert cells(row) == cells(table[0]), f"{page.name}: {row}"


def test_the_tables_moved_with_the_text():
    counts = {page.relative_to(ROOT).as_posix(): len(tables(page)) for page in PAGES}
    assert counts["README.md"] >= 2 and counts["docs/command.md"] >= 3 and counts["docs/speed.md"] >= 3, counts
    assert counts["docs/app.md"] >= 1 and counts["docs/models.md"] >= 2 and counts["docs/architecture.md"] >= 2, counts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pictures_exist_beside_their_page(page):
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", prose(page)):
        path = page.parent / picture
        assert path.is_file(), f"{page.name}: {picture}"
        assert path.stat().st_size < 150_000, f"{page.name}: {picture} is not small"


def test_the_pictures_are_shown():
    assert "docs/truck_point.jpg" in text(README)
    shown = " ".join(prose(page) for page in DOCS)
    for picture in ("truck_cutout.jpg", "truck_box_point.jpg", "app.jpg", "groceries_item_box_stretch.jpg"):
        assert f"]({picture})" in shown, picture


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_the_docs_resolve(page):
    for target in re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.is_file(), f"{page.name}: {target} (no file {path})"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {target} (no heading #{anchor} in {path.name})"


def test_readme_is_a_front_page_linking_every_doc():
    lines = text(README).splitlines()
    assert len(lines) < 170, f"README.md has {len(lines)} lines: the manual belongs in docs/"
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text(README)))
    index = set(re.findall(r"\]\(([\w.-]+\.md)", text(ROOT / "docs" / "README.md")))
    for page in DOCS:
        if page.name != "README.md":
            assert page.name in linked, f"README.md does not link docs/{page.name}"
            assert page.name in index, f"docs/README.md does not list {page.name}"


def test_measurement_tables_carry_date_and_command():
    """A table of figures in speed.md or README's Speed section follows text naming its date and command."""
    readme = text(README)
    sections = [readme[readme.index("## Speed"):readme.index("## Tests")]]
    speed = text(ROOT / "docs" / "speed.md")
    sections += re.split(r"^## ", speed, flags=re.M)[1:]
    measured = 0
    for section in sections:
        before_table = section.split("\n|", 1)[0]
        if "\n|" in section:
            measured += 1
            assert re.search(r"20\d\d-\d\d-\d\d", before_table), section[:80]
            assert "python scripts/" in before_table, section[:80]
    assert measured >= 4


def test_ci_runs_the_readme_test_command():
    tests = code_block(README, "bash", "## Tests").splitlines()
    (everything,) = [line.split("#")[0].strip() for line in tests if "# everything" in line]
    assert everything == "python -m pytest -q"
    assert everything in (ROOT / ".ci" / "run").read_text().splitlines()


def test_install_works_copied_as_it_stands():
    """Debian/Ubuntu: package lists first, sudo optional (root in a container has none), a venv, then pip."""
    lines = code_block(README, "bash", "**Debian 12").splitlines()
    assert lines[0] == "$(command -v sudo) apt-get update"
    assert "python3-venv" in lines[1] and "libopenblas0-pthread" in lines[1] and "-y" in lines[1]
    assert lines[2:] == ["python3 -m venv .venv && . .venv/bin/activate", 'pip install -e ".[cpu,export,app]"']
    assert code_block(README, "bash", "**macOS").splitlines() == lines[2:3] + ['pip install -e ".[export,app]"']
    assert not re.search(r"^sudo ", text(README), re.M)


def test_example_outputs_are_ignored():
    for path in ("out/truck_mask0.png", "truck.tokens.safetensors", "model.safetensors", "sam-mlx-export/coco.json",
                 "tokens/a.parquet", "masks/a.parquet"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False).returncode == 0, path


# ---------------------------------------------------------------- the examples run
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The command's environment: the shared MobileSAM for `mobile_sam`, a fresh cache, the Hub offline."""
    root = tmp_path_factory.mktemp("readme_env")
    env = {k: v for k, v in os.environ.items() if k not in ("SAM_MLX_MODEL", "SAM_MLX_CACHE")}
    env.update(SAM_MLX_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    return env


def command(line: str) -> list[str]:
    """A documented `sam-mlx ...` line as this Python's command, the Hub's `mobile_sam` as the shared file."""
    words = line.split()
    assert words[0] == "sam-mlx" and "mobile_sam" in words, line
    return [sys.executable, "-m", "sam_mlx.cli", *[str(MOBILE_SAM) if w == "mobile_sam" else w for w in words[1:]]]


def test_readme_python_example_runs():
    code = code_block(README, "python", "## The Python API")
    assert 'sam_mlx.load("mobile_sam")' in code
    scope: dict = {}
    exec(compile(code.replace('"mobile_sam"', repr(str(MOBILE_SAM))), "README.md", "exec"), scope)
    assert scope["best"].shape == (600, 900) and scope["best"][188, 250]  # the truck's window, clicked
    assert scope["masks"].shape == (1, 600, 900) and scope["masks"][0].mean() > 0.2  # the box: the whole truck
    assert len(scope["records"]) >= 5


def test_readme_first_command_writes_what_it_says(env, tmp_path):
    line = code_block(README, "bash", "## The first segment").strip()
    assert "--example truck" in line and "--out-dir out" in line
    result = subprocess.run(command(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    said = re.search(r"`out/` then holds (.*?)\n\n", text(README), re.S).group(1)
    for name in re.findall(r"`(truck[\w.]+)`", said):
        assert (tmp_path / "out" / name).is_file(), name
    report = json.loads((tmp_path / "out" / "truck.json").read_text())
    assert len(report["masks"]) == 3
    for mask in report["masks"]:  # every candidate holds the clicked point
        assert coco_decode_rle(mask["segmentation"])[188, 250]


def test_every_documented_run_names_its_model():
    """A command that runs a model, written in the docs, says which (--model), unless the text set $SAM_MLX_MODEL."""
    runs = 0
    for page in PAGES:
        for line in re.findall(r"^(sam-mlx (?:segment|everything|encode) .*)$", text(page), re.M):
            runs += 1
            assert "--model" in line, f"{page.name}: {line}"
    assert runs >= 6


def test_readme_export_example_writes_its_formats(env, tmp_path):
    (line,) = [x for x in code_block(README, "bash", "## The `sam-mlx` command").splitlines() if "--export" in x]
    result = subprocess.run(command(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    coco = json.loads((out / "coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["truck"] and len(coco["annotations"]) == 1
    assert (out / "yolo" / "classes.txt").read_text().split() == ["truck"]
    alpha = np.asarray(Image.open(out / "truck_cutout0.png"))[..., 3] > 0
    assert alpha.shape == (600, 900) and alpha[188, 250] and not alpha[550, 450]  # the truck kept, the road not


# The prompts-file example on dog.jpg (800 x 534), each label's mask checked against what the photo shows there,
# read off the photo by eye: points inside the object, points on the others, and the object's extent.
LABELLED = {
    "dog": {"inside": [(150, 450), (330, 290), (60, 520)], "box": (0, 215, 435, 534), "area": (60_000, 100_000)},
    "bowl": {"inside": [(560, 205), (520, 170), (640, 180)], "box": (485, 135, 668, 265), "area": (10_000, 25_000)},
    "floor": {"inside": [(450, 470), (720, 500), (500, 330)], "box": (0, 0, 800, 534), "area": (100_000, 250_000)},
}
OTHERS = {"dog": [(250, 400), (150, 450)], "bowl": [(570, 200)], "floor": [(450, 470), (720, 500)],
          "jeans": [(700, 200)], "foot": [(630, 395)]}  # what the photo shows at these points


def labelled_masks(report: dict) -> dict[str, np.ndarray]:
    masks = {}
    for mask in report["masks"]:
        assert mask["label"] not in masks, "--best: one mask per prompt"
        masks[mask["label"]] = coco_decode_rle(mask["segmentation"])
    return masks


def check_labelled(masks: dict[str, np.ndarray]) -> None:
    for label, mask in masks.items():
        facts = LABELLED[label]
        for x, y in facts["inside"]:
            assert mask[y, x], f"{label}: ({x}, {y}) is not in its mask"
        for other, points in OTHERS.items():
            for x, y in points if other != label else ():
                assert not mask[y, x], f"{label}: its mask takes ({x}, {y}), on the {other}"
        rows, cols = np.nonzero(mask)
        x1, y1, x2, y2 = facts["box"]
        assert x1 <= cols.min() and cols.max() <= x2 and y1 <= rows.min() and rows.max() <= y2, label
        assert facts["area"][0] <= mask.sum() <= facts["area"][1], (label, int(mask.sum()))
    for a in masks:
        for b in masks:
            if a < b:
                assert (masks[a] & masks[b]).sum() < 0.05 * min(masks[a].sum(), masks[b].sum()), (a, b)


def test_prompts_file_example_segments_what_its_labels_name(env, tmp_path):
    page = ROOT / "docs" / "command.md"
    prompts = code_block(page, "json", "## Prompts files")
    line = code_block(page, "bash", "## Prompts files").strip()
    assert "--prompts prompts.json" in line and "--best" in line
    (tmp_path / "photos").mkdir()
    shutil.copy(IMAGES / "dog.jpg", tmp_path / "photos" / "dog.jpg")
    (tmp_path / "prompts.json").write_text(prompts)
    (tmp_path / "prompts.csv").write_text(code_block(page, "csv", "## Prompts files"))
    result = subprocess.run(command(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    masks = labelled_masks(json.loads((tmp_path / "out" / "dog.json").read_text()))
    assert sorted(masks) == ["bowl", "dog", "floor"]
    check_labelled(masks)
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert sorted(c["name"] for c in coco["categories"]) == ["bowl", "dog", "floor"]
    # the CSV example says the same for the dog and the floor
    csv_line = line.replace("prompts.json", "prompts.csv").replace("--out-dir out", "--out-dir out_csv")
    result = subprocess.run(command(csv_line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    from_csv = labelled_masks(json.loads((tmp_path / "out_csv" / "dog.json").read_text()))
    assert sorted(from_csv) == ["dog", "floor"]
    for label, mask in from_csv.items():
        assert np.array_equal(mask, masks[label]), label
