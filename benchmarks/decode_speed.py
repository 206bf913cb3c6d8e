"""Decoded-and-augmented images per second per core: the host work of a streamed ImageNet
input pipeline (robust_admm/data/images.py), on generated JPEGs of ImageNet's typical size.

    python benchmarks/decode_speed.py [--n 300] [--size 224] [--repeats 3]
    python benchmarks/decode_speed.py --stream --workers 0,1,2 --threads 1,2 [--n 512]

Generates `--n` JPEGs (quality 90, sizes drawn around 400 x 350, smooth random content so
they compress as photos do), then times, in one process on one core (the process is pinned
to one CPU where the OS allows), each decoder the machine has:

- `pil`: PIL's decoder, the project's (`images.decode`), then `train_transform`
  (RandomResizedCrop + flip) and, separately, `eval_transform`;
- `pil-draft`: PIL with JPEG DCT downscaling where the crop allows (not used by the
  project: it changes pixels);
- `simplejpeg` (libjpeg-turbo), if installed (`pip install simplejpeg`; not a dependency).

Prints one line per decoder and transform: medians of `--repeats` passes in images/s.

`--stream` instead writes the JPEGs as an image folder and times the project's streamed
reader (data/stream.py: sampler, decode, RandomResizedCrop + flip, batches) with each
worker count of `--workers` (0: in the main process) and thread count of `--threads`, on
all the machine's cores: images/s after the first batch, and the peak resident memory of
the main process and of its workers (ru_maxrss).
"""
import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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


def stream_rate(folder: str, workers: int, batch: int, size: int, threads: int) -> dict:
    """The streamed reader over the folder's train split, one epoch, `workers` workers of
    `threads` threads."""
    from robust_admm.data.folder import list_image_folder
    from robust_admm.data.sampler import IndexSampler
    from robust_admm.data.stream import FolderSource, Preprocess, local_batches
    source = FolderSource(list_image_folder(folder).train)
    sampler = IndexSampler(len(source), batch, seed=0)
    steps = sampler.steps_per_epoch
    it = local_batches(source, sampler, Preprocess(size, True), 0, steps, num_workers=workers,
                       num_threads=threads)
    t = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in it)
    rate = n / (time.perf_counter() - t)
    del first
    return {"img_per_s": rate, "first_batch_s": t_first,
            "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def stream_main(args):
    with tempfile.TemporaryDirectory() as root:
        rng_files = generate(args.n)
        for split in ("train", "val"):
            for c in range(4):
                os.makedirs(os.path.join(root, split, f"c{c}"))
        for i, data in enumerate(rng_files):
            for split in ("train", "val") if i < 8 else ("train",):
                with open(os.path.join(root, split, f"c{i % 4}", f"{i:05d}.jpg"), "wb") as f:
                    f.write(data)
        print(f"{args.n} JPEGs (mean {np.mean([len(f) for f in rng_files]) / 1024:.0f} KiB) "
              f"in a folder; batch {args.batch}, output {args.size} px, "
              f"{os.cpu_count()} cores")
        for w in [int(v) for v in args.workers.split(",")]:
            for t in [int(v) for v in args.threads.split(",")]:
                # Each setting in a fresh process: its peak memory is its own.
                out = subprocess.run([sys.executable, __file__, "--_one", root, str(w),
                                      str(args.batch), str(args.size), str(t)],
                                     capture_output=True, text=True, check=True)
                print(f"RESULT stream workers={w} threads={t} "
                      f"{out.stdout.strip().splitlines()[-1]}")


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "--_one":
        r = stream_rate(sys.argv[2], *map(int, sys.argv[3:7]))
        print(" ".join(f"{k}={v:.1f}" for k, v in r.items()))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="time the streamed reader")
    p.add_argument("--workers", default="0,1,2", help="--stream: worker counts to time")
    p.add_argument("--threads", default="1,2", help="--stream: threads per reader to time")
    p.add_argument("--batch", type=int, default=64, help="--stream: local batch")
    args = p.parse_args()
    if args.stream:
        return stream_main(args)
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
