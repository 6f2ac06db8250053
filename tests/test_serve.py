"""examples/serve.py over real HTTP on 127.0.0.1: predictions as JSON, bad input answered with a 4xx."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

for _module in ("onnx", "onnxruntime", "fastapi", "uvicorn", "multipart"):
    pytest.importorskip(_module, reason="the service needs the 'export' extra (onnx, onnxruntime, fastapi, uvicorn, "
                                        "python-multipart)")

from cvkit.config import load_experiment  # noqa: E402
from cvkit.training import run as run_experiment  # noqa: E402
from cvkit.export import export_run  # noqa: E402
from cvkit.inference.runtime import predict_exported  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny classification run exported to ONNX and served by examples/serve.py; stopped at the end."""
    root = tmp_path_factory.mktemp("serve")
    config = load_experiment(ROOT / "examples" / "configs" / "classification_demo.yaml", [
        f"logdir={root / 'run'}", f"data.root={root / 'demo_data'}", "data.per_class=5", "data.limit=32",
        "stages.0.epochs=1", "stages.1.epochs=1"])
    run_experiment(config, verbose=False)
    model = export_run(root / "run", "onnx").path
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "serve.py"), str(model), "--port", str(port),
                               "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve.py did not start: {server.stdout.read().decode()[-2000:]}") from None
                time.sleep(0.3)
        yield {"url": url, "model": model, "images": root / "demo_data" / "classification_5_per_class"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def _post(url: str, data: bytes, content_type: str) -> tuple:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _multipart(name: str, data: bytes) -> tuple:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_health_names_the_task(served):
    with urllib.request.urlopen(served["url"] + "/health", timeout=10) as response:
        body = json.loads(response.read())
    assert response.status == 200 and body["status"] == "ok" and body["task"] == "classification"


def test_posted_images_get_the_same_prediction_as_the_submission(served, tmp_path):
    table = pd.read_csv(served["images"] / "test.csv").head(3)
    expected = predict_exported(served["model"], served["images"] / "test.csv", probs=True).head(3)
    for (_, row), (_, want) in zip(table.iterrows(), expected.iterrows()):
        data = (served["images"] / row["path"]).read_bytes()
        status, body = _post(served["url"] + "/predict", data, "image/jpeg")
        assert status == 200 and body["rows"][0]["label"] == want["label"]
        probs = [c for c in expected.columns if c.startswith("prob_")]
        assert np.allclose([body["rows"][0][c] for c in probs], want[probs].to_numpy(float), atol=1e-6)
        status, multipart = _post(served["url"] + "/predict", *_multipart("x.jpg", data))
        assert status == 200 and multipart["rows"] == [{**body["rows"][0], "path": "x.jpg"}]


def test_bad_input_gets_a_4xx_with_a_message(served):
    url = served["url"] + "/predict"
    status, body = _post(url, b"hello", "text/plain")
    assert status == 415 and "content type 'text/plain'" in body["error"]
    status, body = _post(url, b"not an image at all", "image/png")
    assert status == 400 and "not a readable image" in body["error"]
    big = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8))[1].tobytes()
    assert len(big) > MAX_BYTES
    status, body = _post(url, big, "image/png")
    assert status == 413 and "over the limit" in body["error"]
    status, body = _post(url, *_multipart("x.png", big))
    assert status == 413
    status, body = _post(url, b"", "image/png")
    assert status == 400


def test_an_image_over_the_pixel_cap_is_refused_from_its_header_and_never_a_500(served):
    import struct
    import zlib

    url = served["url"] + "/predict"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    small = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()
    sof = small.find(b"\xff\xc0")
    jpeg = small[:sof + 5] + struct.pack(">HH", 65_500, 65_500) + small[sof + 9:]
    wide = cv2.imencode(".png", np.zeros((1000, 1001, 3), np.uint8))[1].tobytes()  # real, small file, 1,001,000 px
    for data, size in ((png, "100000x100000"), (jpeg, "65500x65500"), (wide, "1001x1000")):
        for status, body in (_post(url, data, "image/png"), _post(url, *_multipart("x.png", data))):
            assert status == 413 and f"claims a {size} image" in body["error"], body
            assert f"over the cap of {MAX_PIXELS:,} pixels" in body["error"]
    good = (served["images"] / pd.read_csv(served["images"] / "test.csv")["path"][0]).read_bytes()
    for data, message in ((good[:len(good) // 2], "truncated"), (b"", "not a readable image (0 bytes)"),
                          (b"GIF89a" + bytes(20) + b";", "not a readable GIF"), (b"\x89PNG\r\n\x1a\n", "truncated")):
        status, body = _post(url, data, "application/octet-stream")
        assert status == 400 and message in body["error"], (status, body)
    status, body = _post(url, b"--x\r\nnot really multipart", "multipart/form-data; boundary=x")
    assert 400 <= status < 500, (status, body)
