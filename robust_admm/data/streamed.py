"""Datasets too large to keep on a device, opened for the streamed path: an image folder
(`data.source=folder`, the ImageFolder layout) or the ArrayRecord shards `robust-admm
shards` writes from one (`data.source=shards`). Both give, per split, random access to
(image bytes, label, where); the class count comes from the data, the image size from the
config. Everything that can be checked cheaply is checked here, before anything compiles:
the listing, and for a folder every file's header (format and pixel count).
"""
import dataclasses
import time

import jax

from robust_admm.data import folder as folder_lib
from robust_admm.data import shards as shards_lib
from robust_admm.data.formats import DataError
from robust_admm.data.images import MAX_PIXELS
from robust_admm.data.stream import FolderSource
from robust_admm.runtime import parallel

STREAMED_SOURCES = ("folder", "shards")


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
    name: str
    source: str
    root: str
    classes: tuple
    train: object  # random access: __len__, __getitem__ -> (bytes, label, where)
    test: object

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_streamed(name: str, source: str, root: str, check_headers: bool = True,
                  max_pixels: int = MAX_PIXELS, log=print) -> StreamedDataset:
    """The dataset at `root` read as `source` (one of STREAMED_SOURCES); a folder's
    headers are read when `check_headers` (shards were checked when written), each
    process reading every process_count-th file's, all failing if one finds a bad one."""
    if source not in STREAMED_SOURCES:
        raise ValueError(f"data.source={source!r} is not streamed; allowed: "
                         f"{', '.join(STREAMED_SOURCES)}")
    if not root:
        raise DataError(f"data.source={source!r} needs data.dir, the folder of the "
                        f"{'images' if source == 'folder' else 'shards'}")
    if source == "shards":
        classes, splits = shards_lib.open_shards(root)
        return StreamedDataset(name, source, root, tuple(classes), splits["train"],
                               splits["val"])
    listing = folder_lib.list_image_folder(root)
    if check_headers:
        t0 = time.time()
        paths = listing.train.paths + listing.val.paths
        mine = paths[jax.process_index()::jax.process_count()]
        try:
            folder_lib.check_headers(mine, max_pixels)
        except DataError:
            parallel.all_processes_agree(False)
            raise
        if not parallel.all_processes_agree(True):
            raise DataError(f"{root}: another process found a file it cannot read (its log "
                            f"names it)")
        log(f"checked the headers of {len(paths)} images in {root} in "
            f"{time.time() - t0:.1f} s")
    return StreamedDataset(name, source, root, listing.classes,
                           FolderSource(listing.train), FolderSource(listing.val))


def describe_streamed(ds: StreamedDataset, size: int) -> str:
    return (f"{ds.name}: {len(ds.train)} train / {len(ds.test)} val images in {ds.root} "
            f"({ds.source}), {ds.num_classes} classes, read at {size}x{size} px")


@dataclasses.dataclass(frozen=True)
class FirstRecords:
    """The first `count` records of a random-access source."""
    source: object
    count: int

    def __len__(self) -> int:
        return min(self.count, len(self.source))

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self.source[index]
