"""``sam-mlx app`` under careless and hostile clients (issue 32), against a real server process on 127.0.0.1.

Each test holds a rule a client cannot break: no Nagle stall on a kept-open connection, a stop that stops,
bounded requests, one-line JSON errors, an export that is one set, paths resolved at use and same-origin
requests only. Loops are bounded; timings are bounds only a defect breaks, never speed measurements.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import signal
import socket
import threading
import time

import numpy as np
import pytest
from app_process import served, start_app, start_dog_and_truck_app
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from helpers import IMAGES
from sam_mlx.app.masks import encode_mask

DOG, TRUCK, VICTIM, BROKEN = 0, 1, 2, 3  # the photos folder's images, in name order
WINDOW = [500.0, 375.0]
TRUCK_SIZE = (1800, 1200)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on dog.jpg, truck.jpg, victim.png (replaced by a link in a test) and zz_broken.jpg (not an image)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "photos").mkdir()
    (root / "private").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "private" / "secret.png")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(root / "photos" / "victim.png")
    (root / "photos" / "zz_broken.jpg").write_bytes(b"not a JPEG at all")
    with served(root, ready=(TRUCK,)) as running:
        yield running


def truck_steps(objects: int, steps: int) -> list[dict]:
    """Objects made of prompt steps on the truck (points spread over the image)."""
    made = []
    for i in range(objects):
        points = [[100.0 + (37 * i + 53 * j) % 1600, 100.0 + (29 * i + 41 * j) % 1000, 1] for j in range(steps)]
        made.append({"label": f"o{i}", "steps": [{"points": points[: j + 1], "box": None, "multimask": j == 0,
                                                   "selected": 0} for j in range(steps)]})
    return made


def square_mask(value: bool = True) -> dict:
    mask = np.zeros(TRUCK_SIZE[::-1], bool)
    mask[100:400, 200:700] = value
    return encode_mask(mask if value else ~mask, "png")


def connection(app) -> http.client.HTTPConnection:
    host, port = app.base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


# ---------------------------------------------------------------- latency
def test_no_nagle_stall_on_a_kept_open_connection(app):
    """Requests after the first on one keep-alive connection do not wait for a delayed ACK (~40 ms each)."""
    link = connection(app)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        link.request("GET", "/api/info", headers={"X-SAM-Token": app.token})
        response = link.getresponse()
        assert response.status == 200 and json.loads(response.read())["version"]
        times.append((time.perf_counter() - start) * 1e3)
    link.close()
    # With Nagle's algorithm every request after the first waits >= 40 ms for the client's delayed ACK; without,
    # most take a few ms even on a busy machine.
    assert sorted(times[1:])[len(times) // 4] < 30, times


# ---------------------------------------------------------------- a stop that stops
def test_a_stop_during_an_export_ends_the_process(tmp_path):
    """SIGTERM while an export makes its objects again from their prompt steps: the process ends within seconds,
    the export is answered 503 (or its connection dropped), and no file of it is left, not even a temporary."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "truck.jpg", photos / "truck.jpg")
    running = start_app(str(photos), "--prefetch", "0", "--tokens-dir", str(tmp_path / "tokens"),
                        "--out-dir", str(tmp_path / "out"))
    outcome = {}
    try:
        running.wait_ready(0)
        body = {"folder": "slow", "formats": ["png"], "images": [{"image": 0, "objects": truck_steps(60, 8)}]}

        def export() -> None:
            try:
                with running.client() as client:
                    outcome["response"] = client.post("/api/export", json=body, timeout=300)
            except Exception as exc:  # the connection dropped by the stop: allowed
                outcome["error"] = exc

        thread = threading.Thread(target=export)
        thread.start()
        time.sleep(3)  # a few of its 480 decodes done
        assert thread.is_alive(), outcome
        start = time.monotonic()
        code, log = running.stop(signal.SIGTERM, timeout=20)
        assert time.monotonic() - start < 15, log
        assert code == 0, log
        thread.join(30)
    finally:
        if running.process.poll() is None:
            running.process.kill()
    if "response" in outcome:
        assert outcome["response"].status_code == 503, outcome["response"].text
        assert "stopping" in outcome["response"].json()["error"]
    assert not (tmp_path / "out" / "slow").exists() or not list((tmp_path / "out" / "slow").rglob("*"))


def test_a_decode_waiting_for_an_encode_does_not_hold_up_ready_images(tmp_path):
    """A click on an image still encoding waits for it; a click on a ready image is answered meanwhile."""
    running = start_dog_and_truck_app(tmp_path)
    try:
        running.wait_ready(DOG)
        waiting = {}
        with running.client() as client:
            client.post(f"/api/images/{TRUCK}/encode", json={"prefetch": 0}).raise_for_status()
            for _ in range(2000):
                if client.get(f"/api/images/{TRUCK}").json()["status"] == "encoding":
                    break

            other = running.client()

            def click_truck() -> None:
                waiting["truck"] = other.post("/api/decode", json={"image": TRUCK, "points": [WINDOW], "labels": [1]})

            thread = threading.Thread(target=click_truck)
            thread.start()
            time.sleep(0.3)  # the truck's decode queued first
            reply = client.post("/api/decode", json={"image": DOG, "points": [[400, 300]], "labels": [1]})
            assert reply.status_code == 200
            assert client.get(f"/api/images/{TRUCK}").json()["status"] == "encoding" and "truck" not in waiting
            thread.join(120)
            other.close()
        assert waiting["truck"].status_code == 200 and len(waiting["truck"].json()["masks"]) == 3
    finally:
        assert running.stop(signal.SIGTERM)[0] == 0


# ---------------------------------------------------------------- limits
def test_requests_beyond_the_limits_are_refused_at_once(app):
    """Each of these took minutes or gigabytes before; now a 413 in well under a second of work."""
    tiny_rle = {"rle": {"size": [10**6, 10**6], "counts": [10**12]}}  # a few bytes asking for 10^12 pixels
    cases = [
        ("/api/decode", {"image": TRUCK, "points": [WINDOW] * 20_000, "labels": [1] * 20_000}, 413, "at most"),
        ("/api/cleanup", {"mask": tiny_rle, "fill_holes": 10}, 413, "limit"),
        ("/api/polygons", {"mask": tiny_rle}, 413, "limit"),
        ("/api/cleanup", {"image": TRUCK, "mask": {"rle": {"size": [2400, 3600], "counts": [2400 * 3600]}}}, 400,
         "larger than"),
        ("/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": [{"mask": tiny_rle}]}]}, 400,
         "but the image is"),
        ("/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": [{"mask": square_mask()}]}] * 2},
         400, "listed twice"),
        ("/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": [{"mask": square_mask()}] * 1001}]},
         413, "at most 1000"),
        ("/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": truck_steps(1, 201)}]}, 413,
         "at most 200"),
        ("/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": [
            {"steps": [{"points": [[*WINDOW, 1]] * 200, "box": None, "multimask": False, "selected": 0}] * 200}] * 3}]},
         413, "at most 100000"),
    ]
    with app.client() as client:
        for path, body, status, words in cases:
            start = time.monotonic()
            response = client.post(path, json=body)
            assert response.status_code == status, (path, response.text[:300])
            assert words in response.json()["error"], response.json()
            assert time.monotonic() - start < 20, path  # refused before the work, not after
        huge = "A" * (40 << 20)  # 40 MB in one field
        response = client.post("/api/cleanup", content=json.dumps({"mask": {"png": huge}}),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and len(response.content) < 500 and "AAAA" not in response.text
        response = client.post("/api/decode", content=iter([b'{"image": 1, "points": "' + b"A" * (1 << 20)] * 40),
                               headers={"Content-Type": "application/json"})  # chunked: no Content-Length
        assert response.status_code == 413 and "AAAA" not in response.text


def test_a_large_folder_is_listed_off_the_event_loop(app, tmp_path):
    """Opening a folder of 10,000 images takes seconds; other requests are answered meanwhile."""
    many = app.root / "photos" / "many"
    many.mkdir()
    for i in range(10_000):
        (many / f"m{i:05d}.png").write_bytes(b"")
    done = {}

    def open_folder() -> None:
        with app.client() as client:
            done["response"] = client.post("/api/images", json={"path": str(many)})

    thread = threading.Thread(target=open_folder)
    waits = []
    with app.client() as client:
        thread.start()
        while thread.is_alive() and len(waits) < 500:
            start = time.monotonic()
            assert client.get("/api/info").status_code == 200
            waits.append(time.monotonic() - start)
    thread.join(120)
    assert done["response"].status_code == 200 and len(done["response"].json()["images"]) == 10_000
    assert len(waits) >= 3 and max(waits) < 1.0, waits


# ---------------------------------------------------------------- errors that are not errors
def _deep(levels: int) -> bytes:
    return b'{"image": ' + b"[" * levels + b"]" * levels + b"}"


ERROR_CASES = [
    ("labels null", "/api/decode", {"image": TRUCK, "points": [WINDOW], "labels": [None]}),
    ("shape of a float", "/api/decode", {"image": TRUCK, "points": [WINDOW], "labels": [1],
                                         "mask_input": {"float32": "AAAAAA==", "shape": [1.0]}}),
    ("shape of text", "/api/decode", {"image": TRUCK, "points": [WINDOW], "labels": [1],
                                      "mask_input": {"float32": "AAAAAA==", "shape": ["a"]}}),
    ("shape of lists", "/api/decode", {"image": TRUCK, "points": [WINDOW], "labels": [1],
                                       "mask_input": {"float32": "AAAAAA==", "shape": [[1]]}}),
    ("point of infinity", "/api/decode", b'{"image": 1, "points": [[1e400, 5]], "labels": [1]}'),
    ("point of NaN", "/api/decode", b'{"image": 1, "points": [[NaN, 5]], "labels": [1]}'),
    ("RLE of size 0", "/api/cleanup", {"mask": {"rle": {"size": [0, 0], "counts": []}}}),
    ("RLE of text counts", "/api/cleanup", {"mask": {"rle": {"size": [2, 2], "counts": ["4"]}}}),
    ("simplify 1e30", "/api/polygons", {"mask": encode_mask(np.ones((20, 20), bool), "png"), "simplify": 1e30}),
    ("images of a number", "/api/export", {"formats": ["png"], "images": [5]}),
    ("objects of a number", "/api/export", {"formats": ["png"], "images": [{"image": TRUCK, "objects": [7]}]}),
    ("JSON 100,000 deep", "/api/decode", _deep(100_000)),
    ("a FIFO", "/api/images", "FIFO"),
    ("an over-long path", "/api/images", {"path": "/" + "a" * 10_000}),
    ("a long file name", "/api/images", "LONG NAME"),
    ("text/plain", "/api/decode", "TEXT"),
]


@pytest.mark.parametrize(("case", "path", "body"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_a_one_line_json_error(app, case, path, body):
    headers = {"Content-Type": "application/json"}
    if body == "FIFO":
        fifo = app.root / "photos" / "pipe.jpg"
        if not fifo.exists():
            os.mkfifo(fifo)
        body = {"path": str(fifo)}
    elif body == "LONG NAME":
        body = {"path": str(app.root / "photos" / ("b" * 300 + ".jpg"))}
    elif body == "TEXT":
        body, headers = json.dumps({"image": TRUCK, "points": [WINDOW], "labels": [1]}).encode(), {
            "Content-Type": "text/plain"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with app.client() as client:
        response = client.post(path, content=content, headers=headers)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error, str) and "\n" not in error and 0 < len(error) <= 300, error


def test_hover_answers_bad_messages_and_says_an_encoding_failed(app):
    """Invalid JSON, a bare number, a binary frame, x of 1e400: an error message each, and the stream goes on;
    hovering an image that could not be encoded says so (not ``ready: false`` for ever)."""
    url = f"ws://{app.base.removeprefix('http://')}/api/hover?token={app.token}"
    with app.client() as client:
        for _ in range(600):
            if client.get(f"/api/images/{BROKEN}").json()["status"] == "error":
                break
            client.post(f"/api/images/{BROKEN}/encode", json={"prefetch": 0})
            time.sleep(0.1)
    with connect(url) as stream:
        for message in ("{not json", "5", b"\x00\x01", '{"seq": 1, "image": 1, "x": 1e400, "y": 5}',
                        '{"seq": 1, "image": 1, "x": NaN, "y": 5}', "[" * 50_000):
            stream.send(message)
            reply = json.loads(stream.recv(timeout=30))
            assert "error" in reply and "\n" not in reply["error"], (message[:20], reply)
        stream.send(json.dumps({"seq": 2, "image": BROKEN, "x": 1, "y": 1}))
        reply = json.loads(stream.recv(timeout=30))
        assert "could not be encoded" in reply["error"], reply
        stream.send(json.dumps({"seq": 3, "image": TRUCK, "x": WINDOW[0], "y": WINDOW[1]}))
        assert json.loads(stream.recv(timeout=60))["ready"]
    with connect(url) as stream:  # a message over 64 KB: closed with 1009 (too big), not dropped
        stream.send("[" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            stream.recv(timeout=30)
        assert closed.value.rcvd.code == 1009


# ---------------------------------------------------------------- exports as one set
def _files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_re_export_replaces_the_previous_set(app):
    """3 objects then 1 into one folder: the masks of the 2 others are removed; then a mask-only export removes
    the prompts file of the objects no longer exported; a killed writer's temporary is removed."""
    folder = app.root / "export" / "again"
    three = [{"label": f"o{i}", "mask": square_mask()} for i in range(2)] + truck_steps(1, 1)
    with app.client() as client:
        first = client.post("/api/export", json={"folder": "again", "formats": ["png", "coco"],
                                                 "images": [{"image": TRUCK, "objects": three}]})
        assert first.status_code == 200, first.text
        assert {"truck_mask0.png", "truck_mask2.png", "coco.json", "truck.prompts.json"} <= _files(folder)
        (folder / ".truck_mask0.png.abcd1234.tmp.png").write_bytes(b"left by a killed export")
        second = client.post("/api/export", json={"folder": "again", "formats": ["png"],
                                                  "images": [{"image": TRUCK, "objects": [{"mask": square_mask()}]}]})
        assert second.status_code == 200, second.text
    assert _files(folder) == {"truck_mask0.png", ".sam-mlx-app-export.json"}
    assert set(second.json()["files"]) == {"truck_mask0.png"}


def test_an_export_does_not_replace_a_users_own_file(app):
    folder = app.root / "export" / "mine"
    folder.mkdir(parents=True)
    (folder / "coco.json").write_text("my own annotations")
    with app.client() as client:
        response = client.post("/api/export", json={"folder": "mine", "formats": ["png", "coco"],
                                                    "images": [{"image": TRUCK, "objects": [{"mask": square_mask()}]}]})
    assert response.status_code == 409 and "coco.json" in response.json()["error"]
    assert (folder / "coco.json").read_text() == "my own annotations" and _files(folder) == {"coco.json"}


def test_two_exports_into_one_folder_at_once_give_one_set(app):
    """Two clients export different masks into one folder at the same time, several rounds: the masks and the
    cut-outs on disk are always those of one of them, both answered 200."""
    bodies = [{"folder": "race", "formats": ["png", "cutout"],
               "images": [{"image": TRUCK, "objects": [{"mask": square_mask(value)}] * 3}]} for value in (True, False)]
    folder = app.root / "export" / "race"
    for _ in range(4):
        answers = []

        def send(body: dict, answers: list = answers) -> None:
            with app.client() as client:
                answers.append(client.post("/api/export", json=body).status_code)

        threads = [threading.Thread(target=send, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert answers == [200, 200]
        masks = [np.array(Image.open(folder / f"truck_mask{i}.png")) > 127 for i in range(3)]
        cutouts = [np.array(Image.open(folder / f"truck_cutout{i}.png"))[..., 3] > 127 for i in range(3)]
        for mask in masks + cutouts:
            np.testing.assert_array_equal(mask, masks[0])
        assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_a_full_disk_gives_a_json_error_and_no_half_set(tmp_path):
    """Writes beyond 512 KB fail (a file size limit, as a full disk would): a cut-out does not fit. The export
    answers 507 naming the space left, and no file of it is in the folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(IMAGES / "truck.jpg", photos / "truck.jpg")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, limit[1]))  # inherited by the app's process only
    try:
        running = start_app(str(photos), "--prefetch", "0", "--tokens-dir", str(tmp_path / "tokens"),
                            "--out-dir", str(tmp_path / "out"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    try:
        mask = np.ones(TRUCK_SIZE[::-1], bool)
        with running.client() as client:
            response = client.post("/api/export", json={"folder": "full", "formats": ["png", "cutout"], "images": [
                {"image": 0, "objects": [{"mask": encode_mask(mask, "png")}]}]})
        assert response.status_code == 507, response.text
        assert "free in" in response.json()["error"] and "\n" not in response.json()["error"]
        assert _files(tmp_path / "out" / "full") == set()
    finally:
        assert running.stop(signal.SIGTERM)[0] == 0


# ---------------------------------------------------------------- links and origins
def test_links_are_resolved_when_used(app):
    """A link in the export folder leading out, a linked prompts file, an opened image replaced by a link."""
    outside = app.root / "outside"
    outside.mkdir()
    (outside / "notes.json").write_text('{"secret": 1}')
    export = app.root / "export"
    (export / "sub").mkdir(parents=True, exist_ok=True)
    (export / "sub" / "yolo").symlink_to(outside)
    (export / "linked").mkdir()
    (export / "linked" / "truck.prompts.json").symlink_to(outside / "notes.json")
    with app.client() as client:
        response = client.post("/api/export", json={"folder": "sub", "formats": ["png", "yolo"],
                                                    "images": [{"image": TRUCK, "objects": [{"mask": square_mask()}]}]})
        assert response.status_code == 403, response.text
        response = client.get(f"/api/images/{TRUCK}/prompts", params={"folder": "linked"})
        assert response.status_code == 403 and "secret" not in response.text
        assert client.get(f"/api/images/{VICTIM}/file").status_code == 200
        victim = app.root / "photos" / "victim.png"
        victim.unlink()
        victim.symlink_to(app.root / "private" / "secret.png")
        response = client.get(f"/api/images/{VICTIM}/file")
        assert response.status_code == 403, response.status_code
    assert list(outside.iterdir()) == [outside / "notes.json"]


def test_requests_from_other_origins_are_refused(app):
    port = int(app.base.rsplit(":", 1)[1])
    own, other = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
    body = {"image": TRUCK, "points": [WINDOW], "labels": [1]}
    with app.client() as client:
        assert client.post("/api/decode", json=body, headers={"Origin": own}).status_code == 200
        assert client.post("/api/decode", json=body, headers={"Origin": f"http://localhost:{port}"}).status_code == 200
        for origin in (other, "http://attacker.example", "null", f"https://127.0.0.1:{port}"):
            response = client.post("/api/decode", json=body, headers={"Origin": origin})
            assert response.status_code == 403 and "origin" in response.json()["error"], origin
        page = client.get("/static/index.html")
        assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    url = f"ws://127.0.0.1:{port}/api/hover?token={app.token}"
    with connect(url, origin=own) as stream:
        stream.send(json.dumps({"seq": 1, "image": TRUCK, "x": 10, "y": 10}))
        assert "seq" in json.loads(stream.recv(timeout=60))
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=other).close()
    assert refused.value.response.status_code == 403


def test_half_sent_requests_are_closed(app):
    """A connection that sends half a request head, or nothing, is closed within seconds; a body that stops
    half-way is answered 408 within its 20 s (slow-loris)."""
    host, port = app.base.removeprefix("http://").split(":")
    for half in (b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(half)
            start = time.monotonic()
            assert raw.recv(1024) == b""  # closed by the server, before the 30 s timeout
            assert time.monotonic() - start < 15
    with socket.create_connection((host, int(port)), timeout=40) as raw:  # a body that stops half-way: 408
        raw.sendall(f"POST /api/decode HTTP/1.1\r\nHost: 127.0.0.1\r\nX-SAM-Token: {app.token}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"image\": ".encode())
        start = time.monotonic()
        answer, chunk = b"", b"start"
        while chunk and b'"error"' not in answer:  # the head and the body may come in two segments
            chunk = raw.recv(4096)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer, answer
        assert time.monotonic() - start < 35
