"""Header-only image sizes, reduced (DCT-scaled) JPEG decoding and the decode scale a crop affords."""
from __future__ import annotations

import importlib.util
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvkit.data.io import ImageHeader, ImageReadError, decode_scale, image_header, image_size, read_image

H, W = 479, 641  # odd on both sides: every reduced size is a ceil
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _picture(height: int = H, width: int = W) -> np.ndarray:
    """A BGR image whose four corners differ, so a rotation or flip shows."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x // 37 + y // 23) % 2 * 200], axis=-1).astype(np.uint8)
    image[:40, :60] = (0, 0, 255)
    return image


def _jpeg(image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    return buf.tobytes()


def _tiff(orientation: int, little: bool = False, kind: int = 3) -> bytes:
    """TIFF-structured EXIF data whose IFD0 holds only the Orientation tag."""
    order = "<" if little else ">"
    value = struct.pack(order + "HH", orientation, 0) if kind == 3 else struct.pack(order + "I", orientation)
    return ((b"II*\x00" if little else b"MM\x00*") + struct.pack(order + "IH", 8, 1)
            + struct.pack(order + "HHI", 0x0112, kind, 1) + value + struct.pack(order + "I", 0))


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _with_exif(jpeg: bytes, tiff: bytes, before: bytes = b"\xff\xe0") -> bytes:
    """``jpeg`` with an Exif APP1 segment inserted before the first ``before`` marker."""
    at = jpeg.index(before)
    return jpeg[:at] + _segment(0xE1, b"Exif\x00\x00" + tiff) + jpeg[at:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _files(tmp_path: Path) -> dict:
    """name -> (path, expected ImageHeader) for every header layout the reader must handle."""
    base = _jpeg(_picture())
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03"  # a SOF inside APP data must not count
    big_app = _segment(0xE2, (fake_sof * 6600)[:65000]) + _segment(0xE3, fake_sof * 600)
    png = cv2.imencode(".png", _picture())[1].tobytes()
    iend = png.rindex(b"IEND") - 4
    layouts = {
        "baseline.jpg": (base, (H, W, 1, "jpeg")),
        "progressive.jpg": (_jpeg(_picture(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1), (H, W, 1, "jpeg")),
        "gray.jpg": (_jpeg(_picture()[..., 1]), (H, W, 1, "jpeg")),
        "exif6.jpg": (_with_exif(base, _tiff(6)), (W, H, 6, "jpeg")),
        "exif3.jpg": (_with_exif(base, _tiff(3)), (H, W, 3, "jpeg")),
        "exif8_intel.jpg": (_with_exif(base, _tiff(8, little=True)), (W, H, 8, "jpeg")),
        "exif6_after_sof.jpg": (_with_exif(base, _tiff(6), before=b"\xff\xda"), (W, H, 6, "jpeg")),
        "exif_out_of_range.jpg": (_with_exif(base, _tiff(9)), (H, W, 1, "jpeg")),
        "xmp_then_exif6.jpg": (base[:2] + _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x/>")
                               + _with_exif(base, _tiff(6))[2:], (W, H, 6, "jpeg")),
        "big_app.jpg": (base[:2] + big_app + base[2:], (H, W, 1, "jpeg")),
        "rgb.png": (png, (H, W, 1, "png")),
        "gray.png": (cv2.imencode(".png", _picture()[..., 0])[1].tobytes(), (H, W, 1, "png")),
        "deep.png": (cv2.imencode(".png", _picture().astype(np.uint16) * 257)[1].tobytes(), (H, W, 1, "png")),
        "exif6_after_idat.png": (png[:iend] + _png_chunk(b"eXIf", _tiff(6)) + png[iend:], (W, H, 6, "png")),
    }
    assert layouts["big_app.jpg"][0].index(b"\xff\xc0\x00\x11\x08\x01\xdf") > 70_000  # the real SOF: 479 rows
    return {name: (_write(tmp_path, name, data), ImageHeader(*expected)) for name, (data, expected) in layouts.items()}


def test_header_gives_the_size_read_image_returns(tmp_path):
    for name, (path, expected) in _files(tmp_path).items():
        assert image_header(path) == expected, name
        assert image_size(path) == read_image(path).shape[:2], name


@pytest.mark.parametrize("name, data", [
    ("picture.bmp", cv2.imencode(".bmp", _picture(20, 30))[1].tobytes()),
    ("picture.gif", b"GIF89a\x1e\x00\x14\x00\x00\x00\x00;"),
    ("garbage.jpg", b"\xff\xd8 this is not a JPEG at all"),
    ("text.png", b"just some text, no image"),
    ("cut_header.jpg", _jpeg(_picture(20, 30))[:100]),
    ("cut_header.png", cv2.imencode(".png", _picture(20, 30))[1].tobytes()[:20]),
    ("exif_long.jpg", _with_exif(_jpeg(_picture(20, 30)), _tiff(6, kind=4))),  # OpenCV reads a LONG oddly
    ("empty.jpg", b""),
])
def test_header_is_none_where_only_a_full_decode_can_tell(tmp_path, name, data):
    assert image_header(_write(tmp_path, name, data)) is None
    assert image_size(tmp_path / name) is None
    assert image_size(tmp_path / "missing.jpg") is None


class _CountingFile:
    """A binary file that counts the bytes read from it."""

    def __init__(self, path: Path, mode: str, buffering: int = -1) -> None:
        self.raw = open(path, mode, buffering=buffering)
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.read_bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def __enter__(self) -> "_CountingFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


def test_header_reads_a_few_kilobytes_not_the_file(tmp_path, monkeypatch):
    opened = []

    def counting_open(path, mode="r", buffering=-1):
        opened.append(_CountingFile(path, mode, buffering))
        return opened[-1]

    monkeypatch.setattr("cvkit.data.io.open", counting_open, raising=False)
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    png = _write(tmp_path, "noise.png", cv2.imencode(".png", noise)[1].tobytes())
    jpeg = _write(tmp_path, "noise.jpg", _jpeg(noise))
    big_app = _files(tmp_path)["big_app.jpg"][0]
    for path, most in ((png, 80_000), (jpeg, 64 * 1024), (big_app, 70 * 1024)):
        assert image_size(path) == read_image(path).shape[:2]
        assert path.stat().st_size > 70_000 and opened[-1].read_bytes <= most, path.name


def _cv2_reduced_rgb(path: Path, reduce: int) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), _REDUCED[reduce])[..., ::-1]


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_jpeg_is_opencvs_own_reduced_decode_with_ceil_shape(tmp_path, reduce):
    files = _files(tmp_path)
    for name in ("baseline.jpg", "progressive.jpg", "gray.jpg", "exif6.jpg", "exif3.jpg"):
        path, header = files[name]
        image = read_image(path, reduce=reduce)
        assert image.dtype == np.uint8 and image.shape == (-(-header.height // reduce), -(-header.width // reduce), 3)
        assert np.array_equal(image, _cv2_reduced_rgb(path, reduce)), name
        assert np.array_equal(read_image(path, reduce=reduce, header=image_header(path)), image), name
    assert read_image(files["baseline.jpg"][0], reduce=2).shape == (240, 321, 3)
    assert read_image(files["baseline.jpg"][0], reduce=8).shape == (60, 81, 3)
    upright = read_image(files["baseline.jpg"][0], reduce=reduce)
    # EXIF 6 = the stored image turned 90 degrees clockwise, 3 = turned 180: as in the full decode
    assert np.array_equal(read_image(files["exif6.jpg"][0], reduce=reduce), np.rot90(upright, k=-1))
    assert np.array_equal(read_image(files["exif3.jpg"][0], reduce=reduce), np.rot90(upright, k=2))


def _block_mean(image: np.ndarray, reduce: int) -> np.ndarray:
    """Reference: the mean of each reduce x reduce block, edge pixels repeated past the border."""
    height, width = image.shape[:2]
    rows, cols = -(-height // reduce), -(-width // reduce)
    pad = ((0, rows * reduce - height), (0, cols * reduce - width), (0, 0))
    padded = np.pad(image.astype(np.float64), pad, mode="edge")
    return padded.reshape(rows, reduce, cols, reduce, 3).mean(axis=(1, 3))


def _china() -> Path:
    """scikit-learn's sample photo, found without importing scikit-learn (seconds on a busy machine)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn is not installed")
    return Path(spec.origin).parent / "datasets" / "images" / "china.jpg"




@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_photo_is_close_to_area_averaging_the_full_decode(reduce):
    """china.jpg (427 x 640, a real photo) decoded at 1/reduce against the block means of its full decode.

    Measured mean abs difference 0.42 / 0.42 / 0.43 grey levels (reduce 2 / 4 / 8; OpenCV 5.0.0,
    libjpeg-turbo 3.1.2). The reference is ``INTER_AREA`` on the full decode padded to a multiple of
    ``reduce``: libjpeg scales by 8 x 8 blocks, so pixel i stands for source rows [r*i, r*i + r).
    A plain INTER_AREA resize of 427 rows to 214 drifts by up to a row: 5.2 / 2.6 / 6.1 there.
    """
    path = _china()
    full = read_image(path)
    reduced = read_image(path, reduce=reduce)
    reference = _block_mean(full, reduce)
    assert reduced.shape == reference.shape
    assert np.abs(reduced - reference).mean() < 0.6


@pytest.mark.parametrize("reduce", [2, 4])
def test_other_formats_are_block_averaged_to_the_same_contract(tmp_path, reduce):
    """A PNG or GIF gives the block means of its full decode, and about what the JPEG of it gives."""
    photo = read_image(_china())[3:422, 5:638]  # 419 x 633: neither side a multiple of 8
    png = tmp_path / "photo.png"
    cv2.imwrite(str(png), photo[..., ::-1])
    reduced = read_image(png, reduce=reduce)
    assert reduced.shape == (-(-419 // reduce), -(-633 // reduce), 3)
    assert np.abs(reduced - _block_mean(photo, reduce)).max() <= 1  # rounding only
    jpeg = _write(tmp_path, "photo.jpg", _jpeg(photo[..., ::-1], cv2.IMWRITE_JPEG_QUALITY, 95))
    assert np.abs(reduced.astype(int) - read_image(jpeg, reduce=reduce)).mean() < 1.5

    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(photo[:21, :30]).save(tmp_path / "small.gif")
    gif = read_image(tmp_path / "small.gif")
    assert np.array_equal(read_image(tmp_path / "small.gif", reduce=reduce),
                          cv2.resize(np.pad(gif, ((0, -21 % reduce), (0, -30 % reduce), (0, 0)), mode="edge"),
                                     (-(-30 // reduce), -(-21 // reduce)), interpolation=cv2.INTER_AREA))


def test_reduced_read_keeps_the_file_checks(tmp_path):
    jpeg = _jpeg(_picture(32, 32))
    cut = _write(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg") as info:
        read_image(cut, reduce=2)
    assert info.value.code == "truncated"
    with pytest.raises(ImageReadError, match="garbage.jpg") as info:
        read_image(_write(tmp_path, "garbage.jpg", b"\xff\xd8 not a JPEG \xff\xd9"), reduce=4)
    assert info.value.code == "unreadable"
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "missing.jpg", reduce=8)
    assert info.value.code == "missing_file"


@pytest.mark.parametrize("reduce", [3, 0, 16, 2.0, True])
def test_reduce_must_be_1_2_4_or_8(tmp_path, reduce):
    path = _write(tmp_path, "p.jpg", _jpeg(_picture(16, 16)))
    with pytest.raises(ValueError, match=f"reduce={reduce!r}"):
        read_image(path, reduce=reduce)


def test_decode_scale_never_upsamples():
    assert decode_scale((479, 641), (240, 321)) == 2  # ceil(479 / 2) = 240, ceil(641 / 2) = 321
    assert decode_scale((479, 641), (240.5, 1)) == 1
    assert decode_scale((479, 641), (60, 81)) == 8
    assert decode_scale((479, 641), (61, 81)) == 4
    assert decode_scale((479, 641), (1000, 1000)) == 1
    assert decode_scale((8, 8), (0.5, 0.5)) == 8
    rng = np.random.default_rng(0)
    for _ in range(200):
        source = tuple(int(v) for v in rng.integers(1, 3000, 2))
        needed = tuple(float(v) for v in rng.uniform(0.5, 1.2, 2) * np.array(source) / rng.choice([1, 2, 4, 8, 16]))
        scale = decode_scale(source, needed)
        fits = all(-(-side // scale) >= need for side, need in zip(source, needed))
        assert fits or (scale == 1 and any(side < need for side, need in zip(source, needed)))
        if scale < 8:
            assert any(-(-side // (2 * scale)) < need for side, need in zip(source, needed))
    with pytest.raises(ValueError, match=r"\(0, 5\)"):
        decode_scale((0, 5), (1, 1))
