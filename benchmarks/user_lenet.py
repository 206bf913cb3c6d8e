"""A user's own flax.linen model for `step.py --model user_lenet:LeNet` (with `benchmarks`
on PYTHONPATH): the zoo's LeNet_adv written as a user writes it, with flax's `nn.Conv` and
`nn.max_pool`, so the benchmark times a model the zoo did not build. `width` as the zoo's
(w = 4: conv 8 -> conv 16 -> fc 256; 5x5 kernels, SAME padding), its layers named as
the zoo's."""
import flax.linen as nn


class LeNet(nn.Module):
    width: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate((2 * self.width, 4 * self.width), start=1):
            x = nn.Conv(features, (5, 5), padding="SAME", name=f"conv{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(64 * self.width, name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="fc2")(x)
