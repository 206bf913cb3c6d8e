"""Fuzzed image files (PNG: RGB, 16-bit grayscale, palette; JPEG) and image-shard records,
mutated from valid ones, are decoded to an RGB image of the size their header states (a
record: to what a reference parser of its format reads), or refused with a DataError
naming the file; never another exception or a hang (tests/fuzz_support.py).
PIL allocates in C, where the allocation bound cannot see: the header's pixel cap
(`images.MAX_PIXELS`) is what bounds it, checked here on headers claiming huge sizes."""
import io

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from fuzz_support import fuzz_settings, mutated_bytes, outcome
from robust_admm.data import images, shards

RNG = np.random.default_rng(0)
WHERE = "folder/class_a/img.png"


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(array)
    out = io.BytesIO()
    (img.convert(mode) if mode else img).save(out, format=fmt)
    return out.getvalue()


VALID = {
    "png_rgb": _encode(RNG.integers(0, 256, (10, 12, 3), np.uint8), "PNG"),
    "png_gray16": _encode(RNG.integers(0, 65536, (9, 7), np.uint16), "PNG"),
    "png_palette": _encode(RNG.integers(0, 256, (8, 8, 3), np.uint8), "PNG", mode="P"),
    "jpeg": _encode(RNG.integers(0, 256, (16, 16, 3), np.uint8), "JPEG"),
}
# PNG: width and height in the IHDR chunk (bytes 16-24); JPEG: a baseline SOF0's height and
# width follow its marker (found below).
PNG_FIELDS = [(16, 4), (20, 4), (24, 1), (25, 1)]


def _jpeg_fields(data: bytes):
    at = data.find(b"\xff\xc0")
    return [(at + 5, 2), (at + 7, 2), (at + 9, 1)]


def check_decoded(data: bytes):
    img = outcome(lambda: images.decode(data, WHERE, max_pixels=1 << 20), [WHERE])
    if img is not None:
        a = np.asarray(img)
        assert img.mode == "RGB" and a.dtype == np.uint8
        assert a.shape == (img.size[1], img.size[0], 3)


@given(st.sampled_from(["png_rgb", "png_gray16", "png_palette"]).flatmap(
    lambda k: mutated_bytes(VALID[k], fields=PNG_FIELDS)))
@example(VALID["png_rgb"][:40])  # cut inside the first chunk after IHDR
@example(VALID["png_rgb"][:16] + (60000).to_bytes(4, "big") * 2 + VALID["png_rgb"][24:])
@fuzz_settings()
def test_png(data):
    check_decoded(data)


@given(mutated_bytes(VALID["jpeg"], fields=_jpeg_fields(VALID["jpeg"])))
@example(VALID["jpeg"][:len(VALID["jpeg"]) // 2])  # truncated scan data
@fuzz_settings()
def test_jpeg(data):
    check_decoded(data)


def test_the_valid_files_decode_to_their_pixels():
    rgb = np.asarray(images.decode(VALID["png_rgb"], WHERE))
    np.testing.assert_array_equal(rgb, np.asarray(Image.open(io.BytesIO(VALID["png_rgb"]))))
    assert np.asarray(images.decode(VALID["jpeg"], WHERE)).shape == (16, 16, 3)


# ----------------------------------------------------------------------------- shard records

RECORD = shards.encode_record(3, "class_a/img_0001.png", VALID["png_rgb"])
RECORD_WHERE = "shards/train-00000-of-00001.array_record, record 7"


def reference_record(blob: bytes, num_classes: int):
    """(image bytes, label, name) of a record as the format defines it (magic b'RADM',
    version 1, little-endian uint32 label, uint16 name length, the UTF-8 name, the
    image), or None where the blob is not one."""
    if len(blob) < 11 or blob[:4] != b"RADM" or blob[4] != 1:
        return None
    label = int.from_bytes(blob[5:9], "little")
    length = int.from_bytes(blob[9:11], "little")
    if label >= num_classes or 11 + length > len(blob):
        return None
    try:
        name = blob[11:11 + length].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return blob[11 + length:], label, name


@given(mutated_bytes(RECORD, fields=[(0, 4), (4, 1), (5, 4), (9, 2)]))
@fuzz_settings()
def test_shard_record(blob):
    got = outcome(lambda: shards.decode_record(blob, RECORD_WHERE, 10), [RECORD_WHERE])
    assert got == reference_record(blob, 10)
    if got is not None:  # the image inside is checked as a file's would be
        check_decoded(got[0])


def test_a_valid_record_reads_back():
    assert shards.decode_record(RECORD, RECORD_WHERE, 10) == (VALID["png_rgb"], 3,
                                                              "class_a/img_0001.png")
