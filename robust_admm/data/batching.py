"""How a step gets its batch from a split kept on the devices: the batch's indices, pure
in (key, step), and the uint8 -> [0, 1] conversion; and the test split padded to whole
evaluation batches."""
import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.runtime import parallel


def to_pixels(images_u8: jnp.ndarray) -> jnp.ndarray:
    """uint8 NHWC -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / 255.0


DATA_KEY_TAG = 0  # the data order's key is fold_in(train state key, DATA_KEY_TAG)


def epoch_order(key, epoch, num_examples: int):
    """The order of the examples in `epoch`: permutation(fold_in(key, epoch))."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_indices(key, step, num_examples: int, batch_size: int, order=None):
    """Indices of batch `step`: epoch e uses `epoch_order(key, e)`, batches in order, the
    last partial batch dropped. Pure in (key, step), so resuming needs only the step.
    `order`: that epoch's order, given (computed once per epoch, where drawing it costs a
    sort of the whole split at every step)."""
    steps_per_epoch = num_examples // batch_size
    epoch, i = step // steps_per_epoch, step % steps_per_epoch
    if order is None:
        order = epoch_order(key, epoch, num_examples)
    return jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)


def pad_to_multiple(images, labels, multiple: int, mesh):
    """Test split padded to a whole number of eval batches, with a validity mask,
    replicated on the mesh."""
    n = labels.shape[0]
    pad = (-n) % multiple
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return parallel.replicate((images, labels, valid), mesh)
