"""A folder of images in the ImageFolder layout, listed and checked before anything is
decoded or compiled:

    DIR/train/<class>/*.{jpg,jpeg,png}
    DIR/val/<class>/*.{jpg,jpeg,png}

Class indices are the sorted class folder names, as torchvision's ImageFolder numbers
them; the files of a class are in sorted order. Refused, naming the folder or file: a
missing split, a class folder with no image, train and val with different classes, a file
that is not a JPEG or PNG by its name (hidden files, whose names start with '.', are
skipped). `check_headers` reads each file's header (format and size, not the pixels): the
cheap check of what the names promise.
"""
import dataclasses
import os

from robust_admm.data.formats import DataError
from robust_admm.data.images import EXTENSIONS, MAX_PIXELS, is_image_name, open_image

SPLITS = ("train", "val")
HEADER_BYTES = 1 << 16  # enough for a JPEG's or PNG's size and format


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: file paths and their class indices, in order."""
    paths: tuple
    labels: tuple

    def __len__(self) -> int:
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    root: str
    classes: tuple  # class folder names, sorted; a class's index is its position
    train: FolderSplit
    val: FolderSplit

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _class_folders(split_dir: str) -> list:
    names = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir} holds no class folder; expected "
                        f"{split_dir}/<class>/<image files>")
    return names


def _list_split(split_dir: str, classes: list) -> FolderSplit:
    paths, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files = sorted(e.name for e in os.scandir(folder)
                       if not e.name.startswith(".") and not e.is_dir())
        for f in files:
            if not is_image_name(f):
                raise DataError(f"{os.path.join(folder, f)} is not an image by its name; a "
                                f"class folder holds only {', '.join(EXTENSIONS)} files")
        if not files:
            raise DataError(f"class folder {folder} holds no image")
        paths += [os.path.join(folder, f) for f in files]
        labels += [index] * len(files)
    return FolderSplit(tuple(paths), tuple(labels))


def list_image_folder(root: str) -> ImageFolder:
    """The image folder at `root`, listed and checked (names only, no file is opened)."""
    if not root or not os.path.isdir(root):
        raise DataError(f"data.dir={root!r} is not a folder; an image folder holds "
                        f"train/<class>/* and val/<class>/*")
    split_classes = {}
    for split in SPLITS:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"{root} has no {split}/ folder; an image folder holds "
                            f"train/<class>/* and val/<class>/*")
        split_classes[split] = _class_folders(path)
    train, val = split_classes["train"], split_classes["val"]
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataError(f"{root}: train and val have different classes: only in train "
                        f"{only_train or 'none'}, only in val {only_val or 'none'}")
    return ImageFolder(root=root, classes=tuple(train),
                       train=_list_split(os.path.join(root, "train"), train),
                       val=_list_split(os.path.join(root, "val"), train))


def check_headers(paths, max_pixels: int = MAX_PIXELS) -> int:
    """Reads the header of every file in `paths`: each must be a JPEG or PNG within the
    pixel cap; returns the count checked. A `DataError` names the first bad file."""
    count = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
                try:
                    open_image(head, path, max_pixels)
                except DataError:  # a header past the first bytes (large metadata)?
                    open_image(head + f.read(), path, max_pixels)
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
        count += 1
    return count
