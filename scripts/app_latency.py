"""How fast `sam-mlx app` answers in a real browser: click to mask drawn, hover masks per second, the server's
own time per decode, and `SamPredictor.predict` on the same prompts in this process, in one run.

    python scripts/app_latency.py [--model ../shared/weights/mobile_sam.pt] [--image ../shared/images/truck.jpg]
                                  [--before /tmp/main-before]

``--before TREE``: also run the app of another sam_mlx source tree (e.g. ``git worktree add --detach
/tmp/main-before main``) in the same run, each sizing's two apps one after the other, to compare code against code.

For each sizing (original, stretch 512) it starts `sam-mlx app` as a subprocess, opens the page in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright) and alternates rounds of clicks in the browser with
rounds of `SamPredictor.predict` calls here on the same points, so the machine's slow spells fall on both.
Where a click's time goes: the click until the page sends its request (``sent``), the page's request until its
answer is parsed (``answer``: the server's time plus the HTTP round trip), the server's own time (``server``: its
``predict``, then the masks' PNG encoding ``encode`` when the server reports it, then JSON), the PNG decoded by the
browser and the mask drawn. A click is a lone foreground point on an empty object (3 candidates, no hint), the
app's first click on an object. Click to drawn is timed by the page: from the pointerup event to the mask drawn
into the canvas (which the browser shows at its next frame, as for any page; pages before 2026-12-07 timed to that
frame). The server reports its decode time (the predict call inside it) and its whole time per request.
Hover: the pointer sweeps the image for a few seconds, moving once per animation frame; masks/s counts the hover
masks drawn (the server drops the positions it has not started when a newer one arrives).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "app")]  # app_process and the helpers it imports

from app_process import CHROMIUM, CHROMIUM_ARGS, start_app  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

import sam_mlx  # noqa: E402  (OpenBLAS before mlx)
from helpers import SHARED  # noqa: E402  (../shared, or $SAM_MLX_SHARED)

POINTS = [(500, 375), (1100, 500), (1350, 900), (300, 880), (900, 250), (1560, 640)]  # on truck.jpg's 1800 x 1200
# A pointer moving over the image once per animation frame (~60 per second), dispatched in the page: the
# input a mouse gives, without a round trip to Playwright per move.
HOVER_SWEEP = """async ([seconds, width, height]) => {
    const canvas = document.getElementById("view"), start = performance.now();
    let moves = 0;
    while (performance.now() - start < seconds * 1000) {
        await new Promise((resolve) => requestAnimationFrame(resolve));
        const [x, y] = samApp.toClient(width * (0.5 + 0.35 * Math.cos(moves / 90)),
                                       height * (0.5 + 0.3 * Math.sin(moves / 60)));
        canvas.dispatchEvent(new PointerEvent("pointermove", {clientX: x, clientY: y, bubbles: true}));
        moves++;
    }
    return moves;
}"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(model: str, image: Path, sizing: list[str], rounds: int, hover_seconds: float, browser,
            tree: Path | None = None) -> dict:
    """One app (of ``tree``'s sam_mlx if given, else this one) measured at one sizing."""
    folder = Path(tempfile.mkdtemp(prefix="sam_mlx_app_latency_"))
    # The app runs from the temporary folder with its tree first on the path (``python -m`` would import the
    # current folder's sam_mlx before PYTHONPATH's): this tree's, or ``tree``'s.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree or ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        app = start_app(str(image), "--model", model, *sizing, "--tokens-dir", str(folder / "tokens"),
                        "--out-dir", str(folder / "out"), env=env, cwd=folder)
        try:
            return {"app": str(tree) if tree else "this tree",
                    **_measure(app, model, image, sizing, rounds, hover_seconds, browser)}
        finally:
            app.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure(app, model, image, sizing, rounds, hover_seconds, browser) -> dict:
    app.wait_ready(0)
    size = None if not sizing else int(sizing[sizing.index("--size") + 1])
    predictor = sam_mlx.SamPredictor(sam_mlx.load(model), sizing="stretch" if sizing else "original", size=size)
    predictor.set_image(image)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(app.url)
    page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.app.images[0].status === 'ready'")
    page.keyboard.press("h")  # hover off while clicking
    width, height = page.evaluate("[samApp.app.picture.naturalWidth, samApp.app.picture.naturalHeight]")
    points = [(x * width / 1800, y * height / 1200) for x, y in POINTS]
    direct = []
    for _ in range(rounds):
        for x, y in points:  # the browser
            page.keyboard.press("Escape")  # an empty object: the click is a first click
            count = page.evaluate("samApp.app.stats.clicks.length")
            page.mouse.click(*page.evaluate(f"samApp.toClient({x}, {y})"))
            page.wait_for_function(f"() => samApp.app.stats.clicks.length > {count}")
            time.sleep(0.15)  # let the page settle (candidate thumbnails) before the next click
        for x, y in points:  # SamPredictor here, the same prompts
            start = time.perf_counter()
            predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            direct.append((time.perf_counter() - start) * 1e3)
    clicks = page.evaluate("samApp.app.stats.clicks")

    page.keyboard.press("Escape")
    page.keyboard.press("h")  # hover on
    hover_start = page.evaluate("performance.now()")
    moves = page.evaluate(HOVER_SWEEP, [hover_seconds, width, height])
    hover_end = page.evaluate("performance.now()")
    shown = page.evaluate(f"samApp.app.stats.hoverTimes.filter(t => t >= {hover_start}).length")
    dropped = page.evaluate("fetch('/api/info', {headers: {'X-SAM-Token': sessionStorage.getItem('sam-mlx-token')}})"
                            ".then(r => r.json()).then(i => i.hovers_dropped)")
    page.close()
    latencies = [c["latency_ms"] for c in clicks]
    server = [c["server_ms"] for c in clicks]
    decode = [c["decode_ms"] for c in clicks]
    encode = [c["encode_ms"] for c in clicks if c.get("encode_ms") is not None]
    return {
        "sizing": " ".join(sizing) or "original", "clicks": len(clicks),
        "click_to_drawn_median_ms": statistics.median(latencies), "click_to_drawn_p95_ms": percentile(latencies, 95),
        "server_median_ms": statistics.median(server), "server_decode_median_ms": statistics.median(decode),
        "server_encode_median_ms": statistics.median(encode) if encode else None,
        "predict_median_ms": statistics.median(direct), "predict_p95_ms": percentile(direct, 95),
        "hover_masks_per_s": shown / ((hover_end - hover_start) / 1e3), "hover_pointer_moves": moves,
        "hover_positions_dropped": dropped,
        # where a click's time goes in the page: until the request is sent (older pages do not say), until the
        # answer is parsed, the PNG decoded, the mask drawn
        **{f"page_{k}_median_ms": statistics.median(c[k] for c in clicks) if k in clicks[0] else None
           for k in ("sent_ms", "answer_ms", "png_ms", "draw_ms")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "weights" / "mobile_sam.pt"))
    parser.add_argument("--image", default=str(SHARED / "images" / "truck.jpg"))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 6 clicks (default: 5)")
    parser.add_argument("--hover-seconds", type=float, default=8.0)
    parser.add_argument("--before", type=Path, help="also measure the app of this sam_mlx source tree, same run")
    args = parser.parse_args()
    trees = [args.before.resolve(), None] if args.before else [None]
    results = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for sizing in ([], ["--sizing", "stretch", "--size", "512"]):
            for tree in trees:
                results.append(measure(args.model, Path(args.image), sizing, args.rounds, args.hover_seconds, browser,
                                       tree))
                print(json.dumps(results[-1]), file=sys.stderr)
        browser.close()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    print(f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores: python scripts/app_latency.py "
          + " ".join(sys.argv[1:]))
    print("| app | sizing | click to mask drawn, median (p95) | `SamPredictor.predict` alone, median (p95) "
          "| click to request sent | the page's request (server: its predict + masks' encoding) | PNG read + drawn "
          "| hover masks/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        encode = "" if r["server_encode_median_ms"] is None else f" + {r['server_encode_median_ms']:.1f}"
        print(f"| {r['app']} | {r['sizing']} | {r['click_to_drawn_median_ms']:.0f} ms "
              f"({r['click_to_drawn_p95_ms']:.0f} ms) | "
              f"{r['predict_median_ms']:.1f} ms ({r['predict_p95_ms']:.1f} ms) | "
              f"{'' if r['page_sent_ms_median_ms'] is None else format(r['page_sent_ms_median_ms'], '.1f') + ' ms'} | "
              f"{r['page_answer_ms_median_ms']:.1f} ms ({r['server_median_ms']:.1f} ms: "
              f"{r['server_decode_median_ms']:.1f}{encode} ms) | "
              f"{r['page_png_ms_median_ms']:.1f} + {r['page_draw_ms_median_ms']:.1f} ms | "
              f"{r['hover_masks_per_s']:.1f} |")


if __name__ == "__main__":
    main()
