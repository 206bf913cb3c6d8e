"""random_crop_flip against brute-force numpy windows, its flip, keying, distribution, errors."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_admm.training import augment as aug


def np_candidates(img, pad):
    """All (2*pad+1)^2 H x W windows of the zero-padded HWC image and their mirrors:
    an array (2, 2*pad+1, 2*pad+1, H, W, C) indexed [flip, dy, dx]."""
    h, w, _ = img.shape
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    span = 2 * pad + 1
    wins = np.stack([np.stack([padded[dy:dy + h, dx:dx + w] for dx in range(span)])
                     for dy in range(span)])
    return np.stack([wins, wins[:, :, :, ::-1, :]])


def np_matches(out, img, pad):
    """Boolean (2, span, span): which (flip, dy, dx) reproduce `out` from `img`."""
    cands = np_candidates(img, pad)
    return np.all(cands == out, axis=(-3, -2, -1))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pad=st.integers(0, 3),
       hw=st.sampled_from([(8, 8), (5, 7)]))
def test_every_output_is_a_padded_window_or_its_mirror(seed, pad, hw):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (6, *hw, 3), dtype=np.uint8)
    out = np.asarray(aug.random_crop_flip(images, jax.random.PRNGKey(seed), pad=pad))
    assert out.dtype == np.uint8 and out.shape == images.shape
    for i in range(len(images)):
        assert np_matches(out[i], images[i], pad).any(), f"example {i} is no window"


def test_pad_zero_is_exact_mirror_or_identity():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 6, 5, 3), dtype=np.uint8)
    out = np.asarray(aug.random_crop_flip(images, jax.random.PRNGKey(3), pad=0))
    same = np.all(out == images, axis=(1, 2, 3))
    mirrored = np.all(out == images[:, :, ::-1, :], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert same.any() and mirrored.any()  # 32 fair coins: both outcomes occur


def test_keying_is_deterministic_and_jit_equal():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    key = jax.random.PRNGKey(7)
    a = np.asarray(aug.random_crop_flip(images, key))
    b = np.asarray(aug.random_crop_flip(images, key))
    jitted = jax.jit(aug.random_crop_flip, static_argnames="pad")
    c = np.asarray(jitted(images, key, pad=4))
    d = np.asarray(aug.augment("crop_flip", images, key))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)
    other = np.asarray(aug.random_crop_flip(images, jax.random.PRNGKey(8)))
    assert not np.array_equal(a, other)
    # typed (new-style) keys work as well
    typed = np.asarray(aug.random_crop_flip(images, jax.random.key(7)))
    assert typed.shape == images.shape and typed.dtype == np.uint8


def test_none_is_identity():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    assert aug.augment("none", images, jax.random.PRNGKey(0)) is images
    assert aug.AUGMENTATIONS == ("none", "crop_flip")


def test_offsets_uniformly_cover_and_flip_is_fair():
    n, pad = 4096, 2
    span = 2 * pad + 1
    # distinct non-zero pixels (zero is the padding), so (flip, dy, dx) is recoverable
    base = (np.arange(16, dtype=np.uint8) + 1).reshape(4, 4, 1)
    images = np.broadcast_to(base, (n, 4, 4, 1)).copy()
    out = np.asarray(aug.random_crop_flip(images, jax.random.PRNGKey(0), pad=pad))
    cands = np_candidates(base, pad).reshape(2 * span * span, -1)        # (50, 16)
    match = np.all(out.reshape(n, 1, -1) == cands[None], axis=-1)      # (n, 50)
    assert np.all(match.sum(axis=1) == 1), "each example must match exactly one window"
    flip, dy, dx = np.unravel_index(match.argmax(axis=1), (2, span, span))
    counts = np.bincount(dy * span + dx, minlength=span * span)
    assert np.all(counts > 0), counts
    # and roughly uniform: expected n/25 = 164 each, sd ~ 12.6
    assert counts.min() > 100 and counts.max() < 230, counts
    assert abs(flip.mean() - 0.5) < 0.05, flip.mean()


@pytest.mark.parametrize("images, pad, needle", [
    (np.zeros((2, 4, 4, 1), np.float32), 4, "float32"),
    (np.zeros((4, 4, 1), np.uint8), 4, "3-D"),
    (np.zeros((2, 4, 4, 1), np.uint8), -1, "-1"),
    (np.zeros((2, 4, 4, 1), np.uint8), 1.5, "1.5"),
])
def test_argument_errors_name_the_bad_value(images, pad, needle):
    with pytest.raises(ValueError, match=needle):
        aug.random_crop_flip(images, jax.random.PRNGKey(0), pad=pad)


def test_errors_raised_at_trace_time_under_jit():
    f = jax.jit(aug.random_crop_flip, static_argnames="pad")
    with pytest.raises(ValueError, match="int8"):
        f(np.zeros((2, 4, 4, 1), np.int8), jax.random.PRNGKey(0), pad=1)


def test_unknown_augmentation_name():
    with pytest.raises(ValueError, match=r"'mixup'.*none, crop_flip"):
        aug.augment("mixup", np.zeros((1, 4, 4, 1), np.uint8), jax.random.PRNGKey(0))
