"""The width study of Ye et al. 2019 (its Table 2) on MNIST: is a large model pruned during
adversarial training to the size of a small one more robust than the small one trained
from scratch, or than the pruned structure trained again from its inherited initial weights?

    python -m robust_admm.study --config configs/studies/mnist_width.py --workdir runs/width \
        [--config.data.source=files --config.data.dir=/path/to/mnist-idx]

Presets:
- (none) or `cpu`: sized to fit 2 hours on 2 CPU cores: LeNet_adv at widths 2, 4, 8 from
  scratch; w = 8 pruned to the size of w = 2 and of w = 4; those two pruned structures
  trained from the inherited initialisation. The `:cpu_pgd_at` MNIST recipe (PGD-10 training
  with an epsilon ramp, PGD-40 evaluation) with few epochs: 3 dense (every from-scratch and
  inherited cell), 2 admm + 2 retrain after the shared dense w = 8 model. Evaluated on the
  first 250 test images: with these short recipes a cell's evaluation (AutoAttack
  above all) takes longer than its training (benchmarks/NOTES.md, "The width study on 2
  cores: first four cells").
- `paper`: the paper's grid (needs a GPU): widths 1, 2, 4, 8 and 16 from scratch, w = 16
  pruned to the size of each smaller width, the paper's recipe (configs/mnist.py), 40
  epochs per phase, evaluated on the first 1,000 test images.
Every cell's final model is evaluated with PGD-40 and the standard AutoAttack ensemble at
epsilon 0.3.
"""
from robust_admm.experiments.study_config import study_base, train_config, width_grid

LAYERS = "conv1,conv2,fc1,fc2"


def get_config(preset: str = "cpu"):
    preset = preset or "cpu"
    s = study_base()
    s.name = f"mnist_width:{preset}"
    if preset == "cpu":
        def train_at(width):
            c = train_config(__file__, "../mnist.py", "cpu_pgd_at")
            c.model.width = width
            return c
        s.cells = width_grid(train_at, widths=(2, 4), large=8, layers=LAYERS,
                             epochs={"pretrain": 3, "admm": 2, "retrain": 2})
        s.eval.n = 250
    elif preset == "paper":
        def train_at(width):
            c = train_config(__file__, "../mnist.py", "paper")
            c.model.width = width
            return c
        s.cells = width_grid(train_at, widths=(1, 2, 4, 8), large=16, layers=LAYERS,
                             epochs={"pretrain": 40, "admm": 40, "retrain": 40})
    else:
        raise ValueError(f"configs/studies/mnist_width.py: unknown preset {preset!r}; "
                         f"allowed: cpu, paper")
    return s
