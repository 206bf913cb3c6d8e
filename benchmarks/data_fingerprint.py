"""Times the data fingerprint a run records (data/fingerprint.py): MNIST from its IDX files
(the arrays, hashed whole) and a generated folder of small JPEGs (one stat per file, the
contents whole or sampled).

    python benchmarks/data_fingerprint.py --idx ../shared/data/mnist --jpegs 10000

Prints the load and fingerprint times; the folder is timed with its files in the page
cache (just written) and, with --whole_bytes 0, in the sampled mode large sets use.
"""
import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from robust_admm.data import fingerprint, load_dataset
from robust_admm.data.folder import list_image_folder


def write_jpegs(root: str, count: int, side: int = 64, classes: int = 10):
    rng = np.random.default_rng(0)
    for i in range(count):
        split = "val" if i % 10 == 9 else "train"
        folder = os.path.join(root, split, f"c{(i // 10) % classes}")
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idx", default="", help="folder of the four MNIST IDX files")
    p.add_argument("--jpegs", type=int, default=10000, help="JPEGs in the generated folder")
    args = p.parse_args()
    if args.idx:
        t0 = time.perf_counter()
        ds = load_dataset("mnist", "files", args.idx)
        t1 = time.perf_counter()
        fp = fingerprint.of_arrays({"train": ds.train, "test": ds.test})
        t2 = time.perf_counter()
        print(f"MNIST IDX: load {t1 - t0:.2f} s, fingerprint {t2 - t1:.3f} s "
              f"({ds.train.images.nbytes + ds.test.images.nbytes:,} bytes of images); "
              f"train images {fp['train']['images_sha256'][:12]}")
    if args.jpegs:
        with tempfile.TemporaryDirectory() as root:
            write_jpegs(root, args.jpegs)
            listing = list_image_folder(root)
            splits = {"train": listing.train.paths, "val": listing.val.paths}
            size = sum(os.path.getsize(q) for s in splits.values() for q in s)
            for mode, whole in (("whole", fingerprint.WHOLE_BYTES), ("sampled", 0)):
                fingerprint.WHOLE_BYTES = whole
                t0 = time.perf_counter()
                fingerprint.of_files(splits, root)
                dt = time.perf_counter() - t0
                print(f"{args.jpegs} JPEGs ({size:,} bytes), {mode}: fingerprint {dt:.3f} s "
                      f"({1e6 * dt / args.jpegs:.0f} us per file)")


if __name__ == "__main__":
    main()
