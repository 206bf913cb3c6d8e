"""MNIST: LeNet_adv (Madry et al.) with PGD-40 training and ADMM pruning (Ye et al., 2019).

Presets, chosen by the argument after the path (`--config configs/mnist.py:cpu`); each
says what its evaluations during training measure and how often (every one on the whole
test split; robust accuracy under the PGD it names):
- (none) or `paper`: the paper's recipe, w = 16 pruned to the size of w = 4; needs a GPU.
  Evaluated every epoch: natural and PGD-40 (step 0.01).
- `cpu`: a budget recipe for 2 CPU cores, about 47 minutes for all three stages: w = 4,
  TRADES (beta 6) with PGD-10 x 0.05 in pretraining and PGD-20 x 0.02 in the admm and
  retrain phases, 9.6x on the pruned layers (results: README, Results; benchmarks/NOTES.md,
  "The `:cpu` model on 2,000 test images"). Evaluated at the end of each phase only:
  natural and PGD-40 (step 0.01875); the same for every `cpu_*` preset.
- `cpu_pgd_at`: `cpu` with the paper's objective, PGD-AT (PGD-10 x 0.05 throughout), about
  65 minutes, at the same 9.6x.
- `cpu_mart`: `cpu_pgd_at` trained with MART (beta 6) instead of PGD-AT.
- `cpu_nm`, `cpu_ternary`, `cpu_prune_quantize`: `cpu_pgd_at` compressed another way: 2:4
  sparsity on conv2 and fc1; every layer ternary; 8x irregular, then 4-bit on the kept
  weights in a second admm + retrain round.
- `natural`: LeNet-5 (20-50-500-10) trained without attack (the paper's natural setting).
  Evaluated every epoch: natural accuracy only; PGD-40 (step 0.01) too at the end of each
  phase only (`eval.adversarial` 'auto' in the natural setting: such a model reads about
  0% under it at every epoch, and attacking it each epoch took most of the run's time).
- `progressive`: LeNet-5 without attack, pruned in three admm + retrain rounds of rising
  rates (the progressive-compression paper's recipe): 8.8x, 32x, 123x on the weights.
  Evaluated at the end of each phase only: natural and PGD-40 (step 0.01).
- `smoke`: a few hundred images and a few steps, seconds; for tests. Evaluated every
  epoch on its 64 test images: natural and PGD-3 (step 0.1); `smoke_program` too.
- `smoke_program`: `smoke` as a five-phase program: two admm + retrain rounds of rising
  rates with every kind of rule (filter, column, N:M, binary, ternary, 4-bit, sparsity
  with quantization), the second retrain with the straight-through estimator.
"""
from robust_admm.experiments.config_base import base_config, phase_config

# Irregular ratios for 8x on all of LeNet_adv w=4's weights (fc1 holds 97% of them).
PRUNE_8X = "conv1=irregular:0.5,conv2=irregular:0.75,fc1=irregular:0.879,fc2=irregular:0.75"
CPU_VARIANTS = ("cpu", "cpu_pgd_at", "cpu_mart", "cpu_nm", "cpu_ternary", "cpu_prune_quantize")

# The progressive preset's rounds: prune ratios per layer (irregular), rising.
PROGRESSIVE_ROUNDS = (
    "conv1=irregular:0.3,conv2=irregular:0.75,fc1=irregular:0.9,fc2=irregular:0.5",
    "conv1=irregular:0.4,conv2=irregular:0.85,fc1=irregular:0.98,fc2=irregular:0.75",
    "conv1=irregular:0.5,conv2=irregular:0.93,fc1=irregular:0.9975,fc2=irregular:0.9",
)
# Epochs of each round's admm and retrain phases: the last, 31x -> 123x, needs the most.
PROGRESSIVE_EPOCHS = (6, 6, 8)


def get_config(preset: str = "paper"):
    c = base_config()
    c.data.name = "mnist"
    c.model.name = "lenet_adv"
    c.model.width = 16
    c.batch_size = 50  # as Madry et al.'s MNIST challenge
    c.attack.epsilon = c.eval.epsilon = 0.3
    c.attack.step_size = c.eval.step_size = 0.01
    c.prune.kind = "irregular"
    c.prune.ratios = "conv1=0.5,conv2=0.9375,fc1=0.9375,fc2=0.75"
    c.prune.to_width = 4  # "pruned to 4": each layer keeps as many weights as at w = 4
    c.prune.to_width_layers = "conv1,conv2,fc1,fc2"
    preset = preset or "paper"
    if preset == "paper":
        for s in (c.pretrain, c.admm, c.retrain):
            s.epochs = 40
        c.pretrain.optimizer = c.admm.optimizer = c.retrain.optimizer = "adam"
        c.pretrain.lr, c.admm.lr, c.retrain.lr = 1e-3, 1e-3, 5e-4
        c.admm.update_every_epochs = 4
    elif preset in CPU_VARIANTS:
        c.model.width = 4
        c.prune.to_width = 0
        # 9.6x on the pruned layers (conv1 is tiny: 200 weights, kept at half); a higher
        # rate lost much more to pruning (benchmarks/NOTES.md, "The `:cpu` recipe against
        # AutoAttack").
        c.prune.ratios = "conv1=0.5,conv2=0.8,fc1=0.9,fc2=0.75"
        c.batch_size = 64
        c.attack.num_steps = 10  # cheaper inner loop for training ...
        c.attack.step_size = 0.05  # ... with a larger step (10 x 0.05 covers the ball)
        c.attack.warmup_epochs = 1.0  # ramp epsilon up over the first pretraining epoch
        # Evaluation: PGD-40 at Madry et al.'s step 2.5 eps / 40. The paper's 0.01 (40 x 0.01
        # covers 1.3 eps) is the weaker attack on these models (benchmarks/NOTES.md, "The
        # `:cpu` recipe against AutoAttack").
        c.eval.num_steps, c.eval.step_size = 40, 0.01875
        c.eval.every_epochs = 100  # only at the end of each stage
        for s in (c.pretrain, c.admm, c.retrain):
            s.optimizer = "adam"
        c.pretrain.epochs, c.pretrain.lr = 20, 1e-3
        c.admm.epochs, c.admm.lr, c.admm.update_every_epochs = 8, 5e-4, 1
        c.admm.rho, c.admm.rho_growth = 0.1, 1.5
        c.retrain.epochs, c.retrain.lr, c.retrain.schedule = 10, 5e-4, "cosine"
        if preset == "cpu":
            c.objective = "trades"
            # A finer attack while compressing (20 x 0.02 covers 1.3 eps, as TRADES's own
            # 40 x 0.01, which is slower and read the same): the PGD-40 to AutoAttack gap
            # grew there under 10 x 0.05 (benchmarks/NOTES.md, "A finer training attack
            # while compressing").
            for s in (c.admm, c.retrain):
                s.attack_steps, s.attack_step_size = 20, 0.02
        elif preset == "cpu_mart":
            c.objective = "mart"
        elif preset == "cpu_nm":
            c.admm.rules = "conv2=nm:2:4,fc1=nm:2:4"
        elif preset == "cpu_ternary":
            c.admm.rules = "conv*=quantize:2,fc*=quantize:2"
        elif preset == "cpu_prune_quantize":
            c.admm.rules = PRUNE_8X
            # The second round repeats the first's settings with 4-bit levels on top.
            c.admm2 = c.admm.copy_and_resolve_references()
            c.admm2.rules = PRUNE_8X.replace(",", "+quantize:4,") + "+quantize:4"
            c.retrain2 = c.retrain.copy_and_resolve_references()
            c.program = "pretrain,admm,retrain,admm2,retrain2"
    elif preset == "natural":
        # The natural setting of the paper: LeNet-5 (20-50-500-10), no attack in training;
        # evaluations report natural accuracy, and PGD-40's at the end of each phase
        # (eval.adversarial 'auto').
        c.setting = "natural"
        c.model.name, c.model.width = "lenet5", 1
        c.prune.to_width = 0
        c.prune.ratios = "conv1=0.5,conv2=0.9,fc1=0.95,fc2=0.75"
        c.batch_size = 64
        for s in (c.pretrain, c.admm, c.retrain):
            s.optimizer, s.epochs = "adam", 10
        c.pretrain.lr, c.admm.lr, c.retrain.lr = 1e-3, 5e-4, 5e-4
        c.admm.update_every_epochs, c.admm.rho, c.admm.rho_growth = 2, 0.1, 1.5
    elif preset == "progressive":
        c.setting = "natural"
        c.model.name, c.model.width = "lenet5", 1
        c.prune.to_width = 0
        c.batch_size = 64
        c.pretrain.optimizer, c.pretrain.epochs, c.pretrain.lr = "adam", 10, 1e-3
        c.eval.every_epochs = 100  # only at the end of each phase
        program = ["pretrain"]
        for i, (rules, epochs) in enumerate(zip(PROGRESSIVE_ROUNDS, PROGRESSIVE_EPOCHS), 1):
            tag = "" if i == 1 else str(i)
            admm = phase_config("admm", epochs=epochs, lr=5e-4, rules=rules, optimizer="adam",
                                schedule="periodic")
            admm.update_every_epochs, admm.rho, admm.rho_growth = 2, 0.1, 1.5
            c[f"admm{tag}"] = admm
            c[f"retrain{tag}"] = phase_config("retrain", epochs=epochs, lr=5e-4,
                                              optimizer="adam")
            program += [f"admm{tag}", f"retrain{tag}"]
        c.program = ",".join(program)
    elif preset in ("smoke", "smoke_program"):
        c.model.width = 1
        c.prune.to_width = 0
        c.prune.ratios = "conv2=0.5,fc1=0.75"
        c.batch_size = 16
        c.data.train_examples, c.data.test_examples = 128, 64
        c.attack.num_steps, c.attack.step_size = 3, 0.1
        c.eval.num_steps, c.eval.step_size, c.eval.batch_size = 3, 0.1, 32
        c.log_every_steps = 4
        for s in (c.pretrain, c.admm, c.retrain):
            s.epochs, s.optimizer, s.lr = 2, "adam", 1e-3
        c.admm.update_every_epochs = 1
        if preset == "smoke_program":
            c.admm.rules = "conv1=filter:0.5,conv2=column:0.5,fc1=nm:2:4,fc2=quantize:2"
            c.admm2 = phase_config("admm", epochs=2, lr=1e-3, optimizer="adam",
                                   rules="conv1=filter:0.5,conv2=column:0.75,"
                                         "fc1=nm:1:4+quantize:4,fc2=irregular:0.5+quantize:1")
            c.admm2.update_every_epochs = 1
            c.retrain2 = phase_config("retrain", epochs=2, lr=1e-3, optimizer="adam")
            c.retrain2.quantize_update = "ste"
            c.program = "pretrain,admm,retrain,admm2,retrain2"
    else:
        raise ValueError(f"configs/mnist.py: unknown preset {preset!r}; allowed: paper, "
                         f"{', '.join(CPU_VARIANTS)}, natural, progressive, smoke, smoke_program")
    return c
