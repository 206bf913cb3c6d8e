"""Your own arrays (`data.source='npz'`, data/npz.py): what is read, checked against the
arrays written, and every bad input refused with an error naming the array and the value."""
import pickle
import zipfile

import numpy as np
import pytest

from robust_admm.data import DataError, input_shape, load_dataset
from robust_admm.data.npz import read_npz
from robust_admm.experiments import validation
from robust_admm.experiments.config_base import base_config


def arrays(n_train=12, n_test=5, shape=(6, 5, 3), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                y_train=rng.integers(0, classes, n_train),
                x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                y_test=np.arange(n_test) % classes)


def save(tmp_path, name="data.npz", **a):
    path = str(tmp_path / name)
    np.savez(path, **a)
    return path


def test_uint8_nhwc_reads_as_written_and_the_class_count_is_the_largest_label_plus_one(
        tmp_path):
    a = arrays()
    a["y_test"][-1] = 6  # a class only the test split has
    ds = load_dataset("mine", "npz", save(tmp_path, **a))
    np.testing.assert_array_equal(ds.train.images, a["x_train"])
    np.testing.assert_array_equal(ds.test.images, a["x_test"])
    np.testing.assert_array_equal(ds.train.labels, a["y_train"])
    assert ds.train.labels.dtype == np.int32 and ds.num_classes == 7 and ds.name == "mine"
    assert input_shape("mine", "npz", save(tmp_path, **a)) == ((6, 5, 3), 7)


def test_floats_on_the_1_255_grid_and_other_integers_become_the_same_uint8(tmp_path):
    """float32, float64 and float16 pixels k/255, and int64 pixels k, all read as the uint8
    k (the reference); NHW gains a channel axis."""
    a = arrays(shape=(4, 4))
    k = a["x_train"]
    for x in (k / 255.0, (k / 255.0).astype(np.float32), (k / np.float16(255)),
              k.astype(np.int64)):
        b = dict(a, x_train=x, x_test=a["x_test"].astype(np.int16))
        xtr, _, xte, _, _ = read_npz(save(tmp_path, **b))
        assert xtr.dtype == np.uint8 and xtr.shape == (12, 4, 4, 1)
        np.testing.assert_array_equal(xtr[..., 0], k)
        np.testing.assert_array_equal(xte[..., 0], a["x_test"])


BAD = [
    # (change to the good arrays, pattern of the error)
    (lambda a: a.pop("y_test"), r"lacks \['y_test'\]; it holds \['x_test', 'x_train', "
                                r"'y_train'\]"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "x_train holds 12 images but y_train "
                                                    "11 labels"),
    (lambda a: a.update(x_test=np.zeros((5, 6, 5, 1), np.uint8)),
     r"train images are \(6, 5, 3\) .* but test images \(6, 5, 1\)"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.complex64)), "x_train has dtype "
                                                                      "complex64"),
    (lambda a: a.update(x_train=a["x_train"].astype(bool)), "x_train has dtype bool"),
    (lambda a: a.update(x_train=a["x_train"].astype(str)), "x_train has dtype <U3"),
    (lambda a: a.update(x_test=np.full((5, 6, 5, 3), 256, np.int32)),
     r"x_test\[0, 0, 0, 0\] = .*256.* is outside \[0, 255\]"),
    (lambda a: a.update(x_test=np.full((5, 6, 5, 3), -1, np.int64)), r"is outside \[0, 255\]"),
    (lambda a: a.update(x_train=np.where(np.arange(3) == 2, 1.5, a["x_train"] / 255)),
     r"x_train\[0, 0, 0, 2\] = .*1.5.* is outside \[0, 1\]"),
    (lambda a: a.update(x_train=np.where(np.arange(3) == 1, np.nan, a["x_train"] / 255)),
     r"x_train\[0, 0, 0, 1\] = .*nan.* is not finite \(360 values of x_train are not\)"),
    (lambda a: a.update(x_train=(a["x_train"] % 255 + 0.3) / 255),
     r"x_train\[0, 0, 0, 0\] = .* is not a multiple of 1/255.*np.round\(x \* 255\)"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), "y_train has dtype float64; labels must "
                                                     "be integers"),
    (lambda a: a.update(y_test=-np.arange(5)), r"y_test\[1\] = -1 is negative"),
    (lambda a: a.update(y_train=np.eye(4)[a["y_train"]].astype(np.int64)),
     r"y_train has shape \(12, 4\); labels must be 1-D.*argmax"),
    (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]),
     r"the test split is empty \(x_test has shape \(0, 6, 5, 3\)\)"),
    (lambda a: a.update(x_train=np.zeros((12, 3, 8, 8), np.uint8)), "looks channels-first"),
    (lambda a: a.update(x_train=np.zeros((12, 8), np.uint8)),
     r"x_train has shape \(12, 8\); images must be \(N, H, W, C\) or \(N, H, W\)"),
    (lambda a: a.update(y_train=a["y_train"] * 0, y_test=a["y_test"] * 0),
     "every label is 0; a classifier needs at least 2 classes"),
]


@pytest.mark.parametrize("change,pattern", BAD)
def test_bad_arrays_are_refused_naming_the_array_and_value(tmp_path, change, pattern):
    a = arrays()
    read_npz(save(tmp_path, "good.npz", **a))  # (the unchanged arrays are read)
    change(a)
    with pytest.raises(DataError, match=pattern):
        load_dataset("mine", "npz", save(tmp_path, **a))


def test_files_that_are_not_numeric_npz_archives_are_refused(tmp_path):
    with pytest.raises(DataError, match="needs data.dir, the path of the .npz file"):
        read_npz("")
    with pytest.raises(DataError, match="'.*nowhere.npz' is not a file"):
        read_npz(str(tmp_path / "nowhere.npz"))
    npy = str(tmp_path / "x.npy")
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match=r"x.npy' is not an .npz archive.*np.savez"):
        read_npz(npy)
    pkl = tmp_path / "x.pkl"  # a pickle is never unpickled
    pkl.write_bytes(pickle.dumps(arrays()))
    with pytest.raises(DataError, match="is not an .npz archive"):
        read_npz(str(pkl))
    a = arrays()
    a["y_train"] = np.array([object()] * 12, dtype=object)
    with pytest.raises(DataError, match="y_train cannot be read without pickle"):
        read_npz(save(tmp_path, **a))
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("x_train.npy", b"not an array")
    with pytest.raises(DataError, match=r"broken.npz' lacks"):
        read_npz(str(broken))
    good = save(tmp_path, **arrays())
    with open(good, "r+b") as f:  # a corrupt member
        f.seek(200)
        f.write(b"\0" * 64)
    with pytest.raises(DataError, match="cannot be read"):
        read_npz(good)


def test_validation_takes_any_name_with_npz_and_requires_the_file(tmp_path):
    c = base_config()
    c.data.name, c.data.source = "my arrays", "npz"
    c.model.name, c.prune.ratios = "lenet5", "fc*=0.5"
    c.attack.epsilon = c.eval.epsilon = c.attack.step_size = c.eval.step_size = 0.1
    with pytest.raises(ValueError, match="data.dir='' is not allowed: the path of the .npz"):
        validation.validate_config(c, device_count=1)
    c.data.dir = save(tmp_path, **arrays())
    validation.validate_config(c, device_count=1)
    c.data.source = "files"  # the name is a dataset's again
    with pytest.raises(ValueError, match="data.name='my arrays' is not allowed.*source='npz'"):
        validation.validate_config(c, device_count=1)
