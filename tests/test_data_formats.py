"""Image reading conversions, RLE and box-format round trips, class maps."""
from __future__ import annotations

import io
import os

import cv2
import numpy as np
import pytest

from cvkit.data.boxes import BOX_FORMATS, box_problem, convert_boxes, from_xyxy, to_xyxy
from cvkit.data.io import (
    DataError,
    ImageReadError,
    NativeStderr,
    decoder_warning,
    jpeg_corruption,
    load_class_map,
    read_image,
    read_image_info,
    read_mask,
    save_class_map,
)
from cvkit.data.rle import masks_from_rle, masks_to_rle_frame, rle_decode, rle_encode, rle_table_problems


def test_read_image_converts_gray_rgba_and_16bit_predictably(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)

    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 0  # B, G, R, fully transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [30, 20, 10]  # RGB, alpha dropped
    assert read_image_info(tmp_path / "a.png")["mode"] == "RGBA"

    deep = np.array([[0, 255, 256, 1000, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert read_image(tmp_path / "d.png")[0, :, 1].tolist() == (deep[0] >> 8).tolist()
    info = read_image_info(tmp_path / "d.png")
    assert (info["width"], info["height"], info["channels"], info["mode"]) == (5, 1, 1, "L;16")


def test_read_image_names_empty_truncated_and_missing_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    expected = {"empty.jpg": "empty_file", "cut.jpg": "truncated", "text.png": "unreadable", "none.png": "missing_file"}
    for name, code in expected.items():
        with pytest.raises(ImageReadError, match=name) as info:
            read_image(tmp_path / name)
        assert info.value.code == code


def test_read_mask_rejects_colour_masks(tmp_path):
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), ids)
    assert np.array_equal(read_mask(tmp_path / "m.png"), ids)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([ids, ids, ids + 1]))
    with pytest.raises(ImageReadError, match="c.png: colour mask"):
        read_mask(tmp_path / "c.png")


def test_rle_round_trip_is_column_major_and_one_based():
    mask = np.zeros((4, 3), np.uint8)
    mask[1:3, 0] = 1  # pixels 2, 3 in column-major 1-based numbering
    mask[0, 1] = 1  # pixel 5
    mask[3, 1] = 1  # pixel 8, joined with column 2's first pixel 9 in one run
    mask[0, 2] = 1
    assert rle_encode(mask) == "2 2 5 1 8 2"
    assert np.array_equal(rle_decode("2 2 5 1 8 2", (4, 3)), mask)
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (rng.random((7, 11)) > 0.6).astype(np.uint8)
        assert np.array_equal(rle_decode(rle_encode(m), m.shape), m)
    assert rle_encode(np.zeros((3, 3))) == "" and not rle_decode(float("nan"), (3, 3)).any()


def test_rle_errors_name_the_row_and_multi_class_stacks_channels():
    with pytest.raises(DataError, match="train.csv row 4.*outside a 2x2 image"):
        rle_decode("3 5", (2, 2), where="train.csv row 4")
    with pytest.raises(DataError, match="start/length pairs"):
        rle_decode("1 2 3", (2, 2))
    masks = np.zeros((3, 3, 2), np.uint8)
    masks[0, 0, 0] = masks[2, 2, 1] = 1
    frame = masks_to_rle_frame({"a.jpg": masks})
    assert frame.values.tolist() == [["a.jpg", 1, "1 1"], ["a.jpg", 2, "9 1"]]
    back = masks_from_rle(zip(frame.ClassId, frame.EncodedPixels), (3, 3), 2)
    assert np.array_equal(back, masks)
    with pytest.raises(DataError, match="ClassId 3 outside 1..2"):
        masks_from_rle([(3, "1 1")], (3, 3), 2, where="x.csv")


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_box_formats_convert_both_ways(fmt):
    xyxy = np.array([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 100.0, 80.0]])
    there = from_xyxy(xyxy, fmt, 100, 80)
    assert np.allclose(to_xyxy(there, fmt, 100, 80), xyxy)
    assert np.allclose(convert_boxes(there, fmt, "xyxy_norm", 100, 80), xyxy / [100, 80, 100, 80])


def test_box_format_values_and_problems():
    assert from_xyxy([10, 20, 50, 40], "xywh", 100, 80).tolist() == [10, 20, 40, 20]
    assert from_xyxy([10, 20, 50, 40], "cxcywh_norm", 100, 80).tolist() == [0.3, 0.375, 0.4, 0.25]
    assert box_problem(np.array([5, 5, 10, 10]), 20, 20) == ""
    assert "inverted" in box_problem(np.array([10, 5, 5, 10]), 20, 20)
    assert "outside the 20x20 image" in box_problem(np.array([5, 5, 25, 10]), 20, 20)
    with pytest.raises(ValueError, match="unknown box format 'xy'"):
        to_xyxy([0, 0, 1, 1], "xy", 1, 1)


def test_class_map_round_trip_and_gaps(tmp_path):
    save_class_map(tmp_path / "encode_classes.json", {"cat": 1, "dog": 0})
    assert load_class_map(tmp_path / "encode_classes.json") == {"cat": 1, "dog": 0}
    (tmp_path / "bad.json").write_text('{"a": 0, "b": 2}')
    with pytest.raises(DataError, match="bad.json: indices \\[0, 2\\] are not 0..1"):
        load_class_map(tmp_path / "bad.json")


def test_rle_numbers_too_large_are_a_one_line_error_naming_the_row():
    for rle in ("1 " + "1" + "0" * 24, "1" + "0" * 24 + " 3"):  # used to raise OverflowError
        with pytest.raises(DataError) as info:
            rle_decode(rle, (4, 4), where="train.csv row 7")
        assert str(info.value).startswith("train.csv row 7: EncodedPixels holds 1000") and "\n" not in str(info.value)
    # within int64 but start + length would wrap around: still "outside", not a wrapped slice
    with pytest.raises(DataError, match="row 2: a run lies outside a 4x4 image"):
        rle_decode(f"3 {2**63 - 2}", (4, 4), where="row 2")
    with pytest.raises(DataError, match="x.csv: ClassId 'x' is not an integer; expected 1..2"):
        masks_from_rle([("x", "1 1")], (3, 3), 2, where="x.csv")
    assert masks_from_rle([("2", "1 1"), (1.0, "2 1")], (3, 3), 2)[..., 1][0, 0] == 1


def test_rle_table_problems_lists_every_bad_row():
    problems = rle_table_problems(["1", "x", 2, 3, "1.5", 1], ["1 2", "1 1", "1 " + "9" * 30, "1 1", "1 1", "5 1 2 1"], 2)
    assert problems == [
        "row 1: ClassId 'x' is not an integer; expected 1..2",
        f"row 2: EncodedPixels holds {'9' * 30} (30 digits), too large for a pixel index; expected start/length "
        "pairs within the image",
        "row 3: ClassId 3 outside 1..2",
        "row 4: ClassId '1.5' is not an integer; expected 1..2",
        "row 5: runs are not sorted or overlap; expected increasing starts",
    ]


@pytest.mark.parametrize("content, message", [
    ('{"a": 0, "c": 2}', r"bad.json: indices \[0, 2\] are not 0..1 without gaps \(index 1 is missing\)"),
    ('{"a": 0, "b": 0, "c": 1}', r"bad.json: index 0 is used by 2 labels \['a', 'b'\]; expected each of 0..2 exactly once"),
    ('{"a": 0, "b": true}', r"bad.json: index of 'b' is True; expected integer indices"),
    ('["a", "b"]', r"bad.json: holds a JSON list; expected an object"),
])
def test_class_map_files_with_gaps_or_repeats_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_class_map(tmp_path / "bad.json")
    assert "\n" not in str(info.value)


def _gif(frames) -> bytes:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


def test_gif_reads_its_first_frame_with_or_without_opencv_gif_support(tmp_path, monkeypatch):
    first = np.zeros((6, 8, 3), np.uint8)
    first[..., 0], first[..., 1], first[..., 2] = 200, 40, 10  # red-ish: catches an RGB/BGR swap
    second = np.full((6, 8, 3), 90, np.uint8)
    (tmp_path / "a.gif").write_bytes(_gif([first, second]))
    native = read_image(tmp_path / "a.gif")
    real_imdecode = cv2.imdecode

    def no_gif(data, flags):  # OpenCV before 4.11 has no GIF decoder
        return None if bytes(data[:4]) == b"GIF8" else real_imdecode(data, flags)

    monkeypatch.setattr(cv2, "imdecode", no_gif)
    fallback = read_image(tmp_path / "a.gif")
    assert fallback.shape == (6, 8, 3) and fallback.dtype == np.uint8
    assert fallback[0, 0].tolist() == [200, 40, 10] and np.array_equal(fallback, native)
    info = read_image_info(tmp_path / "a.gif")
    assert (info["width"], info["height"], info["channels"]) == (8, 6, 3)
    data = (tmp_path / "a.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(data[: len(data) - 20])
    with pytest.raises(ImageReadError, match="cut.gif: GIF is truncated") as info:
        read_image(tmp_path / "cut.gif")
    assert info.value.code == "truncated"


def corrupt_jpeg(good: bytes) -> bytes:
    """``good`` with 8 bytes in the middle of its entropy-coded data inverted; the FFD9 end stays."""
    data = bytearray(good)
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    middle = (start + len(data) - 2) // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    assert bytes(data[-2:]) == b"\xff\xd9"
    return bytes(data)


def textured_jpeg(seed: int = 0, shape=(48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (5, 5), 0)
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_decoder_warning_catches_a_corrupt_jpeg_that_decodes_silently(tmp_path, capfd):
    good = textured_jpeg()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "bad.jpg").write_bytes(corrupt_jpeg(good))
    damaged = read_image(tmp_path / "bad.jpg")  # no error: that is the problem
    assert np.abs(damaged.astype(int) - read_image(tmp_path / "good.jpg")).mean() > 2
    capfd.readouterr()
    assert decoder_warning(tmp_path / "good.jpg") is None
    assert decoder_warning(tmp_path / "bad.jpg").startswith("Corrupt JPEG data")
    cv2.imwrite(str(tmp_path / "p.png"), np.zeros((4, 4, 3), np.uint8))
    assert decoder_warning(tmp_path / "p.png") is None
    assert "Corrupt JPEG" not in capfd.readouterr().err, "the message was captured, not printed"


def test_native_stderr_capture_gives_back_what_is_not_libjpeg(capfd):
    with NativeStderr() as captured:
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\n")
        os.write(2, b"Corrupt JPEG data: 3 extraneous bytes before marker 0xd9\n")
        assert captured.size() > 0
    assert capfd.readouterr().err == ""
    captured.replay()
    assert capfd.readouterr().err == "libpng warning: iCCP: known incorrect sRGB profile\n"
    assert jpeg_corruption(captured.text) == "Corrupt JPEG data: 3 extraneous bytes before marker 0xd9"
