"""The progressive LeNet-5 curve (Ye et al. 2019, progressive ADMM): one cell, the
`progressive` MNIST preset (natural training, three admm + retrain rounds: 8.8x, 32x, 123x
on the weights; about 46 minutes on 2 CPU cores).

    python -m robust_admm.study --config configs/studies/mnist_progressive.py \
        --workdir runs/progressive [--config.data.source=files --config.data.dir=PATH]

The cell's report (cells/progressive/report.md) plots accuracy against compression over
the rounds. The model is trained without an attack; PGD-40 on the first 1,000 test images
shows how little robustness natural training leaves.
"""
from robust_admm.experiments.study_config import cell, study_base, train_config


def get_config(preset: str = ""):
    if preset:
        raise ValueError(f"configs/studies/mnist_progressive.py: unknown preset {preset!r}; "
                         f"allowed: ''")
    s = study_base()
    s.name = "mnist_progressive"
    s.eval.attacks = "pgd40"
    s.cells.progressive = cell(train_config(__file__, "../mnist.py", "progressive"),
                               kind="irregular", init="pruned")
    return s
