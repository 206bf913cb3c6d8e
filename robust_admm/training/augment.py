"""Training-time augmentation (CIFAR's random crop and flip; mixup's draws and mix) as pure,
jit-compatible JAX.

It runs inside the compiled train step, so the data stays uint8 on the device (crop and
flip on uint8; mixup after them, on the pixels), and its only randomness is the keys it is
given: the step passes ones derived from (run key, step), so a resumed run sees the
batches an uninterrupted one would. Evaluation is never augmented. Static shapes (a vmap
of dynamic_slice, a where for the flip, a permutation by argsort), no host callbacks.
"""
import jax
import jax.numpy as jnp
import numpy as np

AUGMENTATIONS = ("none", "crop_flip")


def _check_images(images_u8):
    shape = getattr(images_u8, "shape", None)
    dtype = getattr(images_u8, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"images must be an array, got {type(images_u8).__name__}")
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {np.dtype(dtype)}")
    if len(shape) != 4:
        raise ValueError(f"images must be 4-D (N, H, W, C), got {len(shape)}-D shape "
                         f"{tuple(shape)}")


def random_crop_flip(images_u8, key, pad=4):
    """Per-example zero-padded random crop and random horizontal flip.

    Args:
      images_u8: uint8 array (N, H, W, C).
      key: a JAX PRNG key; the only source of randomness (same key -> same output).
      pad: non-negative Python int, the zero padding on each side of H and W. The crop
        offset of each example is uniform on [0, 2*pad] x [0, 2*pad] in the padded image;
        ``pad=0`` leaves only the flip.

    Returns:
      uint8 array of the same shape: each example is an H x W window of its zero-padded
      input, mirrored along W with probability 1/2.
    """
    _check_images(images_u8)
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)):
        raise ValueError(f"pad must be a non-negative Python int, got {pad!r} "
                         f"({type(pad).__name__})")
    if pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad}")
    pad = int(pad)
    images = jnp.asarray(images_u8)
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)

    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1, dtype=jnp.int32)

        def crop(img, off):
            return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)

    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def augment(name, images_u8, key):
    """Apply the augmentation called ``name`` (one of :data:`AUGMENTATIONS`).

    ``"none"`` returns ``images_u8`` unchanged; ``"crop_flip"`` is
    :func:`random_crop_flip` with ``pad=4``.
    """
    if name == "none":
        return images_u8
    if name == "crop_flip":
        return random_crop_flip(images_u8, key, pad=4)
    raise ValueError(f"unknown augmentation {name!r}; allowed: {', '.join(AUGMENTATIONS)}")


def mixup_partners(key, n: int, valid=None):
    """A random permutation of the batch for mixup (each example's partner); with a
    streamed batch's `valid` mask, the valid examples are permuted among themselves and
    each invalid one is its own partner, so an invalid image never enters a valid
    example's mix. From one uniform draw per example (its argsort), so an all-valid
    mask gives the permutation of no mask."""
    u = jax.random.uniform(key, (n,))
    if valid is None:
        return jnp.argsort(u)
    slots = jnp.argsort(~valid, stable=True)  # the valid indices first, in order
    first = jnp.arange(n) < valid.sum()
    order = jnp.argsort(jnp.where(first, u, jnp.inf), stable=True)  # permutes the first
    return jnp.zeros(n, slots.dtype).at[slots].set(slots[order])


def mixup_draw(key, alpha: float, n: int, valid=None):
    """(lam, perm) of one batch: lam ~ Beta(alpha, alpha) (float32 scalar) from the first
    half of `jax.random.split(key)`, `mixup_partners` from the second."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha={alpha!r}; allowed: > 0")
    lam_key, perm_key = jax.random.split(key)
    return jax.random.beta(lam_key, alpha, alpha), mixup_partners(perm_key, n, valid)


def mixup(x, lam, perm):
    """mixup's images (Zhang et al. 2018): lam * x + (1 - lam) * x[perm], in pixels."""
    return lam * x + (1.0 - lam) * x[perm]
