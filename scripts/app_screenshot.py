"""The screenshots of `sam-mlx app` in headless Chromium (README.md, docs/app.md).

    python scripts/app_screenshot.py [--scene objects|project] [--out FILE]

Both start the app on ../shared/images (dog, groceries, truck) with the shared MobileSAM, click one point per
object, label and finish each, and save the page as a JPEG:
- `objects` (docs/app.jpg): six objects on groceries.jpg and a seventh left with its three candidates showing;
- `project` (docs/app_project.jpg): the dog segmented and marked done (Done -> next opens the groceries), two bags
  there: the top bar's progress and the image list with each image's state and object count, kept in its project.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "app")]  # app_process and the helpers it imports

from app_process import CHROMIUM, CHROMIUM_ARGS, start_app  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from helpers import IMAGES, MOBILE_SAM  # noqa: E402

DOG, GROCERIES = 0, 1  # ../shared/images in name order: dog, groceries, truck
SCENES = {  # image -> the objects segmented on it, in order: (label, click)
    "objects": {GROCERIES: [("bag", (405, 275)), ("bag", (475, 270)), ("bag", (545, 270)), ("bag", (610, 280)),
                            ("tail light", (97, 140)), ("tail light", (690, 140)), ("headrest", (470, 112))]},
    "project": {DOG: [("dog", (250, 250))], GROCERIES: [("bag", (405, 275)), ("bag", (475, 270))]},
}
OUT = {"objects": ROOT / "docs" / "app.jpg", "project": ROOT / "docs" / "app_project.jpg"}


def show_image(page: Page, image_id: int) -> None:
    page.wait_for_function(f"() => samApp.app.imageId === {image_id} && samApp.app.picture && "
                           f"samApp.session().loaded && samApp.app.images[{image_id}].status === 'ready'")


def segment(page: Page, label: str, point: tuple[int, int], keys: tuple[str, ...]) -> None:
    """One click, the object named, then the keys: Enter in the name field saves it and finishes the object;
    Escape leaves the field with the candidates showing (and Enter after it finishes the object)."""
    page.mouse.click(*page.evaluate(f"samApp.toClient({point[0]}, {point[1]})"))
    page.wait_for_function("""() => { const s = samApp.stateOf(samApp.currentObject());
                                       return s.result && s.layers.every(l => l.bitmap); }""")
    page.fill("#object-label", label)
    for key in keys:
        page.keyboard.press(key)


def play(page: Page, scene: str) -> None:
    objects = SCENES[scene]
    page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.session().loaded")
    if DOG not in objects:
        page.keyboard.press("ArrowRight")
    for image_id, image_objects in objects.items():
        show_image(page, image_id)
        for number, (label, point) in enumerate(image_objects):
            last = number == len(image_objects) - 1
            keys = ("Enter",) if scene == "project" else ("Escape",) if last else ("Escape", "Enter")
            segment(page, label, point, keys)
        if image_id == DOG:
            page.keyboard.press("d")  # done: the next image not done
    page.mouse.move(5, 5)
    if scene == "project":
        page.evaluate("samApp.saved()")
        page.evaluate("samApp.pollProject()")
    else:
        page.evaluate("samApp.app.stats.clicks = []")  # docs/speed.md's figures come from scripts/app_latency.py
        page.keyboard.press("h")
        page.keyboard.press("h")  # (a key press redraws the status bar)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scene", choices=sorted(SCENES), default="objects")
    parser.add_argument("--out", help="the JPEG (default: docs/app.jpg or docs/app_project.jpg)")
    args = parser.parse_args()
    out = args.out or str(OUT[args.scene])
    folder = Path(tempfile.gettempdir()) / f"sam-mlx-screenshot-{args.scene}"  # the export folder the page shows
    shutil.rmtree(folder, ignore_errors=True)
    app = start_app(str(IMAGES), "--model", str(MOBILE_SAM),
                    "--tokens-dir", str(folder / "tokens"), "--out-dir", str(folder / "sam-mlx-export"))
    try:
        for image_id in SCENES[args.scene]:
            app.wait_ready(image_id)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.goto(app.url)
            play(page, args.scene)
            page.wait_for_timeout(500)
            page.screenshot(path=out, type="jpeg", quality=76)
            browser.close()
    finally:
        app.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(out)


if __name__ == "__main__":
    main()
