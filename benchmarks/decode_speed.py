"""Decoded-and-augmented images per second per core: the host work of a streamed ImageNet
input pipeline (robust_admm/data/images.py), on generated JPEGs of ImageNet's typical size.

    python benchmarks/decode_speed.py [--n 300] [--size 224] [--repeats 3]

Generates `--n` JPEGs (quality 90, sizes drawn around 400 x 350, smooth random content so
they compress as photos do), then times, in one process on one core (the process is pinned
to one CPU where the OS allows), each decoder the machine has:

- `pil`: PIL's decoder, the project's (`images.decode`), then `train_transform`
  (RandomResizedCrop + flip) and, separately, `eval_transform`;
- `pil-draft`: PIL with JPEG DCT downscaling where the crop allows (not used by the
  project: it changes pixels);
- `simplejpeg` (libjpeg-turbo), if installed (`pip install simplejpeg`; not a dependency).

Prints one line per decoder and transform: medians of `--repeats` passes in images/s.
"""
import argparse
import io
import os
import statistics
import time

import numpy as np
from PIL import Image

from robust_admm.data import images as im


def generate(n: int, seed: int = 0) -> list:
    """`n` JPEG files' bytes, about 400 x 350, photo-like: noise upscaled 2x, which
    compresses to about ImageNet's 110 KB per image at quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.normal(400, 60)), int(rng.normal(350, 50))
        w, h = max(w, 160), max(h, 160)
        small = rng.integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def time_it(fn, files, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i, data in enumerate(files):
            fn(i, data)
        rates.append(len(files) / (time.perf_counter() - t))
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    files = generate(args.n)
    mean_kb = np.mean([len(f) for f in files]) / 1024
    print(f"{args.n} JPEGs, mean {mean_kb:.0f} KiB; output {args.size} px; one core")
    size = args.size

    def pil_decode(i, data):
        return im.decode(data, "x.jpg")

    def pil_train(i, data):
        return im.train_transform(im.decode(data, "x.jpg"), size, im.record_rng(0, 0, i))

    def pil_eval(i, data):
        return im.eval_transform(im.decode(data, "x.jpg"), size)

    def draft_train(i, data):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))  # DCT scaling: at most halves while >= size
        return im.train_transform(img.convert("RGB"), size, im.record_rng(0, 0, i))

    rows = [("pil", "decode only", pil_decode), ("pil", "train (crop+flip)", pil_train),
            ("pil", "eval (resize+centre)", pil_eval),
            ("pil-draft", "train (crop+flip)", draft_train)]
    try:
        import simplejpeg

        def sj_train(i, data):
            img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
            return im.train_transform(img, size, im.record_rng(0, 0, i))

        def sj_decode(i, data):
            return simplejpeg.decode_jpeg(data, colorspace="RGB")

        rows += [("simplejpeg", "decode only", sj_decode),
                 ("simplejpeg", "train (crop+flip)", sj_train)]
    except ImportError:
        print("simplejpeg: not installed (pip install simplejpeg to compare it)")
    for decoder, what, fn in rows:
        fn(0, files[0])  # warm
        rate = time_it(fn, files, args.repeats)
        print(f"RESULT decoder={decoder} work={what!r} img_per_s_per_core={rate:.0f}")


if __name__ == "__main__":
    main()
