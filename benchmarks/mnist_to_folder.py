"""Writes MNIST (the original IDX files) as a folder of PNGs in the ImageFolder layout, for
checking the streamed input path on real data against the IDX path with the same recipe.

    python benchmarks/mnist_to_folder.py --idx ../shared/data/mnist --out /tmp/mnist_png \
        [--shards /tmp/mnist_shards]

DIR/train/<digit>/<index>.png (60,000) and DIR/val/<digit>/<index>.png (the 10,000 test
images), 8-bit grayscale, file names zero-padded so that sorted order is the IDX order
within a class; with --shards, also the folder as ArrayRecord shards.
"""
import argparse
import os
import time

from PIL import Image

from robust_admm.data import load_dataset
from robust_admm.data.folder import list_image_folder
from robust_admm.data.shards import write_shards


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idx", required=True, help="folder of the four IDX files (plain or .gz)")
    p.add_argument("--out", required=True, help="a new folder for the PNGs")
    p.add_argument("--shards", default="", help="also write the folder as shards here")
    args = p.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; give a new folder")
    ds = load_dataset("mnist", "files", args.idx)
    t = time.time()
    for split, part in (("train", ds.train), ("val", ds.test)):
        for digit in range(10):
            os.makedirs(os.path.join(args.out, split, str(digit)))
        for i, (image, label) in enumerate(zip(part.images, part.labels)):
            Image.fromarray(image[..., 0]).save(
                os.path.join(args.out, split, str(label), f"{i:05d}.png"))
    print(f"wrote {len(ds.train) + len(ds.test)} PNGs to {args.out} in {time.time() - t:.0f} s")
    if args.shards:
        write_shards(list_image_folder(args.out), args.shards)


if __name__ == "__main__":
    main()
