"""Decoding and junk classification (ctxrepro.data.images): every junk kind from a real file made here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import jpeg_bytes, photo
from PIL import Image

from ctxrepro.data.images import REASONS, JunkImage, decode_rgb, draft_size, open_jpeg, read_rgb, sniff_format


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def open_path(path):
    with open(path, "rb") as f:
        im = open_jpeg(f)
        return decode_rgb(im, None)


@pytest.mark.parametrize("head, kind", [
    (b"", "empty"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
    (b"GIF89a\x01\x00", "gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
    (b"II*\x00\x08\x00", "tiff"),
    (b"BM\x36\x00", "bmp"),
    (b"hello world", "unknown"),
    (b"\xff\xd8", "unknown"),  # SOI without the next marker's 0xff: too short to call a JPEG
])
def test_sniff_format(head, kind):
    assert sniff_format(head) == kind


def test_rgb_jpeg_decodes_unconverted(tmp_path):
    path = write(tmp_path / "a.JPEG", jpeg_bytes(photo(64, 48)))
    d = open_path(path)
    assert d.rgb.shape == (48, 64, 3) and d.rgb.dtype == np.uint8 and d.converted_from is None


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    # CMYK (0, 255, 255, 0) is pure red: no cyan, full magenta and yellow, no black.
    buf = io.BytesIO()
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    path = write(tmp_path / "cmyk.JPEG", buf.getvalue())
    with open(path, "rb") as f:
        assert open_jpeg(f).mode == "CMYK"  # the file really is a CMYK JPEG
    d = open_path(path)
    assert d.converted_from == "CMYK" and d.rgb.shape == (48, 64, 3)
    assert np.abs(d.rgb.reshape(-1, 3).mean(0) - [255, 0, 0]).max() < 3


def test_grayscale_jpeg_is_converted_to_rgb(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (40, 32), 77).save(buf, format="JPEG", quality=95)
    d = open_path(write(tmp_path / "gray.JPEG", buf.getvalue()))
    assert d.converted_from == "L" and d.rgb.shape == (32, 40, 3)
    assert np.abs(d.rgb.astype(int) - 77).max() <= 1


def reason_of(path) -> str:
    with pytest.raises(JunkImage) as info:
        open_path(path)
    assert info.value.reason in REASONS
    return info.value.reason


def test_png_named_jpeg_is_junk(tmp_path):
    path = tmp_path / "n02105855_2933.JPEG"
    photo(32, 32).save(path, format="PNG")
    assert reason_of(path) == "png_named_jpeg"


def test_gif_named_jpeg_is_other_format(tmp_path):
    path = tmp_path / "x.JPEG"
    photo(32, 32).convert("P").save(path, format="GIF")
    assert reason_of(path) == "other_format"


@pytest.mark.parametrize("keep", [0.5, -2])  # half the file; everything but the end-of-image marker
def test_truncated_jpeg_is_junk(tmp_path, keep):
    data = jpeg_bytes(photo(120, 90))
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    assert reason_of(write(tmp_path / "t.JPEG", data[:cut])) == "truncated"


def test_truncated_header_is_junk(tmp_path):
    data = jpeg_bytes(photo(120, 90))
    assert reason_of(write(tmp_path / "t.JPEG", data[:100])) == "truncated"


def test_random_bytes_are_corrupt(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    assert reason_of(write(tmp_path / "r.JPEG", b"\x00" + noise)) == "corrupt"


def test_damaged_frame_header_is_corrupt(tmp_path):
    # A real JPEG whose SOF0 frame header (precision, height, width) is zeroed: no image size to decode.
    data = bytearray(jpeg_bytes(photo(120, 90)))
    sof = data.index(b"\xff\xc0")
    data[sof + 4:sof + 9] = bytes(5)
    assert reason_of(write(tmp_path / "m.JPEG", bytes(data))) == "corrupt"


def test_empty_file_is_junk(tmp_path):
    assert reason_of(write(tmp_path / "e.JPEG", b"")) == "empty"


def test_junk_detail_names_no_path_or_address(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes()
    path = write(tmp_path / "m.JPEG", b"\xff\xd8\xff" + noise)
    with pytest.raises(JunkImage) as info:
        open_path(path)
    assert str(tmp_path) not in info.value.detail and "0x" not in info.value.detail


def test_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="unknown junk reason"):
        JunkImage("bad_vibes")


@pytest.mark.parametrize("size, target, gap, want", [
    ((1600, 1200), (400, 300), 2.0, (800, 600)),  # shrinks 4x: 2x by DCT scaling leaves 2x to resample
    ((1599, 1200), (400, 300), 2.0, None),  # just under 2 * 2x on one side
    ((1600, 1200), (400, 300), 1.0, (400, 300)),
    ((500, 375), (560, 420), 2.0, None),  # enlarging never drafts
])
def test_draft_size(size, target, gap, want):
    assert draft_size(size, target, gap) == want


def test_draft_decodes_at_reduced_dct_scale(tmp_path):
    path = write(tmp_path / "big.JPEG", jpeg_bytes(photo(1600, 1200)))
    with open(path, "rb") as f:
        d = decode_rgb(open_jpeg(f), (800, 600))
    assert d.rgb.shape == (600, 800, 3)  # libjpeg's 1/2 scale: exactly half of each side
    with open(path, "rb") as f:
        full = decode_rgb(open_jpeg(f), None)
    # DCT scaling is a low-pass: it matches 2x2 block means of the full decode closely
    means = full.rgb.reshape(600, 2, 800, 2, 3).mean(axis=(1, 3))
    assert np.abs(d.rgb - means).mean() < 3


def test_read_rgb_converts_and_names_unreadable_files(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(cmyk, quality=100)  # pure red in CMYK
    rgb = read_rgb(cmyk)
    assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    assert rgb[..., 0].min() > 240 and rgb[..., 1:].max() < 15
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode .*bad\.jpg"):
        read_rgb(bad)
