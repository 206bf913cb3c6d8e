"""The width study (configs/studies/mnist_width.py) on the 8x8 digits that ship with
scikit-learn: offline, in minutes; `smoke` is the tests' tiny grid (seconds a cell).

    python -m robust_admm.study --config configs/studies/digits_width.py --workdir runs/dw

Widths 2 and 4 from scratch, w = 4 pruned to the size of w = 2, that structure trained
from its inherited initial weights; PGD-20 and the standard AutoAttack ensemble on 300
test images (`smoke`: PGD-5 on 64).
"""
from robust_admm.experiments.study_config import study_base, train_config, width_grid


def get_config(preset: str = ""):
    s = study_base()
    s.name = f"digits_width:{preset or 'default'}"
    smoke = preset == "smoke"
    if preset not in ("", "smoke"):
        raise ValueError(f"configs/studies/digits_width.py: unknown preset {preset!r}; "
                         f"allowed: '', smoke")

    def train_at(width):
        c = train_config(__file__, "../digits.py", "smoke" if smoke else "")
        c.model.width = width
        if smoke:
            c.data.train_examples, c.data.test_examples = 256, 64
            c.eval.num_steps, c.eval.step_size = 5, 0.05
            c.checkpoint.every_steps = 2
        return c

    epochs = {"pretrain": 2, "admm": 1, "retrain": 1} if smoke else {
        "pretrain": 20, "admm": 10, "retrain": 10}
    s.cells = width_grid(train_at, widths=(2,), large=4, layers="conv1,conv2,fc1,fc2",
                         epochs=epochs)
    s.eval.attacks, s.eval.n = ("pgd5", 64) if smoke else ("pgd20,aa-standard", 300)
    if smoke:
        s.poll_s = s.clock_every_s = 0.5
    return s
