"""The screenshot of `sam-mlx app` (README.md, docs/app.md): objects segmented on groceries.jpg in headless Chromium.

    python scripts/app_screenshot.py [--out docs/app.jpg]

Starts the app on ../shared/images with the shared MobileSAM, clicks one point per object, labels and finishes
each, leaves the last object's three candidates showing, and saves the page as a JPEG.
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

SHARED = ROOT.parent / "shared"
GROCERIES = 1  # ../shared/images in name order: dog, groceries, truck
OBJECTS = [("bag", (405, 275)), ("bag", (475, 270)), ("bag", (545, 270)), ("bag", (610, 280)),
           ("tail light", (97, 140)), ("tail light", (690, 140))]
LAST = ("headrest", (470, 112))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "app.jpg"))
    args = parser.parse_args()
    folder = Path(tempfile.gettempdir()) / "sam-mlx-screenshot"  # the export folder the page shows
    shutil.rmtree(folder, ignore_errors=True)
    app = start_app(str(SHARED / "images"), "--model", str(SHARED / "weights" / "mobile_sam.pt"),
                    "--tokens-dir", str(folder / "tokens"), "--out-dir", str(folder / "sam-mlx-export"))
    try:
        app.wait_ready(GROCERIES)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.goto(app.url)
            page.wait_for_function("() => window.samApp && samApp.app.picture")
            page.keyboard.press("ArrowRight")
            page.wait_for_function(f"() => samApp.app.imageId === {GROCERIES} && samApp.app.picture &&"
                                   f" samApp.app.images[{GROCERIES}].status === 'ready'")
            for number, (label, point) in enumerate([*OBJECTS, LAST]):
                page.mouse.click(*page.evaluate(f"samApp.toClient({point[0]}, {point[1]})"))
                page.wait_for_function("""() => { const s = samApp.stateOf(samApp.currentObject());
                                                   return s.result && s.layers.every(l => l.bitmap); }""")
                page.fill("#object-label", label)
                page.keyboard.press("Escape")
                if number < len(OBJECTS):
                    page.keyboard.press("Enter")
            page.mouse.move(5, 5)
            page.evaluate("samApp.app.stats.clicks = []")  # docs/speed.md's figures come from scripts/app_latency.py
            page.keyboard.press("h")
            page.keyboard.press("h")  # (a key press redraws the status bar)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, type="jpeg", quality=76)
            browser.close()
    finally:
        app.stop()
        shutil.rmtree(folder, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
