"""Decoding and preprocessing of image files (JPEG, PNG), as the standard ImageNet recipe
does it, on the host: uint8 RGB out, pixels scaled to [0, 1] inside the compiled step and
any normalisation inside the model, so attacks see pixel space.

- `decode`: any colour mode (grayscale, palette, CMYK, alpha, 16-bit) becomes RGB, as
  torchvision's loader converts it; an image whose header claims more than `max_pixels`
  pixels (a decompression bomb) is refused before it is decoded; an unreadable, truncated
  or non-image file is a `DataError` naming the file.
- `train_transform`: RandomResizedCrop (scale 0.08-1, aspect ratio 3/4-4/3, the crop drawn
  as torchvision draws it) resized to the size with bilinear filtering, then a horizontal
  flip with probability 1/2.
- `eval_transform`: the short side resized to `round(size * 256 / 224)`, then a centre crop.
- `resize_transform`: the whole image resized to the size, for training and evaluation
  alike (`data.crops='resize'`: images already framed, as digits are).

The randomness of a record comes from `record_rng(seed, epoch, index)`, pure in the three,
so a resumed run sees the same pixels. Written with PIL (Pillow), whose resampling
torchvision uses on PIL images; no library offers these steps as pure functions of a key.
"""
import io
import math
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from robust_admm.data.formats import DataError

# Above this many pixels an image is refused unread (PIL warns at 89.5 megapixels and
# refuses at twice that; the largest ImageNet training image has about 20 megapixels).
MAX_PIXELS = 89_478_485
FORMATS = ("JPEG", "PNG")  # what a folder of images may hold
# PIL's names for them: a camera's multi-picture JPEG opens as 'MPO' (its first picture).
PIL_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}
EXTENSIONS = (".jpg", ".jpeg", ".png")  # their file names, compared in lower case
SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction ...
RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio (width / height) ranges
EVAL_RESIZE = 256 / 224  # the short side before the centre crop, relative to the size
# What `data.crops` may be: 'imagenet' (train_transform / eval_transform) or 'resize'
# (resize_transform for both splits, no randomness).
CROPS = ("imagenet", "resize")
CHANNELS = (3, 1)  # what `data.channels` may be: RGB, or grayscale (to_gray)
RECORD_STREAM = 1  # the first word of a record's seed: apart from the order's (sampler.py)


def record_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of record `index` in `epoch` of a run seeded `seed`."""
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}={v!r} must be an integer >= 0")
    return np.random.default_rng([RECORD_STREAM, int(seed), int(epoch), int(index)])


def open_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image in `data` (the bytes of the file `where`), header read and checked
    (format, pixel count), not yet decoded."""
    try:
        with warnings.catch_warnings():  # the cap below decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # past PIL's own limit, before ours
        raise DataError(f"{where}: {e} A decompression bomb, or an image to downscale "
                        f"first.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if img.format not in PIL_FORMATS:
        raise DataError(f"{where}: a {img.format} image; allowed: {', '.join(FORMATS)}")
    width, height = img.size
    if width * height > max_pixels:
        raise DataError(f"{where}: {width} x {height} = {width * height:,} pixels, above the "
                        f"cap of {max_pixels:,} (data.max_pixels); a decompression bomb, "
                        f"or an image to downscale first")
    return img


def decode(data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image in `data` (the bytes of the file `where`), fully decoded."""
    img = open_image(data, where, max_pixels)
    try:
        img.load()
        if img.mode != "RGB":
            # 16-bit grayscale (a PNG opens as 'I;16' or 'I'): scaled to 8 bits first,
            # where convert('L') would clip it.
            if img.mode.startswith("I"):
                a = np.asarray(img, np.float64)
                img = Image.fromarray(np.round(a * 255.0 / 65535.0).astype(np.uint8))
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise DataError(f"{where}: the image data cannot be decoded ({type(e).__name__}: "
                        f"{e})") from None
    return img


def from_array(a, where: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image of an already decoded uint8 array (H, W), (H, W, 1), (H, W, 3) or
    (H, W, 4) (a TFDS record's image), checked as a file's would be."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3
                                                       and a.shape[2] not in (1, 3, 4)):
        raise DataError(f"{where}: an image array of shape {a.shape} and dtype {a.dtype}; "
                        f"expected uint8 (H, W) or (H, W, 1|3|4)")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise DataError(f"{where}: {a.shape[1]} x {a.shape[0]} pixels, above the cap of "
                        f"{max_pixels:,} (data.max_pixels)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return Image.fromarray(a).convert("RGB")


def read_bytes(path: str) -> bytes:
    """The bytes of the file at `path`; an error naming it if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`decode` of the file at `path`."""
    return decode(read_bytes(path), path, max_pixels)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a fraction in `scale` of the image's
    area with an aspect ratio (w / h) in `ratio`: ten tries, then the largest centred crop
    within the ratio range, as torchvision's RandomResizedCrop draws it."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], 3)


def train_transform(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop to `size` x `size`, then a horizontal flip with probability 1/2:
    uint8 (size, size, 3)."""
    width, height = img.size
    top, left, h, w = random_resized_crop_box(rng, height, width)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _as_array(out)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
    """The short side resized to round(size * 256 / 224) (the long side in proportion,
    truncated), then the centre `size` x `size` crop: uint8 (size, size, 3)."""
    width, height = img.size
    short = int(round(size * EVAL_RESIZE))
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    out = img.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return _as_array(out.crop((left, top, left + size, top + size)))


def resize_transform(img: Image.Image, size: int) -> np.ndarray:
    """The whole image resized to `size` x `size` (bilinear; unchanged at that size):
    uint8 (size, size, 3). For data whose images are already framed (digits), where a
    random crop or a flip would change what they show."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return _as_array(img)


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> grayscale (H, W, 1) by PIL's ITU-R 601-2 luma, whose weights
    sum to one: a gray image keeps its values exactly."""
    return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), np.uint8)[..., None]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS
