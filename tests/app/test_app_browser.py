"""The app's page in a real browser: Debian's headless Chromium driven by Playwright, against a real server.

Every request the page makes is routed through the test: anything not addressed to the app's own server is
recorded and refused, so the page is shown to work offline. The masks the page draws are read back from the
bitmaps it decoded and compared with ``SamPredictor``'s for the same prompts, and with the HTTP API's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from app_process import CHROMIUM, CHROMIUM_ARGS, served, truck_predictor
from PIL import Image
from playwright.sync_api import sync_playwright

import sam_mlx
from sam_mlx.app.masks import decode_mask

DOG, TRUCK = 0, 1
WINDOW = (500, 375)
TRUCK_BOX = ((75, 275), (1725, 850))
BACKGROUND = (1100, 500)  # the truck's side, below the window: a background point there shrinks the box's mask


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served(tmp_path_factory.mktemp("app_browser"), ready=(DOG, TRUCK)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium), as .ci/run does")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def truck():
    return truck_predictor()


def open_page(browser, app):
    """A fresh page of the app; returns (page, close) where close() checks nothing went wrong meanwhile."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    outside, errors = [], []

    def route(route):
        if route.request.url.startswith(app.base + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app.url)
    page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.app.images.length === 2")

    def close():
        context.close()
        assert not outside, f"the page reached beyond the app's server: {outside}"
        assert not errors, errors

    return page, close


@pytest.fixture
def page(browser, app):
    page, close = open_page(browser, app)
    yield page
    close()


def open_truck(page):
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => samApp.app.imageId === {TRUCK} && samApp.app.picture && "
                           f"samApp.app.picture.naturalWidth === 1800 && "
                           f"samApp.app.images[{TRUCK}].status === 'ready'")


def client_point(page, x, y):
    return page.evaluate(f"samApp.toClient({x}, {y})")


def wait_for_step(page, step):
    """Wait until the current object's prompt ``step`` is decoded and its mask drawn; return its decode request."""
    page.wait_for_function(f"""() => {{
        const object = samApp.currentObject(), state = samApp.stateOf(object);
        return object.cursor === {step} && state.result && state.layers[state.selected].bitmap; }}""")
    return page.evaluate("samApp.stateOf(samApp.currentObject()).request")


def shown_mask(page, expression="samApp.maskRuns()"):
    data = page.evaluate(expression)
    if data is None:
        return None
    values = np.arange(len(data["runs"])) % 2
    return np.repeat(values, data["runs"]).astype(bool).reshape(data["height"], data["width"])


def canvas_pixel(page, x, y):
    """The view canvas's colour at a client point (device pixels)."""
    return page.evaluate(f"""() => {{
        const canvas = document.getElementById("view"), rect = canvas.getBoundingClientRect();
        const dpr = window.devicePixelRatio || 1;
        return Array.from(canvas.getContext("2d").getImageData(
            Math.round(({x} - rect.left) * dpr), Math.round(({y} - rect.top) * dpr), 1, 1).data); }}""")


def drag(page, start, end):
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


# ---------------------------------------------------------------- tests
def test_page_loads_offline(page, app):
    """Everything the page needs comes from the app's server (the route records anything else)."""
    assert page.evaluate("samApp.app.picture.naturalWidth") == 800  # the dog, the folder's first image
    assert page.is_hidden("#notice")
    assert "tiny_vit" in page.inner_text("#model")
    assert page.evaluate("document.querySelectorAll('#images li').length") == 2
    html = (Path(sam_mlx.__file__).parent / "app" / "static" / "index.html").read_text()
    assert "http" not in html


def test_a_click_draws_the_predictors_mask(page, truck):
    open_truck(page)
    page.keyboard.press("h")  # hover off: the canvas shows only the click's mask
    x, y = client_point(page, *WINDOW)
    before = canvas_pixel(page, x, y)
    page.mouse.click(x, y)
    request = wait_for_step(page, 1)
    point = request["points"][0]
    assert request["labels"] == [1] and request["multimask"] and request["mask_input"] is None
    assert abs(point[0] - WINDOW[0]) <= 1 and abs(point[1] - WINDOW[1]) <= 1
    masks, scores, _ = truck.predict(np.array([point]), np.array([1]), multimask_output=True)
    best = int(scores.argmax())
    assert page.evaluate("samApp.stateOf(samApp.currentObject()).selected") == best
    np.testing.assert_array_equal(shown_mask(page), masks[best])
    assert canvas_pixel(page, x, y) != before  # drawn over the window
    page.keyboard.press("3")  # another candidate, by key
    page.wait_for_function("() => samApp.stateOf(samApp.currentObject()).selected === 2")
    np.testing.assert_array_equal(shown_mask(page), masks[2])


def test_a_box_and_a_background_point_change_the_mask_as_the_api_does(page, app, truck):
    open_truck(page)
    page.mouse.click(*client_point(page, *WINDOW))
    first = wait_for_step(page, 1)
    drag(page, client_point(page, *TRUCK_BOX[0]), client_point(page, *TRUCK_BOX[1]))
    second = wait_for_step(page, 2)
    box_mask = shown_mask(page)
    page.mouse.click(*client_point(page, *BACKGROUND), button="right")
    third = wait_for_step(page, 3)
    final_mask = shown_mask(page)
    assert np.abs(np.array(second["box"]) - np.array(TRUCK_BOX).ravel()).max() <= 2
    assert third["labels"] == [1, 0] and not third["multimask"] and third["mask_input"]["result"]

    # The predictor's chain: each step's hint is the previous step's selected low-res mask.
    points, box = np.array(first["points"]), np.array(second["box"])
    masks, scores, low_res = truck.predict(points, np.array([1]), multimask_output=True)
    masks, _, low_res = truck.predict(points, np.array([1]), box, low_res[[scores.argmax()]], False)
    np.testing.assert_array_equal(box_mask, masks[0])
    masks, _, _ = truck.predict(np.array(third["points"]), np.array([1, 0]), box, low_res, False)
    np.testing.assert_array_equal(final_mask, masks[0])
    assert (box_mask & ~final_mask).sum() > 1000  # the background point took part of the box's mask away

    with app.client() as client:  # the same requests, sent by another program
        for request, shown in ((second, box_mask), (third, final_mask)):
            reply = client.post("/api/decode", json=request).json()
            np.testing.assert_array_equal(decode_mask(reply["masks"][0]), shown)


def test_undo_restores_the_previous_mask(page):
    open_truck(page)
    page.mouse.click(*client_point(page, *WINDOW))
    wait_for_step(page, 1)
    window_mask = shown_mask(page)
    drag(page, client_point(page, *TRUCK_BOX[0]), client_point(page, *TRUCK_BOX[1]))
    wait_for_step(page, 2)
    box_mask = shown_mask(page)
    assert not np.array_equal(window_mask, box_mask)
    page.keyboard.press("Control+z")
    np.testing.assert_array_equal(shown_mask(page), window_mask)
    page.keyboard.press("Control+Shift+z")
    np.testing.assert_array_equal(shown_mask(page), box_mask)
    page.click("#undo")
    page.click("#undo")
    assert shown_mask(page) is None
    page.wait_for_selector("#undo:disabled")
    page.click("#redo")
    np.testing.assert_array_equal(shown_mask(page), window_mask)


def test_hover_shows_the_mask_under_the_cursor(page, truck):
    open_truck(page)
    start, end = client_point(page, 900, 700), client_point(page, *WINDOW)
    page.mouse.move(*start)
    page.mouse.move(*end, steps=15)
    page.wait_for_function("() => samApp.app.hover.shownSeq === samApp.app.hover.seq && samApp.app.hover.layer")
    x, y = page.evaluate("samApp.app.hover.sent")
    masks, scores, _ = truck.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
    np.testing.assert_array_equal(shown_mask(page, "samApp.hoverRuns()"), masks[scores.argmax()])


def test_requests_without_the_token_are_refused(page):
    statuses = page.evaluate("""async () => [
        (await fetch("/api/images")).status,
        (await fetch("/api/decode", {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify({image: 1, points: [[500, 375]], labels: [1]})})).status,
        (await fetch("/api/images", {headers: {"X-SAM-Token": sessionStorage.getItem("sam-mlx-token")}})).status]""")
    assert statuses == [403, 403, 200]
    assert "token" not in page.url  # the page took the token out of its address


def test_export_writes_the_projects_objects_and_a_new_page_shows_them(page, browser, app):
    export_formats = page.evaluate("samApp.app.info.export_formats")
    assert export_formats, "sam_mlx.io.export is missing: the app cannot export"
    open_truck(page)
    before = page.evaluate("samApp.session().objects.length") - 1  # the objects earlier tests kept, and a new one
    page.mouse.click(*client_point(page, *WINDOW))
    wait_for_step(page, 1)
    page.fill("#object-label", "window")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")  # finish: the next object
    drag(page, client_point(page, *TRUCK_BOX[0]), client_point(page, *TRUCK_BOX[1]))
    wait_for_step(page, 1)
    page.fill("#object-label", "truck")
    page.keyboard.press("Escape")
    masks = [shown_mask(page, f"samApp.maskRuns({before + i})") for i in range(2)]
    for name in export_formats:  # every format
        page.check(f"#formats input[value='{name}']")
    page.fill("#export-folder", "run1")
    page.click("#export")
    page.wait_for_function("() => samApp.app.stats.lastExport")
    result = page.evaluate("samApp.app.stats.lastExport")
    folder = app.root / "export" / "run1"
    assert Path(result["folder"]) == folder
    for name in result["files"]:
        assert (folder / name).is_file(), name
    prompts = json.loads((folder / "truck.prompts.json").read_text())
    labels = [o["label"] for o in prompts["objects"]]
    assert labels[-2:] == ["window", "truck"]  # the project's objects, in order: the export names them so
    assert prompts["image"].endswith("truck.jpg") and prompts["width"] == 1800
    for i, mask in enumerate(masks):  # the exported masks are the ones the page showed
        exported = np.array(Image.open(folder / f"truck_mask{len(labels) - 2 + i}.png")) > 127
        np.testing.assert_array_equal(exported, mask)
    coco = json.loads((folder / "coco.json").read_text())
    assert {"truck", "window"} <= {c["name"] for c in coco["categories"]}

    # A new page shows the project's objects as they were, from their stored masks (no decoding).
    again, close = open_page(browser, app)
    try:
        open_truck(again)
        again.wait_for_function(f"""() => samApp.session().objects.length === {before + 3} && samApp.session()
            .objects.slice({before}, {before + 2}).every(o => {{ const s = samApp.stateOf(o);
                return s.result && s.layers[s.selected].bitmap; }})""")
        assert again.evaluate(f"samApp.session().objects.slice({before}, {before + 2}).map(o => o.label)") == \
            ["window", "truck"]
        for i, mask in enumerate(masks):
            np.testing.assert_array_equal(shown_mask(again, f"samApp.maskRuns({before + i})"), mask)
    finally:
        close()


def test_zoom_pan_and_the_cleanup_sliders(page, truck):
    """The wheel zooms about the cursor, space-drag pans, a click then lands on the same image point; the
    clean-up sliders draw the mask the server's clean-up gives (holes filled, islands dropped)."""
    from sam_mlx.app.masks import clean_mask

    open_truck(page)
    page.keyboard.press("h")
    x, y = client_point(page, *BACKGROUND)
    scale = page.evaluate("samApp.app.view.scale")
    page.mouse.move(x, y)
    page.mouse.wheel(0, -600)
    page.wait_for_function(f"() => samApp.app.view.scale > {scale * 2}")
    assert np.allclose(client_point(page, *BACKGROUND), (x, y), atol=1)  # the point under the cursor stays
    page.keyboard.down(" ")
    drag(page, (x, y), (x - 120, y - 60))
    page.keyboard.up(" ")
    assert np.allclose(client_point(page, *BACKGROUND), (x - 120, y - 60), atol=1)
    assert page.evaluate("samApp.currentObject().cursor") == 0  # panning is not a prompt

    page.mouse.click(*client_point(page, *BACKGROUND))
    request = wait_for_step(page, 1)
    assert np.abs(np.array(request["points"][0]) - BACKGROUND).max() <= 0.5  # finer than a pixel when zoomed
    masks, scores, _ = truck.predict(np.array(request["points"]), np.array([1]), multimask_output=True)
    raw = masks[scores.argmax()]
    np.testing.assert_array_equal(shown_mask(page), raw)

    areas = page.evaluate("AREAS")
    step = areas.index(250)
    for slider in ("holes", "islands"):
        page.eval_on_selector(f"#{slider}", f"e => {{ e.value = {step}; e.dispatchEvent(new Event('input')); }}")
    assert page.inner_text("#holes-value") == "250 px" and page.inner_text("#islands-value") == "250 px"
    page.wait_for_function("""() => { const state = samApp.stateOf(samApp.currentObject());
        const clean = state.layers[state.selected].clean; return clean && clean.key === "250,250" && clean.bitmap; }""")
    want = clean_mask(raw, 250, 250)
    assert (want != raw).sum() > 100  # this mask has small holes and islands
    np.testing.assert_array_equal(shown_mask(page), want)
