"""Datasets too large to keep on a device, opened for the streamed path: an image folder
(`data.source=folder`, the ImageFolder layout), the ArrayRecord shards `robust-admm
shards` writes from one (`data.source=shards`), or a prepared TFDS dataset other than the
small ones kept on the device (`data.source=tfds`, e.g. `data.name=imagenet2012`). Each
gives, per split, random access to (image bytes or array, label, where); the class count comes from the data, the image size from the
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
from robust_admm.data.sources import DATASETS
from robust_admm.data.stream import FolderSource
from robust_admm.runtime import parallel

STREAMED_SOURCES = ("folder", "shards")
TFDS_TEST_SPLITS = ("validation", "test")  # a TFDS dataset's evaluation split, first found


def streamed(source: str, name: str) -> bool:
    """Whether (data.source, data.name) is read streamed: a folder, shards, or a TFDS
    dataset other than the small ones kept on the device (sources.DATASETS)."""
    return source in STREAMED_SOURCES or (source == "tfds" and name not in DATASETS)


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
    if not streamed(source, name):
        raise ValueError(f"data.source={source!r} with data.name={name!r} is not streamed")
    if source == "tfds":
        return open_tfds(name, root or None)
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
class SpreadRecords:
    """`count` records spread evenly over a random-access source (record i * len //
    count): a subset with every class in its share, where the first records of a folder
    or shards would all be of the first classes (they are in class order)."""
    source: object
    count: int

    def __len__(self) -> int:
        return min(self.count, len(self.source))

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self.source[index * len(self.source) // len(self)]


@dataclasses.dataclass
class TfdsSource:
    """Random access to one split of a prepared TFDS dataset: (image array, label,
    where), through `tfds.data_source` (which TFDS supports for ArrayRecord datasets)."""
    name: str
    split: str
    records: object
    image_key: str
    label_key: str

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        example = self.records[index]
        return (example[self.image_key], int(example[self.label_key]),
                f"TFDS {self.name} {self.split} record {index}")


def open_tfds(name: str, data_dir: str | None) -> StreamedDataset:
    """A prepared TFDS image-classification dataset (ImageNet: `imagenet2012`), read
    record by record; its train split and its validation (or test) split."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    where = data_dir or "TFDS's data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"data.name={name!r}: not a TFDS dataset ({type(e).__name__}: "
                        f"{e})") from None
    keys = builder.info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str)
                                                                for k in keys)):
        raise DataError(f"TFDS {name}: no (image, label) supervised keys "
                        f"({keys!r}); an image-classification dataset has them")
    image_key, label_key = keys
    classes = tuple(getattr(builder.info.features[label_key], "names", None) or ())
    if not classes:
        raise DataError(f"TFDS {name}: its {label_key!r} feature has no class names; an "
                        f"image-classification dataset's label is a ClassLabel")
    known = [s for s in TFDS_TEST_SPLITS if s in builder.info.splits]
    records = error = None
    for test in known or TFDS_TEST_SPLITS:  # not prepared: the splits are not known yet
        try:
            records = tfds.data_source(name, split={"train": "train", "test": test},
                                       data_dir=data_dir, download=False)
            break
        except Exception as e:  # pylint: disable=broad-except
            error = e
    if records is None:
        raise DataError(
            f"TFDS {name} in {where}: {type(error).__name__}: {error}. It must be prepared "
            f"(imagenet2012: its manual download in the manual_dir, as TFDS documents) "
            f"with a train split and a {' or '.join(TFDS_TEST_SPLITS)} split, in the "
            f"ArrayRecord format that record-by-record reading needs: `tfds build {name} "
            f"--file_format=array_record`")
    return StreamedDataset(name, "tfds", where, classes,
                           TfdsSource(name, "train", records["train"], image_key, label_key),
                           TfdsSource(name, test, records["test"], image_key, label_key))
