"""The screenshot of `sam-mlx app`'s image list with each image's state, kept in its project: docs/app_project.jpg.

    python scripts/app_project_screenshot.py [--out docs/app_project.jpg]

Starts the app on ../shared/images (dog, groceries, truck) with the shared MobileSAM and a new project, segments
the dog and marks it done (Done → next opens the groceries), segments two bags there, and saves the page (the top
bar's progress, the image list with states and object counts) as a JPEG.
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
from playwright.sync_api import sync_playwright  # noqa: E402

from helpers import IMAGES, MOBILE_SAM  # noqa: E402

DOG, GROCERIES = 0, 1  # ../shared/images in name order: dog, groceries, truck
OBJECTS = {DOG: [("dog", (250, 250))], GROCERIES: [("bag", (405, 275)), ("bag", (475, 270))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "app_project.jpg"))
    args = parser.parse_args()
    folder = Path(tempfile.gettempdir()) / "sam-mlx-project-screenshot"  # the export folder the page shows
    shutil.rmtree(folder, ignore_errors=True)
    app = start_app(str(IMAGES), "--model", str(MOBILE_SAM),
                    "--tokens-dir", str(folder / "tokens"), "--out-dir", str(folder / "sam-mlx-export"))
    try:
        app.wait_ready(DOG)
        app.wait_ready(GROCERIES)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.goto(app.url)
            page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.session().loaded")
            for image_id, objects in OBJECTS.items():
                page.wait_for_function(f"() => samApp.app.imageId === {image_id} && samApp.app.picture && "
                                       f"samApp.session().loaded && samApp.app.images[{image_id}].status === 'ready'")
                for label, point in objects:
                    page.mouse.click(*page.evaluate(f"samApp.toClient({point[0]}, {point[1]})"))
                    page.wait_for_function("""() => { const s = samApp.stateOf(samApp.currentObject());
                                                       return s.result && s.layers.every(l => l.bitmap); }""")
                    page.fill("#object-label", label)
                    page.keyboard.press("Enter")  # the name saved, the object finished
                if image_id == DOG:
                    page.keyboard.press("d")  # done: the next image not done
            page.evaluate("samApp.saved()")
            page.evaluate("samApp.pollProject()")
            page.mouse.move(5, 5)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, type="jpeg", quality=76)
            browser.close()
    finally:
        app.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
