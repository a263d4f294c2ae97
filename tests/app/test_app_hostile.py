"""``sam-mlx app`` under careless and hostile clients (issue 32), against a real server process on 127.0.0.1.

Each test holds a rule a client cannot break: no Nagle stall on a kept-open connection, a stop that stops,
bounded requests, one-line JSON errors, an export that is one set, paths resolved at use and same-origin
requests only. Loops are bounded; timings are bounds only a defect breaks, never speed measurements.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest
from app_process import served

DOG, TRUCK = 0, 1  # the photos folder's images, in name order
WINDOW = [500.0, 375.0]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served(tmp_path_factory.mktemp("hostile"), ready=(TRUCK,)) as running:
        yield running


def connection(app) -> http.client.HTTPConnection:
    host, port = app.base.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


# ---------------------------------------------------------------- latency
def test_no_nagle_stall_on_a_kept_open_connection(app):
    """Requests after the first on one keep-alive connection do not wait for a delayed ACK (~40 ms each)."""
    link = connection(app)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        link.request("GET", "/api/info", headers={"X-SAM-Token": app.token})
        response = link.getresponse()
        assert response.status == 200 and json.loads(response.read())["version"]
        times.append((time.perf_counter() - start) * 1e3)
    link.close()
    assert statistics.median(times[1:]) < 20, times
