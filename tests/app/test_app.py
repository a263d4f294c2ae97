"""``sam-mlx app``'s HTTP API and WebSocket against a real server process (MobileSAM, the shared photos).

The masks it returns are checked against ``SamPredictor`` in this process; the security rules (Host header,
token, folders) against crafted requests. The page itself is tested in a browser in ``test_app_browser.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from app_process import served, start_app, start_dog_and_truck_app, truck_predictor
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from reference import build_reference_hq_sam
from sam_mlx.app.engine import Engine
from sam_mlx.app.library import Library
from sam_mlx.app.masks import clean_mask, decode_mask, encode_mask
from sam_mlx.checkpoints.load import load_checkpoint
from sam_mlx.io.cache import trim_tokens_cache
from sam_mlx.io.tokens import read_image_tokens

DOG, TRUCK = 0, 1  # the photos folder's images, in name order
WINDOW = [500.0, 375.0]
TRUCK_BOX = [75.0, 275.0, 1725.0, 850.0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    (root / "photos" / "sub").mkdir(parents=True)
    (root / "private").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "private" / "secret.png")
    return root


@pytest.fixture(scope="module")
def app(folders):
    with served(folders, ready=(TRUCK,)) as running:
        yield running


@pytest.fixture(scope="module")
def truck():
    return truck_predictor()


def ws_url(app, token: str | None = None) -> str:
    return f"ws://{app.base.removeprefix('http://')}/api/hover?token={app.token if token is None else token}"


# ---------------------------------------------------------------- security
def test_foreign_host_header_is_refused(app):
    """DNS rebinding: a page of attacker.example resolving to 127.0.0.1 sends Host: attacker.example."""
    port = app.base.rsplit(":", 1)[1]
    with app.client() as client:
        for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.attacker.example:{port}"):
            for path in ("/", "/api/info", "/api/images"):
                response = client.get(path, headers={"Host": host})
                assert response.status_code == 400, (host, path)
            assert client.post("/api/decode", json={}, headers={"Host": host}).status_code == 400
        assert client.get("/api/info", headers={"Host": f"localhost:{port}"}).status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(app), additional_headers={"Host": "attacker.example"}).close()
    assert refused.value.response.status_code == 400


def test_api_requests_need_the_runs_token(app):
    requests = [("GET", "/api/info", None), ("GET", "/api/images", None), ("GET", f"/api/images/{TRUCK}/file", None),
                ("POST", "/api/decode", {"image": TRUCK, "points": [WINDOW], "labels": [1]}),
                ("POST", "/api/images", {"path": str(IMAGES / "dog.jpg")}),
                ("POST", f"/api/images/{TRUCK}/encode", {}), ("POST", "/api/export", {"formats": ["png"]})]
    for token in ("", "wrong-token", app.token[:-1]):
        with app.client(token) as client:
            for method, path, body in requests:
                response = client.request(method, path, json=body)
                assert response.status_code == 403, (token, path)
                assert "token" in response.json()["error"]
    with app.client("") as client:
        assert client.get("/api/info", params={"token": app.token}).status_code == 200
        page = client.get("/")  # the page is served to anyone, but carries no token: the address printed does
        assert page.status_code == 200 and app.token not in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert app.token not in client.get("/static/app.js").text
    for url, origin in ((ws_url(app, ""), None), (ws_url(app), "http://attacker.example")):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, origin=origin).close()
        assert refused.value.response.status_code == 403


def test_image_paths_cannot_leave_the_opened_folders(app, folders):
    photos, secret = folders / "photos", folders / "private" / "secret.png"
    (photos / "sub" / "link.png").symlink_to(secret)  # appears after the start, leads outside
    with app.client() as client:
        for path in (secret, photos / ".." / "private" / "secret.png", "/etc/passwd", "/", photos / "sub" / "link.png",
                     photos / "sub"):
            response = client.post("/api/images", json={"path": str(path)})
            assert response.status_code == 403, (path, response.text)
            assert "outside" in response.json()["error"]
        Image.new("RGB", (40, 30)).save(photos / "sub" / "inner.png")
        added = client.post("/api/images", json={"path": str(photos / "sub")}).json()["images"]
        assert [a["name"] for a in added] == ["inner.png"]  # the folder's link to outside is left out
        names = [i["name"] for i in client.get("/api/images").json()["images"]]
        assert "secret.png" not in names and "link.png" not in names
        assert client.post("/api/images", json={"path": str(photos / "nothing.jpg")}).status_code == 400


def test_export_paths_cannot_leave_the_export_folder(app, folders):
    export = folders / "export"
    export.mkdir(exist_ok=True)
    outside = folders / "outside"
    outside.mkdir()
    (export / "link").symlink_to(outside)
    mask = encode_mask(np.ones((1200, 1800), bool), "png")
    body = {"formats": ["png"], "images": [{"image": TRUCK, "objects": [{"label": "truck", "mask": mask}]}]}
    with app.client() as client:
        for folder in ("..", "../outside", str(outside), "link", "link/deeper", "sub/../../outside"):
            response = client.post("/api/export", json={**body, "folder": folder})
            assert response.status_code == 403, (folder, response.text)
            prompts = client.get(f"/api/images/{TRUCK}/prompts", params={"folder": folder})
            assert prompts.status_code == 403, folder
    assert not any(outside.iterdir())


def test_export_writes_the_formats_and_the_prompts(app, folders, truck):
    """One object by its prompt steps (decoded again by the server), one by its mask; the clean-up applies to both."""
    masks, scores, low_res = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    best = int(scores.argmax())
    refined, refined_scores, _ = truck.predict(np.array([WINDOW, [560.0, 330.0]]), np.array([1, 1]),
                                               mask_input=low_res[[best]], multimask_output=False)
    given = np.zeros((1200, 1800), bool)
    given[100:300, 200:400] = True
    given[150:160, 250:260] = False  # a 100-pixel hole, filled by the clean-up
    steps = [{"points": [[*WINDOW, 1]], "box": None, "multimask": True, "selected": best},
             {"points": [[*WINDOW, 1], [560.0, 330.0, 1]], "box": None, "multimask": False, "selected": 0}]
    body = {"folder": "api", "formats": ["png", "coco"], "fill_holes": 500, "images": [{"image": TRUCK, "objects": [
        {"label": "window", "color": "#ff0000", "steps": steps},
        {"label": "square", "mask": encode_mask(given, "rle"), "score": 0.5}]}]}
    with app.client() as client:
        result = client.post("/api/export", json=body).json()
        folder = folders / "export" / "api"
        assert result["folder"] == str(folder)
        assert {"truck_mask0.png", "truck_mask1.png", "coco.json", "truck.prompts.json"} <= set(result["files"])
        exported = [np.array(Image.open(folder / f"truck_mask{i}.png")) > 127 for i in range(2)]
        np.testing.assert_array_equal(exported[0], clean_mask(refined[0], 500))
        np.testing.assert_array_equal(exported[1], clean_mask(given, 500))
        assert exported[1][150:160, 250:260].all()
        coco = json.loads((folder / "coco.json").read_text())
        window = next(a for a in coco["annotations"] if a["area"] == exported[0].sum())
        assert abs(window["score"] - refined_scores[0]) < 1e-5 and window["prompt"]["points"][1] == [560.0, 330.0]
        prompts = client.get(f"/api/images/{TRUCK}/prompts", params={"folder": "api"}).json()
        assert prompts["format"] == "sam_mlx_app_prompts" and prompts["objects"][0]["steps"] == steps
        assert prompts["cleanup"]["fill_holes"] == 500 and len(prompts["objects"]) == 1  # a mask has no steps
        bad = client.post("/api/export", json={**body, "formats": ["png", "gif"]})
        assert bad.status_code == 400 and "formats" in bad.json()["error"]


# ---------------------------------------------------------------- masks
def test_decode_gives_the_predictors_masks(app, truck):
    """A point, then a box with the previous best mask as the hint (by result id), then a background point
    with the hint sent as float32 logits: the masks, scores and low-res logits of SamPredictor."""
    point, labels = np.array([WINDOW]), np.array([1])
    masks1, scores1, low_res1 = truck.predict(point, labels, multimask_output=True)
    best = int(scores1.argmax())
    masks2, scores2, low_res2 = truck.predict(point, labels, np.array(TRUCK_BOX), low_res1[[best]], False)
    points3, labels3 = np.array([WINDOW, [1100.0, 500.0]]), np.array([1, 0])
    masks3, scores3, _ = truck.predict(points3, labels3, np.array(TRUCK_BOX), low_res2, False)
    with app.client() as client:
        first = client.post("/api/decode", json={"image": TRUCK, "points": [WINDOW], "labels": [1]}).json()
        assert len(first["masks"]) == 3 and first["decode_ms"] > 0 and first["server_ms"] >= first["decode_ms"]
        np.testing.assert_allclose(first["scores"], scores1, atol=1e-5)
        for got, want in zip(first["masks"], masks1):
            np.testing.assert_array_equal(decode_mask(got, (1800, 1200)), want)
        second = client.post("/api/decode", json={
            "image": TRUCK, "points": [WINDOW], "labels": [1], "box": TRUCK_BOX, "multimask": False,
            "mask_input": {"result": first["result"], "candidate": best}, "mask_format": "rle",
            "return_low_res": True}).json()
        np.testing.assert_allclose(second["scores"], scores2, atol=1e-5)
        np.testing.assert_array_equal(decode_mask(second["masks"][0]), masks2[0])
        assert second["masks"][0]["rle"]["size"] == [1200, 1800]
        low_res = np.frombuffer(base64.b64decode(second["low_res"]["float32"]), "<f4")
        low_res = low_res.reshape(second["low_res"]["shape"])
        np.testing.assert_allclose(low_res, low_res2, atol=1e-5)
        third = client.post("/api/decode", json={
            "image": TRUCK, "points": points3.tolist(), "labels": [1, 0], "box": TRUCK_BOX, "multimask": False,
            "mask_input": {"float32": second["low_res"]["float32"], "shape": [1, *low_res.shape[1:]]}}).json()
        np.testing.assert_allclose(third["scores"], scores3, atol=1e-5)
        np.testing.assert_array_equal(decode_mask(third["masks"][0]), masks3[0])
        assert not (masks3[0] == masks2[0]).all()  # the background point changed the mask


def test_masks_of_large_images_can_be_sent_shrunk(app, truck):
    """max_side: the masks (for showing) at most that size, their boxes at the image's; the clean-up of a shrunk
    mask scales its areas to the shrunk pixels."""
    masks, _, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    with app.client() as client:
        body = {"image": TRUCK, "points": [WINDOW], "labels": [1], "max_side": 600}
        reply = client.post("/api/decode", json=body).json()
        for got, want in zip(reply["masks"], masks):
            shrunk = decode_mask(got)
            assert shrunk.shape == (400, 600)
            np.testing.assert_array_equal(shrunk, want[1::3, 1::3])  # the nearest pixels: 3 x 3 blocks' centres
            rows, cols = np.flatnonzero(want.any(axis=1)), np.flatnonzero(want.any(axis=0))
            assert got["box"] == [cols[0], rows[0], cols[-1], rows[-1]]
        hole = np.ones((400, 600), bool)
        hole[100:110, 100:110] = False  # 100 shrunk pixels: 900 of the image's
        for area, filled in ((800, False), (1000, True)):
            cleaned = client.post("/api/cleanup", json={"image": TRUCK, "mask": encode_mask(hole, "png"),
                                                        "fill_holes": area}).json()
            assert decode_mask(cleaned["mask"]).all() == filled
            assert cleaned["mask"]["box"] == [0, 0, 1799, 1199]


def test_polygons_are_the_exports(app, truck):
    """The outline the page draws is the COCO export's polygon at the chosen simplification."""
    from sam_mlx.io.export import mask_polygons

    masks, _, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=False)
    with app.client() as client:
        for simplify in (0, 0.5, 3):
            reply = client.post("/api/polygons", json={"image": TRUCK, "mask": encode_mask(masks[0], "png"),
                                                       "simplify": simplify}).json()
            want = mask_polygons(masks[0], simplify, outline=True)
            assert [np.array(p).tolist() for p in reply["polygons"]] == [p.tolist() for p in want]
            assert reply["vertices"] == sum(map(len, want))
        assert reply["vertices"] < sum(map(len, mask_polygons(masks[0], 0, outline=True)))


def test_decode_errors_are_one_line_json(app):
    cases = [({"image": TRUCK, "points": [[5000, 10]], "labels": [1]}, 400, "outside"),
             ({"image": 99, "points": [WINDOW], "labels": [1]}, 404, "no image with id 99"),
             ({"image": TRUCK, "points": [WINDOW], "labels": [1], "mask_input": {"result": "r999999"}}, 409,
              "no longer"),
             ({"image": TRUCK, "points": [WINDOW], "labels": [7]}, 400, "point_labels"),
             ({"image": TRUCK, "points": [WINDOW]}, 400, "missing field 'labels'"),
             ({"image": "1", "points": [WINDOW], "labels": [1]}, 400, "'image' must be int"),
             ({"image": TRUCK, "points": [WINDOW], "labels": [1], "mask_format": "gif"}, 400, "mask_format"),
             ({"image": TRUCK, "box": [500, 500, 100, 100]}, 400, "x2 < x1"),
             ({"image": TRUCK}, 400, "no prompt")]
    with app.client() as client:
        for body, status, words in cases:
            response = client.post("/api/decode", json=body)
            assert response.status_code == status, (body, response.text)
            assert words in response.json()["error"], response.json()
        response = client.post("/api/decode", content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400


def test_hover_stream_answers_only_the_latest_position(app, truck):
    """A burst of positions: the ones not started before the next arrived are dropped, the last is answered."""
    positions = [[400.0 + 10 * i, 360.0 + 2 * i] for i in range(30)]
    replies = []
    with connect(ws_url(app)) as socket:
        for seq, (x, y) in enumerate(positions, 1):
            socket.send(json.dumps({"seq": seq, "image": TRUCK, "x": x, "y": y}))
        while not replies or replies[-1]["seq"] != len(positions):
            replies.append(json.loads(socket.recv(timeout=60)))
    seqs = [r["seq"] for r in replies]
    assert seqs == sorted(set(seqs)) and len(seqs) < len(positions) / 2, seqs
    with app.client() as client:  # every position not answered was dropped, none is still queued
        assert client.get("/api/info").json()["hovers_dropped"] == len(positions) - len(seqs)
    x, y = positions[-1]
    masks, scores, _ = truck.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
    last = replies[-1]
    assert last["ready"] and abs(last["score"] - scores.max()) < 1e-5
    np.testing.assert_array_equal(decode_mask(last["mask"]), masks[scores.argmax()])


def test_cleanup_fills_holes_and_removes_islands(app):
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:50] = True
    mask[20:24, 20:25] = False  # a 20-pixel hole
    mask[5:10, 60:66] = True  # a 30-pixel island
    with app.client() as client:
        for holes, islands in ((50, 0), (0, 50), (50, 50), (10, 10)):
            result = client.post("/api/cleanup", json={"mask": encode_mask(mask, "png"), "fill_holes": holes,
                                                       "remove_islands": islands}).json()
            want = clean_mask(mask, holes, islands)
            np.testing.assert_array_equal(decode_mask(result["mask"]), want)
            assert result["area"] == want.sum()
    assert clean_mask(mask, 50, 50).sum() == 40 * 40 and (clean_mask(mask, 10, 10) == mask).all()


def test_image_tokens_are_cached_on_disk(app, folders, tmp_path):
    """Each encoded image leaves a tokens file; a later run opens the image from it without the encoder."""
    files = list((folders / "tokens").glob("*.safetensors"))
    sizes = sorted(read_image_tokens(f).geometry.original_size for f in files)
    assert (1200, 1800) in sizes and len(files) == len(sizes)
    later = start_app(str(folders / "photos" / "truck.jpg"), "--tokens-dir", str(folders / "tokens"),
                      "--out-dir", str(tmp_path))
    try:
        record = later.wait_ready(0, timeout=60)
        assert record["cached"] and record["encode_seconds"] is None  # loaded, not encoded
    finally:
        assert later.stop()[0] == 0


def test_a_click_is_answered_while_another_image_is_encoded(tmp_path):
    """Encodes run on their own thread: a decode of an encoded image does not wait for one in progress."""
    running = start_dog_and_truck_app(tmp_path)
    try:
        running.wait_ready(DOG)
        with running.client() as client:
            client.post(f"/api/images/{TRUCK}/encode", json={"prefetch": 0}).raise_for_status()
            while client.get(f"/api/images/{TRUCK}").json()["status"] != "encoding":
                pass
            reply = client.post("/api/decode", json={"image": DOG, "points": [[400, 300]], "labels": [1]})
            assert reply.status_code == 200 and client.get(f"/api/images/{TRUCK}").json()["status"] == "encoding"
        assert running.wait_ready(TRUCK)["encode_seconds"] > 0
    finally:
        assert running.stop(signal.SIGINT)[0] == 0


def test_stretch_sizing_any_aspect_ratio_and_a_clean_stop(tmp_path):
    """--sizing stretch --size 512 on a photo, a tall strip and a 1x1 image; Ctrl+C ends the process cleanly
    after the model ran (no abort at exit)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "truck.jpg", photos / "a_truck.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (500, 37, 3), dtype=np.uint8)).save(photos / "b_tall.png")
    Image.new("RGB", (1, 1), (90, 120, 200)).save(photos / "c_dot.png")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "mine.safetensors").write_bytes(b"not the app's")
    # Each image's tokens take 1 MB and a header here: a 1 MB cache keeps only the last image's.
    running = start_app(str(photos), "--sizing", "stretch", "--size", "512", "--tokens-dir", str(tmp_path / "tokens"),
                        "--out-dir", str(tmp_path / "out"), "--json", "--tokens-cache-mb", "1")
    try:
        announced = json.loads(running.process.stdout.readline())  # --json: for programs that start the app
        assert announced == {"url": running.url, "port": int(running.base.rsplit(":", 1)[1]), "token": running.token}
        predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM), sizing="stretch", size=512)
        with running.client() as client:
            assert client.get("/api/info").json()["size"] == 512
            cases = ((0, WINDOW, (1200, 1800)), (1, [18.0, 400.0], (500, 37)), (2, [0.5, 0.5], (1, 1)))
            for image_id, point, shape in cases:
                running.wait_ready(image_id)
                reply = client.post("/api/decode", json={"image": image_id, "points": [point], "labels": [1]}).json()
                masks = [decode_mask(m) for m in reply["masks"]]
                assert all(m.shape == shape for m in masks)
                if image_id == 0:
                    predictor.set_image(photos / "a_truck.jpg")
                    want, _, _ = predictor.predict(np.array([point]), np.array([1]))
                    np.testing.assert_array_equal(np.stack(masks), want)
            with connect(ws_url(running)) as socket:
                socket.send(json.dumps({"seq": 1, "image": 0, "x": 900, "y": 600}))
                assert json.loads(socket.recv(timeout=60))["ready"]
    finally:
        code, log = running.stop(signal.SIGINT)
    assert code == 0, log
    assert "stopped" in log and "terminate" not in log and "Abort" not in log
    assert len(list((tmp_path / "tokens").glob("*-stretch-512.safetensors"))) == 1
    assert (tmp_path / "tokens" / "mine.safetensors").read_bytes() == b"not the app's"


def test_tokens_cache_keeps_the_latest_used_within_its_limit(tmp_path):
    engine = Engine(load_checkpoint(MOBILE_SAM), Library([str(IMAGES)], tmp_path / "out"), tmp_path,
                    tokens_cache_bytes=2500)
    names = [f"{i:032x}-{engine.fingerprint}-original-1024.safetensors" for i in range(4)]
    for age, name in enumerate(names):  # names[0] used longest ago
        (tmp_path / name).write_bytes(bytes(1000))
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    (tmp_path / "notes.safetensors").write_bytes(bytes(5000))  # not a tokens file of the app: never removed
    os.utime(tmp_path / names[1], (2000, 2000))  # used again since
    trim_tokens_cache(tmp_path, tmp_path / names[3], engine.tokens_cache_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], names[3], "notes.safetensors"])


def test_mask_encodings_round_trip():
    """The app's own 1-bit PNG writer read back by Pillow, and the COCO RLE, for odd sizes."""
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (1, 9), (7, 8), (13, 17), (300, 451)):
        mask = rng.random((height, width)) > 0.6
        for mask_format in ("png", "rle"):
            encoded = encode_mask(mask, mask_format)
            np.testing.assert_array_equal(decode_mask(encoded, (width, height)), mask)
        with pytest.raises(ValueError, match="but the image is"):
            decode_mask(encode_mask(mask, "png"), (width + 1, height))
    with pytest.raises(ValueError, match="not a base64 PNG"):
        decode_mask({"png": "bm90IGEgcG5n"})


def test_hint_store_keeps_the_latest_within_its_budget():
    from sam_mlx.app.engine import HintExpired, HintStore

    store = HintStore(max_bytes=3 * 4 * 256 * 256 * 4)  # four results of 3 candidates
    results = [store.put(image_id=0, low_res=np.full((3, 256, 256), i, np.float32)) for i in range(6)]
    with pytest.raises(HintExpired, match="no longer kept"):
        store.get(0, results[1], 0)
    assert store.get(0, results[2], 1).shape == (1, 256, 256) and store.get(0, results[5], 2)[0, 0, 0] == 5
    with pytest.raises(ValueError, match="belongs to image 0"):
        store.get(1, results[5], 0)
    with pytest.raises(ValueError, match="candidates 0..2"):
        store.get(0, results[5], 3)


def test_command_errors_are_one_line(tmp_path):
    """A port already in use, a missing image and a negative --prefetch: one line on stderr, exit code 1 or 2."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        command = [sys.executable, "-m", "sam_mlx.cli", "app", "--model", str(MOBILE_SAM), "--no-browser",
                   "--tokens-dir", str(tmp_path), "--out-dir", str(tmp_path / "export")]
        for args, code, words in (([str(IMAGES), "--port", port], 1, f"cannot listen on 127.0.0.1:{port}"),
                                  ([str(tmp_path / "none.jpg")], 1, "image not found"),
                                  ([str(IMAGES), "--prefetch", "-1"], 2, "--prefetch")):
            result = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
            assert result.returncode == code and words in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_hq_sam_in_the_app(tmp_path):
    """An HQ-SAM model (small random ViT, original .pth): clicks and hovers give the predictor's one mask; its
    tokens stay in memory (a tokens file cannot hold the early features HQ-SAM needs)."""
    checkpoint = tmp_path / "sam_hq_small.pth"
    small = dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14)
    torch.save(build_reference_hq_sam("vit", **small).state_dict(), checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "truck.jpg", photos / "truck.jpg")
    env = {**os.environ, "SAM_MLX_CACHE": str(tmp_path / "cache")}
    running = start_app(str(photos), "--model", str(checkpoint), "--sizing", "stretch", "--size", "256",
                        "--tokens-dir", str(tmp_path / "tokens"), "--out-dir", str(tmp_path / "out"), env=env)
    try:
        record = running.wait_ready(0)
        assert not record["cached"] and not list((tmp_path / "tokens").glob("*.safetensors"))
        predictor = sam_mlx.SamPredictor(sam_mlx.load(str(checkpoint)), sizing="stretch", size=256)
        predictor.set_image(photos / "truck.jpg")
        want, scores, _ = predictor.predict(np.array([WINDOW]), np.array([1]))
        with running.client() as client:
            reply = client.post("/api/decode", json={"image": 0, "points": [WINDOW], "labels": [1]}).json()
        assert len(reply["masks"]) == 1 and np.allclose(reply["scores"], scores, atol=1e-4)
        np.testing.assert_array_equal(decode_mask(reply["masks"][0]), want[0])
        with connect(ws_url(running)) as socket:
            socket.send(json.dumps({"seq": 1, "image": 0, "x": WINDOW[0], "y": WINDOW[1]}))
            hover = json.loads(socket.recv(timeout=60))
        np.testing.assert_array_equal(decode_mask(hover["mask"]), want[0])
    finally:
        code, log = running.stop(signal.SIGINT)
    assert code == 0, log
