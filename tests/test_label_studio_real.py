"""``sam-mlx label-studio`` connected to a real Label Studio, which asks it for masks as its page does on a click.

Label Studio runs from its own venv, named by ``SAM_MLX_LABEL_STUDIO`` (``label_studio_process.py``); ``.ci/run``
makes it. Without it the tests fail in CI (``CI=true``) and are skipped elsewhere. Label Studio starts on 127.0.0.1
with a new data folder and a preset token; a project with a SAM labelling config gets truck.jpg as an uploaded task
and the backend, which fetches the upload from Label Studio with a personal access token. Label Studio's
``/api/ml/{id}/interactive-annotating`` (what its page sends when a smart keypoint or box is drawn) asks for masks;
Label Studio's own converter (``label_studio_sdk.converter.brush.decode_rle``, in its venv) decodes them, and they
must equal ``SamPredictor``'s.
"""

from __future__ import annotations

import os
import secrets
import sys

import httpx
import numpy as np
import pytest

import label_studio_process as ls
import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from sam_mlx.checkpoints.load import load_checkpoint

WIDTH, HEIGHT = 1800, 1200  # truck.jpg
WINDOW, TYRE = (500.0, 375.0), (1380.0, 700.0)
TRUCK_BOX = (75.0, 275.0, 1725.0, 850.0)


@pytest.fixture(scope="module")
def venv_bin():
    try:
        return ls.venv_bin()
    except ls.LabelStudioMissing as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def studio(venv_bin, tmp_path_factory):
    with ls.label_studio(venv_bin, tmp_path_factory.mktemp("label_studio_data")) as (base, token, seconds):
        print(f"\nLabel Studio started in {seconds:.0f} s", file=sys.stderr)
        with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=300) as client:
            yield client


@pytest.fixture(scope="module")
def project(studio, tmp_path_factory):
    """(project id, task id, ML backend id) of truck.jpg's project, the backend connected."""
    key = ls.personal_access_token(studio)
    with ls.backend(str(studio.base_url).rstrip("/"), key, tmp_path_factory.mktemp("tokens")) as (url, _):
        yield ls.truck_project(studio, url)


@pytest.fixture(scope="module")
def truck():
    predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM))
    predictor.set_image(IMAGES / "truck.jpg")
    return predictor


def click(studio: httpx.Client, project: tuple[int, int, int], *regions: dict) -> dict:
    _, task_id, ml_id = project
    result = ls.interactive(studio, ml_id, task_id, *regions)
    assert result["type"] == "brushlabels" and result["from_name"] == "brush" and result["to_name"] == "image"
    assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
    return result


def test_a_positive_point_through_label_studio(venv_bin, studio, project, truck):
    result = click(studio, project, ls.keypoint(*WINDOW, WIDTH, HEIGHT))
    [mask] = ls.decode_with_label_studio(venv_bin, [result])
    masks, scores, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(mask, masks[best])
    assert result["score"] == pytest.approx(float(scores[best]), abs=1e-5)
    assert result["value"]["brushlabels"] == ["Car"]


def test_a_positive_and_a_negative_point_through_label_studio(venv_bin, studio, project, truck):
    """The user clicks the window, then Alt-clicks the tyre: the second request refines the first mask."""
    click(studio, project, ls.keypoint(*WINDOW, WIDTH, HEIGHT))
    result = click(studio, project, ls.keypoint(*WINDOW, WIDTH, HEIGHT),
                   ls.keypoint(*TYRE, WIDTH, HEIGHT, positive=False))
    [mask] = ls.decode_with_label_studio(venv_bin, [result])
    _, scores, low_res = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    masks, scores, _ = truck.predict(np.array([WINDOW, TYRE]), np.array([1, 0]),
                                     mask_input=low_res[[int(np.argmax(scores))]], multimask_output=False)
    assert np.array_equal(mask, masks[0])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_a_box_through_label_studio_and_stored_as_an_annotation(venv_bin, studio, project, truck):
    result = click(studio, project, ls.rectangle(TRUCK_BOX, WIDTH, HEIGHT))
    masks, scores, _ = truck.predict(box=np.array(TRUCK_BOX), multimask_output=False)
    # the user accepts the suggestion: Label Studio stores it in an annotation, and gives it back
    response = studio.post(f"/api/tasks/{project[1]}/annotations", json={"result": [result]})
    assert response.status_code == 201, response.text
    stored = studio.get(f"/api/annotations/{response.json()['id']}").json()["result"]
    returned, kept = ls.decode_with_label_studio(venv_bin, [result, *stored])
    assert np.array_equal(returned, masks[0]) and np.array_equal(kept, masks[0])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_basic_auth_set_in_label_studio(venv_bin, studio, project, truck, tmp_path_factory):
    """A backend with basic auth (and Label Studio's legacy token for the images): Label Studio connects with the
    right password only, then clicks work."""
    password, legacy_token = secrets.token_hex(8), studio.headers["Authorization"].removeprefix("Token ")
    base, tokens = str(studio.base_url).rstrip("/"), tmp_path_factory.mktemp("tokens")
    with ls.backend(base, legacy_token, tokens, BASIC_AUTH_USER="labeller", BASIC_AUTH_PASS=password) as (url, _):
        refused = ls.connect(studio, project[0], url, ("labeller", "guess"))
        assert refused.status_code == 400, refused.text
        unauthenticated = ls.connect(studio, project[0], url)
        assert unauthenticated.status_code == 400, unauthenticated.text
        accepted = ls.connect(studio, project[0], url, ("labeller", password))
        assert accepted.status_code == 201 and accepted.json()["readable_state"] == "Connected", accepted.text
        accepted = accepted.json()
        result = click(studio, (project[0], project[1], accepted["id"]), ls.keypoint(*WINDOW, WIDTH, HEIGHT))
    [mask] = ls.decode_with_label_studio(venv_bin, [result])
    masks, scores, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    assert np.array_equal(mask, masks[int(np.argmax(scores))])


def test_segment_everything_pre_annotates_a_task_through_label_studio(venv_bin, studio, tmp_path_factory):
    """The Data Manager's Retrieve Predictions on a task: Label Studio stores segment everything's masks."""
    legacy_token = studio.headers["Authorization"].removeprefix("Token ")
    base, tokens = str(studio.base_url).rstrip("/"), tmp_path_factory.mktemp("tokens")
    args = ("--segment-everything", "--everything-points", "4")
    with ls.backend(base, legacy_token, tokens, args=args) as (url, _):
        project_id, task_id, _ = ls.truck_project(studio, url)
        response = studio.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                               json={"selectedItems": {"all": False, "included": [task_id]}})
        assert response.status_code == 200, response.text
    [prediction] = studio.get("/api/predictions", params={"task": task_id}).json()
    results = prediction["result"]
    records = sam_mlx.SamAutomaticMaskGenerator(load_checkpoint(MOBILE_SAM), points_per_side=4).generate(
        IMAGES / "truck.jpg")
    assert len(results) == len(records) > 0
    assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["Car"] for r in results)
    for mask, record in zip(ls.decode_with_label_studio(venv_bin, results), records):
        assert np.array_equal(mask, record["segmentation"])
