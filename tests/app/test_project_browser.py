"""The page keeps its work in the project, in a real Chromium: objects drawn on two images survive a SIGKILL of
the server and its restart (the same objects, mask pixels and states after a reload); a second page sees the
first one's changes and never overwrites them silently; the command's export equals the page's."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import test_app_browser
from app_process import start_app
from PIL import Image

from helpers import IMAGES
from sam_mlx.app.masks import decode_mask
from sam_mlx.app.project import Project

DOG, TRUCK = 0, 1
DOG_POINTS = [(250, 250), (620, 120)]  # the dog, the background's upper right
WINDOW = (500, 375)


browser = test_app_browser.browser  # the fixture, shared


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.app.project")
    return page, errors


def open_image(page, image_id: int) -> None:
    page.evaluate(f"samApp.app.imageId !== {image_id} && document.querySelectorAll('#images li')[{image_id}].click()")
    page.wait_for_function(f"() => samApp.app.imageId === {image_id} && samApp.app.picture && "
                           f"samApp.app.images[{image_id}].status === 'ready' && samApp.session().loaded")


def click_object(page, point, label: str) -> None:
    """One click on the image, the object named, finished; waits until the project has it."""
    cursor = page.evaluate("samApp.currentObject().cursor")
    page.mouse.click(*page.evaluate(f"samApp.toClient({point[0]}, {point[1]})"))
    page.wait_for_function(f"""() => {{ const o = samApp.currentObject(), s = samApp.stateOf(o);
        return o.cursor === {cursor + 1} && s.result && s.layers[s.selected].bitmap; }}""")
    page.fill("#object-label", label)
    page.keyboard.press("Enter")  # leaves the field: the name is saved
    page.keyboard.press("Enter")  # finish: the next object
    page.evaluate("samApp.saved()")


def kept_objects(app, image_id: int) -> list[dict]:
    with app.client() as client:
        return client.get(f"/api/images/{image_id}/objects").json()["objects"]


def shown_masks(page) -> dict[str, np.ndarray]:
    """The masks the page shows for its current image's objects, by label."""
    masks = {}
    for index, label in enumerate(page.evaluate("samApp.session().objects.map(o => o.label)")):
        data = page.evaluate(f"samApp.maskRuns({index})")
        if data is not None:
            values = np.arange(len(data["runs"])) % 2
            masks[label] = np.repeat(values, data["runs"]).astype(bool).reshape(data["height"], data["width"])
    return masks


def test_work_survives_a_killed_server_and_two_pages_stay_consistent(tmp_path, browser):
    (tmp_path / "photos").mkdir()
    for name in ("dog.jpg", "truck.jpg"):
        shutil.copy(IMAGES / name, tmp_path / "photos" / name)
    arguments = (str(tmp_path / "photos"), "--out-dir", str(tmp_path / "export"),
                 "--tokens-dir", str(tmp_path / "tokens"))
    app = start_app(*arguments)
    try:
        app.wait_ready(DOG)
        app.wait_ready(TRUCK)
        page, errors = open_page(browser, app.url)
        open_image(page, DOG)
        for label, point in zip(("dog", "corner"), DOG_POINTS):
            click_object(page, point, label)
        page.click("#mark-done")  # done: the next not done, the truck
        page.wait_for_function(f"() => samApp.app.imageId === {TRUCK} && samApp.app.picture && "
                               "samApp.session().loaded")
        click_object(page, WINDOW, "window")
        click_object(page, (1100, 500), "extra")
        page.click("#objects li:has-text('extra') button")  # deleted
        page.click("#objects li:has-text('window')")
        page.keyboard.press("Control+z")  # undo, redo, another candidate: each saved
        page.evaluate("samApp.saved()")
        assert kept_objects(app, TRUCK)[0]["cursor"] == 0
        page.keyboard.press("Control+Shift+z")
        page.keyboard.press("1" if page.evaluate("samApp.stateOf(samApp.currentObject()).selected") else "2")
        page.wait_for_function("""() => { const s = samApp.stateOf(samApp.currentObject());
            return s.layers[s.selected].bitmap; }""")
        page.evaluate("samApp.saved()")
        [window] = kept_objects(app, TRUCK)
        chosen = page.evaluate("samApp.stateOf(samApp.currentObject()).selected")
        assert window["label"] == "window" and window["cursor"] == 1 and window["steps"][0]["selected"] == chosen
        truck_masks = shown_masks(page)
        np.testing.assert_array_equal(decode_mask(window["steps"][0]["mask"]), truck_masks["window"])
        open_image(page, DOG)
        dog_masks = shown_masks(page)
        assert sorted(dog_masks) == ["corner", "dog"] and list(truck_masks) == ["window"]
        assert page.inner_text("#progress") == "1 / 2 done"

        # A second page sees the first one's change; its stale write is refused, not applied.
        other, other_errors = open_page(browser, app.url)
        open_image(other, DOG)
        for label, mask in shown_masks(other).items():
            np.testing.assert_array_equal(mask, dog_masks[label])
        page.click("#objects li:has-text('corner')")
        page.fill("#object-label", "sky")
        page.press("#object-label", "Enter")  # the rename is saved
        page.evaluate("samApp.saved()")
        other.wait_for_function("() => samApp.session().objects.some(o => o.label === 'sky')", timeout=10_000)
        # A change made from an older revision (as if the second page had not seen the rename yet) is refused.
        other.evaluate("""() => { const s = samApp.session(); s.revision -= 1; s.current = 0;
            samApp.currentObject().color = "#000000";
            document.getElementById("object-color").dispatchEvent(new Event("change")); }""")
        other.evaluate("samApp.saved()")
        assert "changed in another tab" in other.inner_text("#toast")
        with app.client() as client:
            kept = client.get(f"/api/images/{DOG}/objects").json()["objects"]
        assert [(o["label"], o["color"] != "#000000") for o in kept] == [("dog", True), ("sky", True)]
        dog_masks["sky"] = dog_masks.pop("corner")
        assert not errors and not other_errors, errors + other_errors
    finally:
        if app.process.poll() is None:
            app.process.send_signal(signal.SIGKILL)  # the server dies without a word
        app.process.wait(30)

    again = start_app(*arguments)
    try:
        page.goto(again.url)  # the new run's address (its token)
        page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.session().loaded")
        open_image(page, DOG)
        shown = shown_masks(page)
        assert sorted(shown) == ["dog", "sky"]
        for label, mask in shown.items():  # pixel for pixel, drawn from the stored masks
            np.testing.assert_array_equal(mask, dog_masks[label])
        open_image(page, TRUCK)
        np.testing.assert_array_equal(shown_masks(page)["window"], truck_masks["window"])
        # Another candidate of a kept step: its prompts are decoded again for all three, the choice is kept.
        page.click("#objects li:has-text('window')")
        chosen = page.evaluate("samApp.stateOf(samApp.currentObject()).selected")
        other = 0 if chosen else 1
        page.keyboard.press(str(other + 1))
        page.wait_for_function(f"""() => {{ const s = samApp.stateOf(samApp.currentObject());
            return s.selected === {other} && s.layers.length === 3 && s.layers[{other}].bitmap; }}""")
        page.evaluate("samApp.saved()")
        assert kept_objects(again, TRUCK)[0]["steps"][0]["selected"] == other
        truck_masks = shown_masks(page)
        states = page.evaluate("Array.from(document.querySelectorAll('#images li'), li => li.dataset.state)")
        assert states == ["done", "in_progress"]
        listed = page.evaluate("Array.from(document.querySelectorAll('#images li'), li => li.innerText)")
        assert [" ".join(text.split()) for text in listed] == ["dog.jpg 2 obj · done ✓",
                                                              "truck.jpg 1 obj · in progress"]
        assert page.inner_text("#progress") == "1 / 2 done"
        page.click("#skip-image")  # the truck skipped: every image done or skipped
        page.wait_for_function("() => document.getElementById('progress').innerText === '2 / 2 done'")
        assert "every image is done or skipped" in page.inner_text("#toast")
        page.fill("#export-folder", "page")
        for name in ("png", "coco"):
            page.check(f"#formats input[value='{name}']")
        page.keyboard.press("Escape")
        page.click("#export")
        page.wait_for_function("() => samApp.app.stats.lastExport")
    finally:
        assert again.stop()[0] == 0
    project = str(tmp_path / "export" / "sam-mlx.sqlite")
    command = subprocess.run([sys.executable, "-m", "sam_mlx.cli", "export", project, "--export", "png,coco",
                              "--out-dir", str(tmp_path / "command")], capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr
    page_dir, command_dir = tmp_path / "export" / "page", tmp_path / "command"
    names = sorted(p.name for p in command_dir.iterdir())
    assert names == sorted(p.name for p in page_dir.iterdir() if p.name != ".sam-mlx-app-export.json")
    assert {"dog_mask0.png", "dog_mask1.png", "truck_mask0.png", "coco.json"} <= set(names)
    for name in names:
        if name != "coco.json":
            assert (page_dir / name).read_bytes() == (command_dir / name).read_bytes(), name
    coco = [json.loads((folder / "coco.json").read_text()) for folder in (page_dir, command_dir)]
    for dataset in coco:
        dataset.pop("info")  # its date
    assert coco[0] == coco[1] and len(coco[0]["annotations"]) == 3
    np.testing.assert_array_equal(np.array(Image.open(command_dir / "dog_mask0.png")) > 127, dog_masks["dog"])

    # An exported .prompts.json can still be imported: a new project's page decodes it again and keeps it.
    fresh = start_app(*arguments, "--project", str(tmp_path / "fresh.sqlite"))
    try:
        fresh.wait_ready(TRUCK)
        page.goto(fresh.url)
        page.wait_for_function("() => window.samApp && samApp.app.picture && samApp.session().loaded")
        page.fill("#export-folder", "page")
        page.keyboard.press("Escape")
        open_image(page, TRUCK)
        page.wait_for_function("""() => samApp.session().objects.length === 2 && samApp.session().objects[0].id""")
        page.evaluate("samApp.saved()")
        np.testing.assert_array_equal(shown_masks(page)["window"], truck_masks["window"])
    finally:
        assert fresh.stop()[0] == 0
    with Project(tmp_path / "fresh.sqlite") as imported:
        [(kept, mask)] = imported.masks(imported.find_image(tmp_path / "photos" / "truck.jpg"))
        assert kept["label"] == "window"
        np.testing.assert_array_equal(mask, truck_masks["window"])
