"""Compression kinds compared at equal rates on MNIST (Ye et al. 2019 compare irregular,
column and filter pruning; 2:4 is the N:M sparsity of sparse tensor cores).

    python -m robust_admm.study --config configs/studies/mnist_kinds.py --workdir runs/kinds \
        [--config.data.source=files --config.data.dir=/path/to/mnist-idx]

One dense LeNet_adv w = 4 (the `:cpu_pgd_at` MNIST recipe, 3 epochs), then each kind at 2x
and 4x on conv2 and fc1 (conv1 has 200 weights, fc2 is the classifier), 2 admm + 1 retrain
epochs each, all from that one dense model: irregular, column (rows of the (-1, out) view),
filter (output channels / units), N:M (2:4 at 2x, 1:4 at 4x). Sized for 2 hours on 2 CPU
cores (benchmarks/NOTES.md, "The sparsity-kind study on 2 cores"); PGD-40 and the standard
AutoAttack ensemble on the first 250 test images at 0.3 (AutoAttack would dominate the time
at 1,000).
"""
from robust_admm.experiments.study_config import kinds_grid, study_base, train_config

LAYERS = ("conv2", "fc1")


def rules(kind: str, ratio: float) -> str:
    return ",".join(f"{layer}={kind}:{ratio:g}" for layer in LAYERS)


def get_config(preset: str = ""):
    if preset:
        raise ValueError(f"configs/studies/mnist_kinds.py: unknown preset {preset!r}; "
                         f"allowed: ''")
    s = study_base()
    s.name = "mnist_kinds"
    kinds = {kind: {2.0: rules(kind, 0.5), 4.0: rules(kind, 0.75)}
             for kind in ("irregular", "column", "filter")}
    kinds["nm"] = {2.0: ",".join(f"{layer}=nm:2:4" for layer in LAYERS),
                   4.0: ",".join(f"{layer}=nm:1:4" for layer in LAYERS)}
    s.cells = kinds_grid(train_config(__file__, "../mnist.py", "cpu_pgd_at"), kinds,
                         epochs={"pretrain": 3, "admm": 2, "retrain": 1})
    s.eval.n = 250
    return s
