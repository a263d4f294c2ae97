"""The Label Studio ML backend (``sam_mlx.label_studio``) against its protocol, in this process.

Masks are checked equal to ``SamPredictor``'s (MobileSAM, truck.jpg) after a round trip through the brush RLE;
the security rules and the errors against crafted requests; image fetching against a local HTTP server standing in
for Label Studio. ``test_label_studio_real.py`` runs the same clicks through a real Label Studio.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from label_studio_process import SAM_CONFIG as CONFIG
from sam_mlx.checkpoints.load import load_checkpoint
from sam_mlx.io.cache import TOKENS_NAME
from sam_mlx.io.images import load_image
from sam_mlx.label_studio.backend import SamBackend
from sam_mlx.label_studio.config import parse_label_config
from sam_mlx.label_studio.images import ImageAccessError, ImageSource
from sam_mlx.label_studio.prompts import parse_click
from sam_mlx.label_studio.rle import LENGTH_BITS, decode_brush, encode_brush
from sam_mlx.label_studio.server import create_app

WIDTH, HEIGHT = 1800, 1200  # truck.jpg
WINDOW, TYRE = (500.0, 375.0), (1380.0, 700.0)
TRUCK_BOX = (75.0, 275.0, 1725.0, 850.0)
TASK = {"id": 7, "data": {"image": "/data/local-files/?d=truck.jpg"}}


def keypoint(x: float, y: float, positive: bool = True, label: str = "Car") -> dict:
    """A smart keypoint as Label Studio sends it (percent of the image)."""
    return {"id": f"k{x:g}", "type": "keypointlabels", "from_name": "point", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT, "is_positive": positive,
            "value": {"x": x / WIDTH * 100, "y": y / HEIGHT * 100, "width": 0.5, "keypointlabels": [label]}}


def rectangle(x1: float, y1: float, x2: float, y2: float) -> dict:
    return {"id": "r1", "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT,
            "value": {"x": x1 / WIDTH * 100, "y": y1 / HEIGHT * 100, "width": (x2 - x1) / WIDTH * 100,
                      "height": (y2 - y1) / HEIGHT * 100, "rotation": 0, "rectanglelabels": ["Car"]}}


def predict_body(*regions: dict, task: dict = TASK) -> dict:
    return {"tasks": [task], "project": "3.1700000000", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": {"result": list(regions)}}}


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MOBILE_SAM)


@pytest.fixture(scope="module")
def truck(model):
    predictor = sam_mlx.SamPredictor(model)
    predictor.set_image(IMAGES / "truck.jpg")
    return predictor


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_studio")
    (root / "photos").mkdir()
    shutil.copy(IMAGES / "truck.jpg", root / "photos" / "truck.jpg")
    (root / "secret.jpg").write_bytes((IMAGES / "dog.jpg").read_bytes())
    return root


@pytest.fixture(scope="module")
def backend(model, photos):
    backend = SamBackend(model, ImageSource(document_root=photos / "photos"), photos / "tokens")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(backend), base_url="http://127.0.0.1:9090") as client:
        yield client


def brush_of(response) -> tuple[np.ndarray, dict]:
    """The one brushlabels result of an interactive answer, decoded, and the result itself."""
    assert response.status_code == 200, response.text
    predictions = response.json()["results"]
    assert len(predictions) == 1 and len(predictions[0]["result"]) == 1
    result = predictions[0]["result"][0]
    assert result["type"] == "brushlabels" and result["value"]["format"] == "rle"
    assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
    return decode_brush(result["value"]["rle"], WIDTH, HEIGHT), result


# ---------------------------------------------------------------- brush RLE
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 61), (480, 640)])
def test_brush_rle_round_trips_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = rng.random(shape) < density
        assert np.array_equal(decode_brush(encode_brush(mask), shape[1], shape[0]), mask), density


def test_brush_rle_runs_at_the_length_field_limits():
    """Runs just under, at and over each field's longest run, and runs split into several chunks."""
    longest_pixels = [(1 << bits) // 4 for bits in LENGTH_BITS]  # 4 values (RGBA) per pixel
    for pixels in [p + d for p in longest_pixels for d in (-1, 0, 1)] + [3 * longest_pixels[-1] + 5]:
        mask = np.zeros((1, 2 * pixels + 3), dtype=bool)
        mask[0, pixels : 2 * pixels] = True
        assert np.array_equal(decode_brush(encode_brush(mask), mask.shape[1], 1), mask), pixels


def test_brush_rle_header_and_values_follow_the_format():
    """The header by hand: 32-bit value count (RGBA), word size - 1, the four length widths - 1; 255 inside."""
    mask = np.array([[False, True, True]])
    bits = "".join(f"{byte:08b}" for byte in encode_brush(mask))
    assert int(bits[:32], 2) == 3 * 4
    assert int(bits[32:37], 2) == 8 - 1
    assert [int(bits[37 + 4 * i : 41 + 4 * i], 2) + 1 for i in range(4)] == list(LENGTH_BITS)
    # first chunk: repeat, width index 0, length 4 - 1 in LENGTH_BITS[0] bits, value 0; then 8 values of 255
    first = 53
    assert bits[first : first + 3] == "100"
    assert int(bits[first + 3 : first + 3 + LENGTH_BITS[0]], 2) == 3
    assert int(bits[first + 3 + LENGTH_BITS[0] : first + 11 + LENGTH_BITS[0]], 2) == 0
    second = first + 11 + LENGTH_BITS[0]
    assert int(bits[second + 3 : second + 3 + LENGTH_BITS[0]], 2) == 7
    assert int(bits[second + 3 + LENGTH_BITS[0] : second + 11 + LENGTH_BITS[0]], 2) == 255


def test_brush_rle_errors_name_the_problem():
    with pytest.raises(ValueError, match="H x W"):
        encode_brush(np.zeros((2, 2, 2), dtype=bool))
    rle = encode_brush(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="4x5 RGBA image"):
        decode_brush(rle, 4, 5)
    with pytest.raises(ValueError, match="ends early"):
        decode_brush(rle[:8], 4, 4)


# ---------------------------------------------------------------- labelling config and clicks
def test_setup_parses_the_labelling_config(client, backend):
    response = client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG, "hostname": "x",
                                           "access_token": "y", "extra_params": None})
    assert response.status_code == 200
    answer = response.json()
    assert answer["model_version"] == backend.model_version
    assert answer["images"] == {"image": "image"}
    assert answer["controls"] == [
        {"type": "brushlabels", "name": "brush", "to_name": "image", "labels": ["Car", "Sky"]},
        {"type": "keypointlabels", "name": "point", "to_name": "image", "labels": ["Car", "Sky"]},
        {"type": "rectanglelabels", "name": "box", "to_name": "image", "labels": ["Car"]},
    ]
    assert backend.configs["3"].brush_for("image").name == "brush"


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='image' value='$image'/>", "not well-formed"),
    ("<View><BrushLabels name='b' toName='image'/></View>", "no <Image"),
    ("<View><Image name='image' value='$image'/><KeyPointLabels name='k' toName='image'/></View>", "no <BrushLabels"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='b' toName='other'/></View>", "no <BrushLabels"),
    ("<View><Image name='image' value='image'/><BrushLabels name='b' toName='image'/></View>", "value=\"\\$field\""),
    ("<View><Image name='image' value='$image'/><BrushLabels name='b'/></View>", "toName"),
    ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "DTD"),
])
def test_bad_labelling_configs_are_refused_with_the_reason(xml, message):
    with pytest.raises(ValueError, match=message):
        parse_label_config(xml)


def test_clicks_read_positive_and_negative_points_and_rotated_boxes():
    config = parse_label_config(CONFIG.replace('<Label value="Sky"/></KeyPointLabels>',
                                               '<Label value="Sky"/><Label value="Negative"/></KeyPointLabels>'))
    click = parse_click({"result": [keypoint(*WINDOW), keypoint(*TYRE, positive=False),
                                    keypoint(10, 20, label="Negative")]}, config)
    points, labels, box = click.in_pixels(WIDTH, HEIGHT)
    np.testing.assert_allclose(points, [WINDOW, TYRE, (10, 20)])
    assert labels.tolist() == [1, 0, 0] and box is None and click.label == "Car"
    turned = rectangle(100, 100, 300, 200)
    turned["value"]["rotation"] = 90  # clockwise about the top-left corner: x from 0 to -100 px, y from 100 to 300
    _, _, box = parse_click({"result": [turned]}, config).in_pixels(WIDTH, HEIGHT)
    np.testing.assert_allclose(box, [0, 100, 100, 300], atol=1e-9)
    with pytest.raises(ValueError, match="only negative points"):
        parse_click({"result": [keypoint(*TYRE, positive=False)]}, config)
    with pytest.raises(ValueError, match=r"context.result\[0\].value.x must be a number"):
        parse_click({"result": [{**keypoint(*TYRE), "value": {"y": 3}}]}, config)
    with pytest.raises(ValueError, match="to_name 'elsewhere'"):
        parse_click({"result": [{**keypoint(*TYRE), "to_name": "elsewhere"}]}, config)


# ---------------------------------------------------------------- interactive predictions equal SamPredictor's
def test_a_positive_point_gives_the_predictors_best_mask(client, truck):
    mask, result = brush_of(client.post("/predict", json=predict_body(keypoint(*WINDOW))))
    masks, scores, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(mask, masks[best])
    assert result["score"] == pytest.approx(float(scores[best]), abs=1e-5)
    assert result["value"]["brushlabels"] == ["Car"] and result["from_name"] == "brush"
    assert result["to_name"] == "image"


def test_adding_a_negative_point_refines_the_same_object_with_its_last_mask(client, truck):
    """The second request holds the first one's point: the first mask's low-res logits are its hint."""
    brush_of(client.post("/predict", json=predict_body(keypoint(*WINDOW))))
    mask, result = brush_of(client.post("/predict", json=predict_body(keypoint(*WINDOW),
                                                                      keypoint(*TYRE, positive=False))))
    _, scores, low_res = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    hint = low_res[[int(np.argmax(scores))]]
    masks, scores, _ = truck.predict(np.array([WINDOW, TYRE]), np.array([1, 0]), mask_input=hint,
                                     multimask_output=False)
    assert np.array_equal(mask, masks[0])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_points_of_another_object_get_no_hint(client, truck):
    brush_of(client.post("/predict", json=predict_body(keypoint(*WINDOW))))
    mask, _ = brush_of(client.post("/predict", json=predict_body(keypoint(*TYRE), keypoint(300, 500))))
    masks, _, _ = truck.predict(np.array([TYRE, (300, 500)]), np.array([1, 1]), multimask_output=False)
    assert np.array_equal(mask, masks[0])


def test_a_box_gives_the_predictors_mask(client, truck):
    mask, result = brush_of(client.post("/predict", json=predict_body(rectangle(*TRUCK_BOX))))
    masks, scores, _ = truck.predict(box=np.array(TRUCK_BOX), multimask_output=False)
    assert np.array_equal(mask, masks[0]) and mask.sum() > 100_000
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_a_label_missing_from_the_brush_tag_gets_the_brush_tags_first(client):
    config = CONFIG.replace('<Label value="Sky"/></KeyPointLabels>', '<Label value="Wheel"/></KeyPointLabels>')
    body = {**predict_body(keypoint(*TYRE, label="Wheel")), "label_config": config}
    _, result = brush_of(client.post("/predict", json=body))
    assert result["value"]["brushlabels"] == ["Car"]


# ---------------------------------------------------------------- images and their tokens
def test_a_task_without_context_encodes_its_image_ahead_and_keeps_its_tokens(model, photos, tmp_path):
    shutil.copy(IMAGES / "dog.jpg", photos / "photos" / "dog.jpg")
    source = ImageSource(document_root=photos / "photos")
    backend = SamBackend(model, source, tmp_path / "tokens")
    task = {"id": 1, "data": {"image": "/data/local-files/?d=dog.jpg"}}
    try:
        with TestClient(create_app(backend), base_url="http://localhost:9090") as client:
            response = client.post("/predict", json={"tasks": [task], "project": "3.1", "label_config": CONFIG})
            assert response.status_code == 200 and response.json() == {"results": []}
            backend._warmups.submit(lambda: None).result(timeout=300)  # the warm-up queued before this one is done
        files = list((tmp_path / "tokens").iterdir())
        digest = hashlib.sha256((IMAGES / "dog.jpg").read_bytes()).hexdigest()[:32]
        assert len(files) == 1 and TOKENS_NAME.fullmatch(files[0].name) and files[0].name.startswith(digest)
    finally:
        backend.close()
    # another run reads the image (its digest names the file) and opens it from its tokens file, not the encoder
    messages: list[str] = []
    later = SamBackend(model, source, tmp_path / "tokens", log=messages.append)
    try:
        predictor, _ = later._predictor(task["data"]["image"], 1)
        assert predictor.original_size == load_image(IMAGES / "dog.jpg").shape[:2]
        assert not any("encoded" in m for m in messages)
        assert (tmp_path / "tokens").iterdir().__next__() == files[0]
    finally:
        later.close()


def test_local_files_stay_inside_the_document_root(photos):
    source = ImageSource(document_root=photos / "photos")
    assert source.fetch("/data/local-files/?d=truck.jpg") == (IMAGES / "truck.jpg").read_bytes()
    for escape in ("../secret.jpg", "/../secret.jpg", "..%2Fsecret.jpg"):
        with pytest.raises(ImageAccessError, match="outside the document root|no file"):
            source.fetch(f"/data/local-files/?d={escape}")
    (photos / "photos" / "link.jpg").unlink(missing_ok=True)
    (photos / "photos" / "link.jpg").symlink_to(photos / "secret.jpg")
    with pytest.raises(ImageAccessError, match="outside the document root"):
        source.fetch("/data/local-files/?d=link.jpg")
    with pytest.raises(ImageAccessError, match="LABEL_STUDIO_URL"):
        source.fetch("/data/upload/1/truck.jpg")
    with pytest.raises(ImageAccessError, match="not an image reference"):
        source.fetch("file:///etc/passwd")


def fake_jwt(claims: dict) -> str:
    """An unsigned JWT with these claims (the backend reads only their type and expiry; Label Studio checks)."""
    header, payload = (base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
                       for part in ({"alg": "HS256", "typ": "JWT"}, claims))
    return f"{header}.{payload}.signature"


PERSONAL_TOKEN = fake_jwt({"token_type": "refresh", "user_id": "1"})
ACCESS_TOKEN = fake_jwt({"token_type": "access", "exp": 4_000_000_000, "user_id": "1"})


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Serves truck.jpg at /data/upload/1/truck.jpg to ``Token good`` or ``Bearer ACCESS_TOKEN``, which
    /api/token/refresh/ gives for PERSONAL_TOKEN; redirects /away to another host."""

    seen: list[tuple[str, str | None]] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, body.get("refresh")))
        good = self.path == "/api/token/refresh/" and body.get("refresh") == PERSONAL_TOKEN
        data = json.dumps({"access": ACCESS_TOKEN} if good else {"detail": "Token is invalid"}).encode()
        self.send_response(200 if good else 401)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        elif self.path == "/data/upload/1/truck.jpg":
            if self.headers.get("Authorization") not in ("Token good", f"Bearer {ACCESS_TOKEN}"):
                self.send_response(401)
                self.end_headers()
                return
            data = (IMAGES / "truck.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_label_studio():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_uploads_are_fetched_from_label_studio_with_its_key_only(fake_label_studio):
    truck = (IMAGES / "truck.jpg").read_bytes()
    source = ImageSource(fake_label_studio, "good")
    assert source.fetch("/data/upload/1/truck.jpg") == truck
    assert source.fetch(f"{fake_label_studio}/data/upload/1/truck.jpg") == truck
    assert _FakeLabelStudio.seen[-1] == ("/data/upload/1/truck.jpg", "Token good")
    with pytest.raises(ImageAccessError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        ImageSource(fake_label_studio, "wrong").fetch("/data/upload/1/truck.jpg")
    with pytest.raises(ImageAccessError, match="neither Label Studio's"):
        source.fetch("http://example.com/truck.jpg")
    # another host, allowed: fetched without Label Studio's key
    other = fake_label_studio.replace("127.0.0.1", "localhost")
    allowed = ImageSource(fake_label_studio, "good", allowed_hosts=("localhost",))
    with pytest.raises(ImageAccessError, match="HTTP 401"):
        allowed.fetch(f"{other}/data/upload/1/truck.jpg")
    assert _FakeLabelStudio.seen[-1] == ("/data/upload/1/truck.jpg", None)
    with pytest.raises(ImageAccessError, match="larger than"):
        ImageSource(fake_label_studio, "good", max_bytes=1000).fetch("/data/upload/1/truck.jpg")


def test_personal_access_tokens_are_exchanged_for_access_tokens(fake_label_studio):
    source = ImageSource(fake_label_studio, PERSONAL_TOKEN)
    for _ in range(2):
        assert source.fetch("/data/upload/1/truck.jpg") == (IMAGES / "truck.jpg").read_bytes()
    exchanges = [seen for seen in _FakeLabelStudio.seen if seen[0] == "/api/token/refresh/"]
    assert exchanges == [("/api/token/refresh/", PERSONAL_TOKEN)]  # once: the access token is kept until it expires
    assert _FakeLabelStudio.seen[-1] == ("/data/upload/1/truck.jpg", f"Bearer {ACCESS_TOKEN}")
    with pytest.raises(ImageAccessError, match="refused the personal access token.*HTTP 401"):
        ImageSource(fake_label_studio, fake_jwt({"token_type": "refresh", "user_id": "2"})).fetch("/data/upload/1/a")


def test_redirects_to_hosts_not_allowed_are_refused(fake_label_studio):
    other = fake_label_studio.replace("127.0.0.1", "localhost")
    with pytest.raises(ImageAccessError, match="redirected to host '169.254.169.254'"):
        ImageSource(fake_label_studio, "good", allowed_hosts=("localhost",)).fetch(f"{other}/away")


# ---------------------------------------------------------------- security and errors
def test_foreign_host_headers_are_refused(client):
    for host in ("attacker.example", "attacker.example:9090", "127.0.0.1.attacker.example"):
        assert client.get("/health", headers={"Host": host}).status_code == 400
        response = client.post("/predict", json=predict_body(keypoint(*WINDOW)), headers={"Host": host})
        assert response.status_code == 400 and "Host" in response.json()["error"]
    assert client.get("/health", headers={"Host": "localhost:9090"}).json()["status"] == "UP"


def test_posts_must_be_json_and_bounded(backend):
    with TestClient(create_app(backend, max_body_bytes=4096), base_url="http://127.0.0.1:9090") as client:
        response = client.post("/predict", content=b'{"tasks": []}', headers={"Content-Type": "text/plain"})
        assert response.status_code == 415 and "application/json" in response.json()["error"]
        response = client.post("/predict", json={"tasks": [], "pad": "x" * 5000})
        assert response.status_code == 413 and "4096 bytes" in response.json()["error"]
        for raw, message in ((b'{"tasks": [', "not JSON"), (b"[]", "JSON object"), (b'{"tasks": NaN}', "NaN"),
                             (b"[" * 2000 + b"]" * 2000, "nested too deep")):
            response = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and message in response.json()["error"], response.text


def test_basic_auth_is_checked_on_every_request(backend):
    app = create_app(backend, basic_auth=("labeller", "s3cret"))
    good = "Basic " + base64.b64encode(b"labeller:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"labeller:guess").decode()
    with TestClient(app, base_url="http://127.0.0.1:9090") as client:
        for headers in ({}, {"Authorization": bad}, {"Authorization": "Token s3cret"}):
            response = client.get("/health", headers=headers)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
            assert client.post("/setup", json={"schema": CONFIG}, headers=headers).status_code == 401
        assert client.get("/health", headers={"Authorization": good}).status_code == 200


@pytest.mark.parametrize("body, status, message", [
    (predict_body(keypoint(*WINDOW), task={"id": 1, "data": {"picture": "x"}}), 400, "no data.image"),
    (predict_body(keypoint(*WINDOW), task={"id": 1, "data": {"image": "/data/local-files/?d=../secret.jpg"}}), 422,
     "outside the document root"),
    (predict_body(keypoint(*WINDOW), task={"id": 1, "data": {"image": "https://example.com/a.jpg"}}), 422,
     "neither Label Studio's"),
    (predict_body({"type": "keypointlabels"}), 400, "must be a region object"),
    ({**predict_body(keypoint(*WINDOW)), "tasks": [TASK, TASK]}, 400, "one task"),
    ({"tasks": "all", "label_config": CONFIG}, 400, "'tasks' must be a list"),
    ({"tasks": [TASK], "project": "999.1"}, 400, "no /setup for this project"),
    ({**predict_body(keypoint(*WINDOW)), "label_config": "<View>"}, 400, "not well-formed"),
    (predict_body(*[keypoint(10 + i, 10) for i in range(201)]), 400, "201 keypoints in one request: at most 200"),
    (predict_body({**keypoint(*WINDOW), "value": {"x": "9" * 100_000, "y": 1}}), 400, "must be a number"),
])
def test_bad_requests_get_one_line_json_errors(client, body, status, message):
    response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error and len(error) <= 300


def test_webhooks_are_acknowledged(client):
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert client.get("/versions").json() == {"versions": [client.get("/health").json()["model_version"]]}


# ---------------------------------------------------------------- pre-annotation
def test_segment_everything_pre_annotates_a_task(model, photos, tmp_path):
    backend = SamBackend(model, ImageSource(document_root=photos / "photos"), tmp_path / "tokens",
                         segment_everything=True, everything_points=4)
    try:
        with TestClient(create_app(backend), base_url="http://127.0.0.1:9090") as client:
            response = client.post("/predict", json={"tasks": [TASK], "project": "3.1", "label_config": CONFIG})
    finally:
        backend.close()
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    records = sam_mlx.SamAutomaticMaskGenerator(model, points_per_side=4).generate(IMAGES / "truck.jpg")
    assert len(prediction["result"]) == len(records) > 0
    for result, record in zip(prediction["result"], records):
        assert result["value"]["brushlabels"] == ["Car"]
        assert np.array_equal(decode_brush(result["value"]["rle"], WIDTH, HEIGHT), record["segmentation"])
        assert result["score"] == pytest.approx(record["predicted_iou"], abs=1e-5)


def test_document_root_must_be_a_folder(tmp_path):
    with pytest.raises(ValueError, match="existing folder"):
        ImageSource(document_root=tmp_path / "missing")
    with pytest.raises(ValueError, match="existing folder"):
        ImageSource(document_root=Path("/"))
    with pytest.raises(ValueError, match="http\\(s\\) address"):
        ImageSource("127.0.0.1:8080")


# ---------------------------------------------------------------- the command
def test_the_command_serves_until_sigterm_and_ends_with_0(tmp_path):
    command = [sys.executable, "-m", "sam_mlx.cli", "label-studio", "--model", str(MOBILE_SAM), "--port", "0",
               "--json", "--tokens-dir", str(tmp_path / "tokens")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        announced = json.loads(process.stdout.readline())
        assert announced["url"].startswith("http://127.0.0.1:") and announced["port"] > 0
        health = httpx.get(f"{announced['url']}/health", timeout=30).json()
        assert health["status"] == "UP" and health["model_version"] == announced["model_version"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0 and "label-studio: stopped" in process.stderr.read()


@pytest.mark.parametrize("args, env, message", [
    (["--host", "0.0.0.0"], {}, "set a basic auth user and password"),
    ([], {"BASIC_AUTH_USER": "me"}, "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
    (["--document-root", "/nonexistent/folder"], {}, "must be an existing folder"),
])
def test_the_command_refuses_unsafe_or_wrong_settings(args, env, message):
    command = [sys.executable, "-m", "sam_mlx.cli", "label-studio", "--model", str(MOBILE_SAM), "--port", "0", *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", **env})
    assert run.returncode == 1 and message in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("sam-mlx label-studio: error:")


# ---------------------------------------------------------------- X-AnyLabeling's remote server protocol
def anylabeling_request(*marks: dict) -> dict:
    """A /v1/predict body as X-AnyLabeling's RemoteServer.predict_shapes sends it (the image file as a data URI)."""
    image = base64.b64encode((IMAGES / "truck.jpg").read_bytes()).decode()
    return {"model": "sam_mlx", "image": f"data:image/jpeg;base64,{image}",
            "params": {"conf_threshold": 0.0, "iou_threshold": 0.0, "epsilon_factor": 0.001, "marks": list(marks)}}


def test_anylabeling_lists_the_model_with_its_prompt_tools(client):
    """X-AnyLabeling reads data[model id] (display_name, widgets, batch_processing_mode) from GET /v1/models."""
    answer = client.get("/v1/models", headers={"Token": ""}).json()
    assert answer["success"] is True
    info = answer["data"]["sam_mlx"]
    assert info["batch_processing_mode"] == "default" and info["display_name"].startswith("sam_mlx")
    assert {w["name"] for w in info["widgets"]} >= {"button_add_point", "button_add_rect", "button_finish_object"}


def test_anylabeling_marks_give_the_predictors_mask_as_polygons(client, truck):
    from sam_mlx.io.export import DEFAULT_SIMPLIFY, mask_polygons

    point = {"type": "point", "data": list(WINDOW), "label": 1}
    negative = {"type": "point", "data": list(TYRE), "label": 0}
    box = {"type": "rectangle", "data": list(TRUCK_BOX), "label": 1}
    masks, scores, low_res = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    refined, _, _ = truck.predict(np.array([WINDOW, TYRE]), np.array([1, 0]), mask_input=low_res[[best]],
                                  multimask_output=False)
    boxed, _, _ = truck.predict(box=np.array(TRUCK_BOX), multimask_output=False)
    # the marks of one object grow click by click: the second request refines the first's mask
    for marks, expected in (([point], masks[best]), ([point, negative], refined[0]), ([box], boxed[0])):
        response = client.post("/v1/predict", json=anylabeling_request(*marks))
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["success"] is True and answer["data"]["description"] == ""
        shapes = answer["data"]["shapes"]
        assert all(s["label"] == "AUTOLABEL_OBJECT" and s["shape_type"] == "polygon" and 0 <= s["score"] <= 1
                   for s in shapes)
        assert [s["points"] for s in shapes] == [p.astype(float).tolist() for p in mask_polygons(expected,
                                                                                               DEFAULT_SIMPLIFY)]


@pytest.mark.parametrize("body, message", [
    ({**anylabeling_request({"type": "point", "data": [1, 2], "label": 1}), "model": "yolo"}, "model must be"),
    ({**anylabeling_request(), "image": "not base64!"}, "not valid base64"),
    (anylabeling_request(), "params.marks must list"),
    (anylabeling_request({"type": "polygon", "data": [1, 2]}), r"marks\[0\] must be"),
    (anylabeling_request({"type": "point", "data": [1, 2], "label": 0}), "only negative points"),
])
def test_anylabeling_bad_requests_get_one_line_errors(client, body, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 400
    assert re.search(message, response.json()["error"]) and "\n" not in response.json()["error"]
