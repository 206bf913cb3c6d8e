"""Data: the file formats read from disk (`formats`), datasets by name and source
(`sources`), how batches are drawn on the device (`batching`), and the streamed path:
image files decoded and cropped (`images`), folders of images in the ImageFolder layout
(`folder`), which records each process reads at each step (`sampler`) and the worker
processes that read them (`stream`). Host-side numpy, PIL and grain, plus the pure
functions a compiled step uses to pick and convert its batch."""
from robust_admm.data.formats import DataError, read_cifar10_batch, read_idx
from robust_admm.data.sources import (DATASETS, SOURCES, Dataset, Split, describe,
                                      input_shape, load_dataset)

__all__ = ["DATASETS", "SOURCES", "DataError", "Dataset", "Split", "describe", "input_shape",
           "load_dataset", "read_cifar10_batch", "read_idx"]
