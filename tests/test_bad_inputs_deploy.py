"""Bad inputs on the deployment path, through the `cvkit` command in a subprocess (as a user runs it):
model files that are not what they claim, contracts that do not fit their model, export sizes and
tolerances out of range, and images whose header claims more pixels than the cap. Each is one line
on stderr naming the file or key, exit code 2, never a traceback; and no pickled code ever runs.
The readers' pixel cap is also tested directly, on crafted headers (no huge image is built)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List

import cv2
import numpy as np
import pytest

for _module in ("onnx", "onnxruntime"):
    pytest.importorskip(_module, reason="the exported path needs the 'export' extra (onnx, onnxruntime)")

from cvkit.config import load_experiment  # noqa: E402
from cvkit.data.io import (  # noqa: E402
    MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    decode_for_resize,
    read_image,
    read_image_for_resize,
    read_image_info,
    read_mask,
)
from cvkit.training import run as run_experiment  # noqa: E402
from cvkit.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE  # noqa: E402
from cvkit.export import export_run  # noqa: E402
from cvkit.inference.runtime import contract_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from cvkit.cli import main; sys.exit(main())"  # what the console script runs


def png_claiming(width: int, height: int) -> bytes:
    """A complete, tiny PNG whose IHDR claims ``width`` x ``height`` (its pixel data is far too short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 is rewritten to claim ``width`` x ``height``."""
    data = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()
    sof = data.find(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def gif_claiming(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 16 + b";"


class OpensAFile:
    """A pickle whose loading creates ``path``: proof that the bytes were unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def cvkit(*args: str, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, every needle in it."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[str, Path]:
    """A tiny classification run (10 classes) exported to ONNX and TorchScript, and its test table."""
    root = tmp_path_factory.mktemp("deploy")
    config = load_experiment(ROOT / "examples" / "configs" / "classification_demo.yaml", [
        f"logdir={root / 'run'}", f"data.root={root / 'demo_data'}", "data.per_class=3", "data.limit=16",
        "stages.0.epochs=1", "stages.1.epochs=1"])
    run_experiment(config, verbose=False)
    return {"onnx": export_run(root / "run", "onnx").path, "torchscript": export_run(root / "run", "torchscript").path,
            "run": root / "run", "images": root / "demo_data" / "classification_3_per_class" / "test.csv"}


def _copy(exported: Dict[str, Path], folder: Path, fmt: str, name: str) -> Path:
    """The exported model of ``fmt`` and its contract copied as ``folder/name``."""
    folder.mkdir(exist_ok=True)
    target = folder / name
    shutil.copyfile(exported[fmt], target)
    shutil.copyfile(contract_path(exported[fmt]), contract_path(target))
    return target


# --- model files that are not what they claim: one line naming the file, nothing unpickled -----------

MODEL_FILES: Dict[str, tuple] = {
    # id: (format whose contract goes beside it, file name, bytes from (good model bytes, sentinel), message)
    "truncated-onnx": ("onnx", "model.onnx", lambda good, s: good[:2000], "does not parse as an ONNX model"),
    "random-onnx": ("onnx", "model.onnx", lambda good, s: np.random.default_rng(0).bytes(5000),
                    "does not parse as an ONNX model"),
    "empty-onnx": ("onnx", "model.onnx", lambda good, s: b"", "is empty (0 bytes)"),
    "pickle-onnx": ("onnx", "model.onnx", lambda good, s: pickle.dumps(OpensAFile(s)), "is a Python pickle"),
    "torchscript-as-onnx": ("onnx", "model.onnx", None, "is a zip archive"),
    "pickle-pt": ("torchscript", "model.pt", lambda good, s: pickle.dumps(OpensAFile(s)), "is a Python pickle"),
    "torch-save-pt": ("torchscript", "model.pt", None, "not a TorchScript archive"),
    "random-pt": ("torchscript", "model.pt", lambda good, s: np.random.default_rng(0).bytes(5000),
                  "is not a zip archive"),
    "truncated-pt": ("torchscript", "model.pt", lambda good, s: good[:5000], "a damaged zip archive"),
}


@pytest.mark.parametrize("case", list(MODEL_FILES))
def test_a_bad_model_file_is_one_line_naming_it(exported, tmp_path, case):
    import torch

    fmt, name, make, message = MODEL_FILES[case]
    model = _copy(exported, tmp_path, fmt, name)
    sentinel = tmp_path / "unpickled"
    if case == "torchscript-as-onnx":
        shutil.copyfile(exported["torchscript"], model)
    elif case == "torch-save-pt":
        torch.save({"model": OpensAFile(sentinel)}, model)
    else:
        model.write_bytes(make(exported[fmt].read_bytes(), sentinel))
    done = cvkit("predict", "--model", str(model), "--images", str(exported["images"]), "--out",
                 str(tmp_path / "s.csv"))
    assert_one_line(done, str(model), message, "cvkit export")
    assert not sentinel.exists(), "a model file was unpickled"
    assert not (tmp_path / "s.csv").exists()


# --- contracts that do not fit the model: one line naming the contract file and the key --------------

def _change(key: str, new: Callable[[Any], Any]) -> Callable[[dict], None]:
    """An edit of a contract: the value at the dotted ``key`` replaced by ``new(old value)``."""
    def edit(contract: dict) -> None:
        *path, last = key.split(".")
        node = contract
        for part in path:
            node = node[part]
        node[last] = new(node[last])
    return edit


def _edit(key: str, value: Any) -> Callable[[dict], None]:
    return _change(key, lambda old: value)


def _double(key: str) -> Callable[[dict], None]:
    return _change(key, lambda old: 2 * old)


CONTRACTS: Dict[str, tuple] = {
    "3-classes-for-10-outputs": ([_edit("classes", ["a", "b", "c"]), _edit("num_classes", 3)],
                                 "classes gives 3 classes, so output 'logits' expects 3 values per image, but the "
                                 "model outputs 10"),
    "classes-vs-num_classes": ([_edit("classes", ["a", "b", "c"])], "classes names 3 classes but num_classes is 10"),
    "input-size-not-the-models": ([_double("input.height"), _double("input.width"), _double("preprocess.resize.height"),
                                   _double("preprocess.resize.width")],
                                  "input.height is {2h}, but the model's input is fixed at {h}"),
    "resize-not-the-input": ([_double("preprocess.resize.height"), _double("preprocess.resize.width")],
                             "preprocess.resize is ({2h}, {2h}); expected the input size (height, width) ({h}, {h})"),
    "zero-std": ([_edit("preprocess.normalize.std", [0, 0, 0])], "preprocess.normalize.std is [0, 0, 0]"),
    "nan-std": ([_edit("preprocess.normalize.std", [0.2, float("nan"), 0.2])],
                "preprocess.normalize.std is [0.2, 'NaN', 0.2]; expected 3 finite numbers"),  # read as YAML
    "keypoints-on-a-classifier": ([_edit("output", "keypoints")],
                                  "output 'keypoints' is not the output layout of task 'classification'"),
    "wrong-output_shape": ([_edit("output_shape", [1, 12])], "output_shape is [1, 12], but the model gives"),
    "unknown-task": ([_edit("task", "clasification")], "task 'clasification' is not a registered task"),
}


@pytest.mark.parametrize("case", list(CONTRACTS))
def test_a_contract_that_does_not_fit_the_model_is_refused_before_any_image(exported, tmp_path, case):
    edits, message = CONTRACTS[case]
    model = _copy(exported, tmp_path, "onnx", "model.onnx")
    contract = json.loads(contract_path(model).read_text())
    size = contract["input"]["height"]  # the demo's square input size, whatever it is
    message = message.replace("{2h}", str(2 * size)).replace("{h}", str(size))
    for edit in edits:
        edit(contract)
    contract_path(model).write_text(json.dumps(contract))
    images = tmp_path / "images"  # not readable: the contract must be refused before any image is read
    images.mkdir()
    (images / "a.png").write_bytes(b"not an image")
    done = cvkit("predict", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "s.csv"))
    assert_one_line(done, f"{contract_path(model)}: ", message)


def test_the_service_refuses_a_bad_contract_at_start_in_one_line(exported, tmp_path):
    for module in ("fastapi", "uvicorn", "multipart"):
        pytest.importorskip(module, reason="the service needs the 'export' extra")
    model = _copy(exported, tmp_path, "onnx", "model.onnx")
    contract = json.loads(contract_path(model).read_text())
    contract["preprocess"]["normalize"]["std"] = [0, 0, 0]
    contract_path(model).write_text(json.dumps(contract))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "serve.py"), str(model), "--port", "9"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line(done, "model.onnx.json: preprocess.normalize.std is [0, 0, 0]")


# --- export arguments: refused at argument time -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--image-size", "60000"], f"value 60000: expected an image size in pixels from {MIN_IMAGE_SIZE} to "
                                f"{MAX_IMAGE_SIZE}"),
    (["--image-size", str(MIN_IMAGE_SIZE - 1)], f"value {MIN_IMAGE_SIZE - 1}: expected an image size in pixels"),
    (["--atol", "-1"], "argument --atol: '-1': expected a finite number >= 0"),
    (["--rtol", "nan"], "argument --rtol: 'nan': expected a finite number >= 0"),
], ids=["size-60000", "size-below-minimum", "atol-negative", "rtol-nan"])
def test_export_arguments_out_of_range_are_one_line(tmp_path, args, message):
    done = cvkit("export", str(tmp_path / "no-run"), *args)  # refused before the run is even looked at
    assert_one_line(done, message)


def test_export_help_states_the_size_range():
    done = cvkit("export", "--help")
    assert f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}" in " ".join(done.stdout.split())


# --- images over the pixel cap ------------------------------------------------------------------------

def test_predict_refuses_an_image_claiming_too_many_pixels(exported, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(next(exported["images"].parent.rglob("*.jpg")), images / "a.jpg")
    (images / "huge.png").write_bytes(png_claiming(100_000, 100_000))
    done = cvkit("predict", "--model", str(exported["onnx"]), "--images", str(images), "--out", str(tmp_path / "s.csv"))
    assert_one_line(done, "huge.png: the header claims a 100000x100000 image (10,000,000,000 pixels), over the cap "
                          f"of {MAX_IMAGE_PIXELS:,} pixels (set CVKIT_MAX_IMAGE_PIXELS to raise it)")
    (images / "huge.png").unlink()
    done = cvkit("predict", "--model", str(exported["onnx"]), "--images", str(images), "--out",
                 str(tmp_path / "s.csv"), env={"CVKIT_MAX_IMAGE_PIXELS": "100"})
    assert_one_line(done, "a.jpg: the header claims a", "over the cap of 100 pixels")
    done = cvkit("predict", "--model", str(exported["onnx"]), "--images", str(images), "--out",
                 str(tmp_path / "s.csv"), env={"CVKIT_MAX_IMAGE_PIXELS": "lots"})
    assert_one_line(done, "$CVKIT_MAX_IMAGE_PIXELS='lots': expected a positive whole number of pixels")


@pytest.mark.parametrize("data", [png_claiming(100_000, 100_000), jpeg_claiming(65_500, 65_500),
                                  gif_claiming(60_000, 60_000)], ids=["png", "jpeg", "gif"])
def test_every_reader_refuses_a_header_over_the_cap_before_decoding(tmp_path, data):
    path = tmp_path / "huge.img"
    path.write_bytes(data)
    readers = [lambda: read_image(path), lambda: read_image(path, reduce=8),
               lambda: read_image_for_resize(path, (48, 48)), lambda: decode_for_resize(data, (48, 48), "posted"),
               lambda: decode_for_resize(data, None, "posted"), lambda: read_image_info(path), lambda: read_mask(path)]
    for read in readers:
        with pytest.raises(ImageTooLargeError, match=r"(huge.img|posted): the header claims a \d+x\d+ image .* over "
                                                     r"the cap of 64,000,000 pixels") as info:
            read()
        assert info.value.code == "too_large" and "\n" not in str(info.value)


def test_the_cap_is_configurable_and_a_small_image_under_it_decodes(tmp_path, monkeypatch):
    data = cv2.imencode(".png", np.zeros((30, 40, 3), np.uint8))[1].tobytes()
    (tmp_path / "a.png").write_bytes(data)
    assert read_image(tmp_path / "a.png").shape == (30, 40, 3)
    with pytest.raises(ImageTooLargeError, match=r"a 40x30 image \(1,200 pixels\), over the cap of 1,000 pixels$"):
        decode_for_resize(data, (8, 8), "a.png", max_pixels=1000)
    monkeypatch.setenv("CVKIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageTooLargeError, match="over the cap of 1,000 pixels .set CVKIT_MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "a.png")
    assert read_image_for_resize(tmp_path / "a.png", (8, 8), max_pixels=1200)[1] == (30, 40)


@pytest.mark.parametrize("make, code", [
    (lambda good: good[: len(good) // 2], "truncated"),
    (lambda good: b"", "empty_file"),
    (lambda good: b"plain text, no image", "unreadable"),
], ids=["truncated-jpeg", "empty", "not-an-image"])
def test_posted_bytes_are_checked_as_files_are(make, code):
    good = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
    with pytest.raises(ImageReadError) as info:
        decode_for_resize(make(good), (32, 32), "posted")
    assert info.value.code == code and str(info.value).startswith("posted: ")


def test_headers_of_other_formats_give_the_claimed_size():
    from PIL import Image
    import io

    from cvkit.data.io import _claimed_size

    shapes: List[tuple] = []
    for fmt, options in (("WEBP", {"lossless": True}), ("WEBP", {"quality": 80}), ("BMP", {}), ("GIF", {})):
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(buffer, fmt, **options)
        shapes.append(_claimed_size(np.frombuffer(buffer.getvalue(), np.uint8)))
    assert shapes == [(37, 53)] * 4
