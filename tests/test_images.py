"""Image files: decoding every colour mode to RGB, refusing bad files by name, the
preprocessing crops (against analytic cases and properties), and the ImageFolder
listing. Every image is made in the test."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import make_folder, rgb_noise
from robust_admm.data import DataError
from robust_admm.data import images as im
from robust_admm.data.folder import check_headers, list_image_folder


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- decoding

def test_lossless_rgb_png_decodes_to_its_pixels():
    a = rgb_noise(13, 21)
    out = np.asarray(im.decode(encode(Image.fromarray(a), "PNG"), "x.png"))
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("L", "JPEG"), ("P", "PNG"),
                                      ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("1", "PNG")])
def test_every_colour_mode_becomes_rgb(mode, fmt):
    a = rgb_noise(9, 11, seed=1)
    src = Image.fromarray(a)
    if mode == "I;16":
        gray = np.asarray(src.convert("L"), np.uint16) * 257  # the full 16-bit range
        src = Image.frombytes("I;16", (11, 9), gray.astype("<u2").tobytes())
    else:
        src = src.convert(mode)
    out = im.decode(encode(src, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (11, 9)
    arr = np.asarray(out)
    if mode in ("L", "LA", "I;16", "1"):  # gray: three equal channels
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped at 255
        np.testing.assert_array_equal(arr[..., 0], np.asarray(Image.fromarray(a).convert("L")))
    if mode == "RGBA":  # alpha dropped, colour kept
        np.testing.assert_array_equal(arr, a)


def test_a_non_image_file_is_refused_naming_it():
    with pytest.raises(DataError, match=r"notes\.jpg: not a readable image"):
        im.decode(b"just some text, not pixels\n" * 10, "notes.jpg")


def test_a_gif_is_refused_naming_the_formats_allowed():
    gif = encode(Image.fromarray(rgb_noise(4, 4)).convert("P"), "GIF")
    with pytest.raises(DataError, match=r"a\.gif: a GIF image; allowed: JPEG, PNG"):
        im.decode(gif, "a.gif")


def test_a_truncated_jpeg_is_refused_when_decoded():
    data = encode(Image.fromarray(rgb_noise(64, 64)), "JPEG", quality=90)
    im.open_image(data[:len(data) // 2], "cut.jpg")  # the header is intact ...
    with pytest.raises(DataError, match=r"cut\.jpg: the image data cannot be decoded"):
        im.decode(data[:len(data) // 2], "cut.jpg")  # ... the pixels are not


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is empty: opening it reads
    the header only, so a bomb is caught without allocating its pixels."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_an_image_above_the_pixel_cap_is_refused_before_decoding():
    bomb = png_header_claiming(100_000, 100_000)  # 10 gigapixels: 30 GB decoded
    with pytest.raises(DataError, match=r"bomb\.png: 100000 x 100000 = 10,000,000,000 "
                                        r"pixels|bomb\.png: Image size"):
        im.decode(bomb, "bomb.png")
    small = encode(Image.fromarray(rgb_noise(100, 60)), "PNG")
    with pytest.raises(DataError, match=r"60 x 100 = 6,000 pixels, above the cap of 5,000"):
        im.decode(small, "s.png", max_pixels=5000)
    assert im.decode(small, "s.png", max_pixels=6000).size == (60, 100)


# ----------------------------------------------------------------------------- crops

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(0, 2**31 - 1))
def test_a_random_resized_crop_lies_inside_with_its_area_and_ratio(height, width, seed):
    top, left, h, w = im.random_resized_crop_box(np.random.default_rng(seed), height, width)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert h >= 1 and w >= 1
    # Either a draw (area and ratio within range, up to the rounding of h and w) or the
    # fallback: a centred crop as large as the ratio range allows.
    area, aspect = h * w / (height * width), w / h
    slack_area = (h + w + 1) / (height * width)
    drawn = (im.SCALE[0] - slack_area <= area <= im.SCALE[1] + slack_area
             and im.RATIO[0] * (1 - 1 / h) - 1 / h <= aspect <= im.RATIO[1] * (1 + 1 / h) + 1 / h)
    centred = top == (height - h) // 2 and left == (width - w) // 2
    assert drawn or centred


def test_the_fallback_is_the_largest_centred_crop_in_the_ratio_range():
    """A 10 x 1000 strip: no draw of area >= 8% fits in ten tries with ratio <= 4/3, so
    the crop is centred, the full height, width round(10 * 4/3) = 13."""
    rng = np.random.default_rng(0)
    assert im.random_resized_crop_box(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert im.random_resized_crop_box(rng, 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


def test_a_record_sees_the_same_pixels_whenever_it_is_read():
    img = Image.fromarray(rgb_noise(50, 70, seed=3))
    a = im.train_transform(img, 32, im.record_rng(7, 2, 41))
    b = im.train_transform(img, 32, im.record_rng(7, 2, 41))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    others = [im.train_transform(img, 32, im.record_rng(*k)) for k in
              ((7, 2, 42), (7, 3, 41), (8, 2, 41))]
    assert all(not np.array_equal(a, o) for o in others)
    with pytest.raises(ValueError, match=r"epoch=-1 must be an integer >= 0"):
        im.record_rng(0, -1, 0)


def test_the_training_crop_flips_half_the_records():
    """A left-dark, right-light image: a crop keeps the order of dark and light unless it
    is flipped; over 400 records about half are flipped."""
    a = np.zeros((40, 40, 3), np.uint8)
    a[:, 20:] = 255
    img = Image.fromarray(a)
    flipped = spanning = 0
    for i in range(400):
        # The transform draws its box first, from the same stream.
        top, left, h, w = im.random_resized_crop_box(im.record_rng(0, 0, i), 40, 40)
        if not (left < 20 < left + w):  # one colour only: no order to see
            continue
        out = im.train_transform(img, 16, im.record_rng(0, 0, i)).astype(int)
        spanning += 1
        flipped += out[:, 0].mean() > out[:, -1].mean()
    assert spanning > 100 and abs(flipped / spanning - 0.5) < 0.1, (flipped, spanning)


@pytest.mark.parametrize("width,height,size", [(300, 200, 64), (200, 300, 64),
                                               (256, 256, 224), (500, 375, 224)])
def test_the_evaluation_crop_against_a_linear_ramp(width, height, size):
    """On a horizontal ramp (value = slope x column), an antialiased bilinear resize and
    a centre crop leave the ramp's value at each output column's centre, mapped back
    through the resize: checks the short side, the truncated long side and the offset."""
    slope = 255 / (width - 1)
    ramp = np.round(np.arange(width) * slope)[None, :].repeat(height, 0)
    img = Image.fromarray(np.repeat(ramp[..., None], 3, 2).astype(np.uint8))
    out = im.eval_transform(img, size)
    assert out.shape == (size, size, 3)
    short = int(round(size * 256 / 224))
    new_w = short if width <= height else int(short * width / height)
    left = int(round((new_w - size) / 2.0))
    scale = width / new_w
    cols = np.arange(size) + left
    want = ((cols + 0.5) * scale - 0.5) * slope  # the ramp where the column centre samples
    inner = slice(2, size - 2)  # away from the image's borders, where the filter is clipped
    np.testing.assert_allclose(out[size // 2, inner, 0], want[inner], atol=1.01)


# ----------------------------------------------------------------------------- folders

def test_classes_are_numbered_by_sorted_folder_name(tmp_path):
    root = make_folder(str(tmp_path))
    open(os.path.join(root, "train", "cat", ".DS_Store"), "w").close()  # hidden: skipped
    f = list_image_folder(root)
    assert f.classes == ("ant", "cat", "dog") and f.num_classes == 3
    assert f.train.labels == (0, 0, 1, 1, 2, 2) and len(f.val) == 6
    assert f.train.paths[2] == os.path.join(root, "train", "cat", "0.png")
    assert check_headers(f.train.paths + f.val.paths) == 12


def test_bad_folders_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        list_image_folder(str(tmp_path / "nowhere"))
    root = make_folder(str(tmp_path / "a"))
    os.rename(os.path.join(root, "val"), os.path.join(root, "valid"))
    with pytest.raises(DataError, match=r"has no val/ folder"):
        list_image_folder(root)
    root = make_folder(str(tmp_path / "b"))
    os.makedirs(os.path.join(root, "train", "bee"))
    with pytest.raises(DataError, match=r"only in train \['bee'\], only in val none"):
        list_image_folder(root)
    os.makedirs(os.path.join(root, "val", "bee"))
    with pytest.raises(DataError, match=r"class folder .*train/bee holds no image"):
        list_image_folder(root)
    root = make_folder(str(tmp_path / "c"))
    open(os.path.join(root, "val", "dog", "labels.txt"), "w").close()
    with pytest.raises(DataError, match=r"val/dog/labels\.txt is not an image by its name"):
        list_image_folder(root)


def test_headers_catch_a_misnamed_file_and_a_bomb(tmp_path):
    root = make_folder(str(tmp_path), fmt="JPEG")
    bad = os.path.join(root, "train", "cat", "9.jpg")
    with open(bad, "wb") as f:
        f.write(b"<html>not an image</html>")
    f = list_image_folder(root)  # names only: listed
    with pytest.raises(DataError, match=r"cat/9\.jpg: not a readable image"):
        check_headers(f.train.paths)
    with open(bad, "wb") as f:
        f.write(png_header_claiming(50_000, 50_000))
    with pytest.raises(DataError, match=r"cat/9\.jpg: .*(50000 x 50000|2500000000 pixels)"):
        check_headers(list_image_folder(root).train.paths)


def test_a_header_after_large_metadata_is_still_read(tmp_path):
    """A JPEG whose size marker lies past the first 64 KiB (a large ICC profile)."""
    path = str(tmp_path / "big_meta.jpg")
    Image.fromarray(rgb_noise(16, 24)).save(path, format="JPEG",
                                            icc_profile=b"\0" * (200 << 10))
    assert os.path.getsize(path) > 200 << 10
    assert check_headers([path]) == 1
    assert im.read_image(path).size == (24, 16)


@given(st.integers(4, 40), st.integers(4, 40), st.integers(4, 40),
       st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
@settings(max_examples=25, deadline=None)
def test_resize_keeps_an_image_at_its_size_and_a_flat_one_flat(h, w, size, r, g, b):
    a = rgb_noise(h, w, seed=h * 41 + w)
    img = im.decode(encode(Image.fromarray(a), "PNG"), "x.png")
    out = im.resize_transform(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    if (h, w) == (size, size):
        np.testing.assert_array_equal(out, a)
    flat = Image.fromarray(np.full((h, w, 3), (r, g, b), np.uint8))
    np.testing.assert_array_equal(im.resize_transform(flat, size),
                                  np.full((size, size, 3), (r, g, b), np.uint8))


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 1), (7, 9, 3), (7, 9, 4)])
def test_a_decoded_array_becomes_rgb_as_its_file_would(shape):
    a = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    out = np.asarray(im.from_array(a, "rec 0"))
    mode = {2: "L", 1: "L", 3: "RGB", 4: "RGBA"}[len(shape) if len(shape) == 2 else shape[2]]
    src = Image.fromarray(a[..., 0] if shape[-1:] == (1,) else a, mode)
    np.testing.assert_array_equal(out, np.asarray(src.convert("RGB")))
    assert out.shape == (7, 9, 3)


@pytest.mark.parametrize("a,message", [
    (np.zeros((4, 4, 3), np.float32), "float32"),
    (np.zeros((4, 4, 2), np.uint8), r"\(4, 4, 2\)"),
    (np.zeros((4,), np.uint8), r"\(4,\)"),
])
def test_a_bad_array_is_refused_naming_the_record(a, message):
    with pytest.raises(DataError, match=f"rec 3: .*{message}"):
        im.from_array(a, "rec 3")


def test_an_array_above_the_pixel_cap_is_refused():
    with pytest.raises(DataError, match="rec 4: 10 x 10 pixels, above the cap of 99"):
        im.from_array(np.zeros((10, 10, 3), np.uint8), "rec 4", max_pixels=99)
    assert im.from_array(np.zeros((9, 11, 3), np.uint8), "rec 5", max_pixels=99).size == (11, 9)


def test_a_gray_png_read_in_one_channel_keeps_its_exact_values():
    """A grayscale file (MNIST written as PNGs) through RGB and back to one channel:
    the luma weights sum to one, so every value is the file's."""
    from robust_admm.data.stream import Preprocess
    a = np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8)
    data = encode(Image.fromarray(a, "L"), "PNG")
    out = Preprocess(28, False, crops="resize", channels=1)((0, 0, (data, 3, "x.png")))
    assert out["image"].shape == (28, 28, 1) and out["label"] == 3 and out["valid"]
    np.testing.assert_array_equal(out["image"][..., 0], a)
    rgb = rgb_noise(5, 6)
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    gray = im.to_gray(rgb)[..., 0].astype(np.int64)
    expected = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    np.testing.assert_array_equal(gray, expected)
    with pytest.raises(ValueError, match="data.channels=2"):
        Preprocess(28, False, channels=2)
