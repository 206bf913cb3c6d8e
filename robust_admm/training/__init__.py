"""Training: the train state (`state`), the compiled adversarial step (`step`) with its
attack (`attack`), objectives (`objectives`), optimizers (`optim`), in-step augmentation
(`augment`), initial weights (`initialization`), the program of phases (`program`) and the
loop that runs a phase with checkpoints, logs and evaluations (`loop`)."""
