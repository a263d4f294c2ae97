"""The app's frictions of issue 31, in a real browser against a real server (as ``test_app_browser``): the page
without its token, the scores' meaning, a lone background point, the outline of a mask with holes, no 404s."""

from __future__ import annotations

import numpy as np
import pytest
import test_app_browser
from app_process import served
from test_app_browser import BACKGROUND, TRUCK, WINDOW, client_point, open_page, open_truck, shown_mask, wait_for_step

from sam_mlx.app.masks import encode_mask
from sam_mlx.io.export import mask_polygons

DOG = 0
browser, truck = test_app_browser.browser, test_app_browser.truck  # the fixtures, shared


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served(tmp_path_factory.mktemp("app_frictions"), ready=(DOG, TRUCK)) as running:
        yield running


@pytest.fixture
def page(browser, app):
    page, close = open_page(browser, app)
    yield page
    close()


def notice_of(browser, address):
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(address)
        page.wait_for_selector("#notice:not([hidden])")
        return page.inner_text("#notice")
    finally:
        context.close()


def test_without_or_with_a_wrong_token_the_page_asks_for_the_printed_address(browser, app):
    missing = notice_of(browser, app.base + "/")
    wrong = notice_of(browser, app.base + "/#token=not-the-token")
    for text in (missing, wrong):
        assert "No images" not in text
        assert "address sam-mlx app printed" in text and "#token=" in text
    assert "needs its access token" in missing
    assert "not this run's" in wrong


def test_scores_are_labelled_as_predicted_iou(page, app):
    open_truck(page)
    page.keyboard.press("h")
    page.mouse.click(*client_point(page, *WINDOW))
    wait_for_step(page, 1)
    scores = page.evaluate("samApp.stateOf(samApp.currentObject()).result.scores")
    page.wait_for_function("() => document.querySelectorAll('#candidates .candidate').length === 3")
    cards = page.query_selector_all("#candidates .candidate")
    for i, (card, score) in enumerate(zip(cards, scores)):
        assert "predicted IoU" in card.get_attribute("title") and "exceed 1" in card.get_attribute("title")
        assert card.inner_text().split() == [str(i + 1), "IoU", f"{score:.3f}"]
    detail = page.query_selector("#objects li.current .muted")
    selected = page.evaluate("samApp.stateOf(samApp.currentObject()).selected")
    assert detail.inner_text() == f"IoU {scores[selected]:.2f}"
    assert "predicted IoU" in detail.get_attribute("title")

    # The outline drawn over the current object is the mask's boundary, as the API traces it (friction 7).
    page.wait_for_function("""() => { const s = samApp.stateOf(samApp.currentObject());
        const layer = s.layers[s.selected]; return layer.polygons && layer.polygons.points.length; }""")
    drawn, encoded, simplify = page.evaluate("""() => { const s = samApp.stateOf(samApp.currentObject());
        const layer = s.layers[s.selected];
        return [layer.polygons.points, layer.encoded, samApp.app.cleanup.simplify]; }""")
    with app.client() as client:
        reply = client.post("/api/polygons", json={"mask": encoded, "simplify": simplify, "image": TRUCK}).json()
    assert drawn == reply["rings"]


def test_a_lone_background_point_waits_for_a_foreground_point(page, truck):
    open_truck(page)
    page.keyboard.press("h")
    decodes = []
    page.on("request", lambda request: decodes.append(request) if request.url.endswith("/api/decode") else None)
    page.mouse.click(*client_point(page, *BACKGROUND), button="right")
    page.wait_for_function("""() => document.getElementById("candidates").innerText
                              .includes("add a foreground point first")""")
    state = page.evaluate("samApp.stateOf(samApp.currentObject())")
    assert [p[2] for p in state["points"]] == [0] and state["result"] is None  # kept, not decoded
    assert page.evaluate("samApp.currentObject().cursor") == 1 and shown_mask(page) is None
    assert "foreground point first" in page.inner_text("#toast")

    page.mouse.click(*client_point(page, *WINDOW))
    request = wait_for_step(page, 2)
    assert len(decodes) == 1  # only the foreground point's prompt was decoded, with the background point
    assert request["labels"] == [0, 1] and not request["multimask"] and request["mask_input"] is None
    masks, _, _ = truck.predict(np.array(request["points"]), np.array([0, 1]), multimask_output=False)
    np.testing.assert_array_equal(shown_mask(page), masks[0])


def test_expected_absences_are_not_errors(browser, app):
    """No saved prompts is a 204 the page expects: a session opening both images logs no error and no 4xx."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console, failed, prompts = [], [], []
    page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
    page.on("response", lambda response: failed.append((response.status, response.url))
            if response.status >= 400 else None)
    page.on("response", lambda response: prompts.append(response.status) if "/prompts" in response.url else None)
    try:
        page.goto(app.url)
        page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.app.images.length === 2")
        open_truck(page)
        kept = page.evaluate("samApp.pollProject().then(() => samApp.app.project.images.map(i => i.objects))")
        looking = sum(count == 0 for count in kept)  # an image with objects in the project looks for no prompts
        for _ in range(100):  # the images without kept objects looked for their saved prompts
            if len(prompts) == looking:
                break
            page.wait_for_timeout(100)
        assert looking and prompts == [204] * looking
        assert not failed and not console, (failed, console)
    finally:
        context.close()
    with app.client() as client:
        assert client.get(f"/api/images/{TRUCK}/prompts").status_code == 204


# ---------------------------------------------------------------- the outline's rings (friction 7)
def unit_edges(rings):
    """Every unit pixel edge of axis-aligned rings: (x, y, horizontal)."""
    for ring in rings:
        ring = np.asarray(ring, dtype=np.int64)
        for (ax, ay), (bx, by) in zip(ring, np.roll(ring, -1, axis=0)):
            assert ax == bx or ay == by, f"a diagonal segment {ax, ay} -> {bx, by}"
            if ay == by:
                yield from ((x, ay, True) for x in range(min(ax, bx), max(ax, bx)))
            else:
                yield from ((ax, y, False) for y in range(min(ay, by), max(ay, by)))


def inner_edges(mask, rings):
    """The unit edges of the rings with the mask (or its outside) on both sides: the cuts."""
    padded = np.pad(mask, 1)  # padded[y + 1, x + 1] is pixel (x, y)
    cuts = []
    for x, y, horizontal in unit_edges(rings):
        sides = (padded[y, x + 1], padded[y + 1, x + 1]) if horizontal else (padded[y + 1, x], padded[y + 1, x + 1])
        if sides[0] == sides[1]:
            cuts.append((x, y))
    return cuts


def even_odd(rings, shape):
    """The pixels whose centres are inside the rings by the even-odd rule (a ray to the right)."""
    ys, xs = np.mgrid[:shape[0], :shape[1]] + 0.5
    inside = np.zeros(shape, bool)
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64)
        for (ax, ay), (bx, by) in zip(ring, np.roll(ring, -1, axis=0)):
            if ax == bx:
                inside ^= (np.minimum(ay, by) < ys) & (ys < np.maximum(ay, by)) & (ax > xs)
    return inside


def test_the_outline_of_a_mask_with_holes_is_its_boundary(app):
    mask = np.zeros((40, 50), bool)
    mask[5:35, 5:45] = True
    mask[10:30, 10:25] = False  # a hole
    mask[15:20, 15:20] = True  # an island in it
    mask[12:14, 35:38] = False  # a second hole
    mask[35:37, 45:47] = True  # touching the first part at a corner: the same 8-connected part
    mask[0:2, 48:50] = True  # a part of its own
    assert inner_edges(mask, mask_polygons(mask, 0.0)), "the export's polygons are cut through the holes"
    with app.client() as client:
        reply = client.post("/api/polygons", json={"mask": encode_mask(mask, "png"), "simplify": 0}).json()
    rings = reply["rings"]
    assert len(rings) == 5  # the outsides of 3 parts, the edges of 2 holes
    assert inner_edges(mask, rings) == []
    np.testing.assert_array_equal(even_odd(rings, mask.shape), mask)
    assert reply["polygons"] and reply["vertices"] == sum(len(p) for p in reply["polygons"])  # the export's, as before
