"""Image reading conversions, RLE and box-format round trips, class maps."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cvkit.data.boxes import BOX_FORMATS, box_problem, convert_boxes, from_xyxy, to_xyxy
from cvkit.data.io import (
    DataError,
    ImageReadError,
    load_class_map,
    read_image,
    read_image_info,
    read_mask,
    save_class_map,
)
from cvkit.data.rle import masks_from_rle, masks_to_rle_frame, rle_decode, rle_encode


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
