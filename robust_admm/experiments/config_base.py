"""The fields every config has, with their meaning. Dataset configs (`configs/*.py`) start
from `base_config()` and set what differs; what only a dataset can say (the dataset, the
model, the attack radius and step, what to compress) is unset here, and a config that
leaves it unset is refused naming the field. Every field can be overridden from the command
line: `--config.admm.rho=0.01`; unknown fields are refused."""
import ml_collections
from ml_collections import config_dict

from robust_admm.data.images import MAX_PIXELS

STAGES = ("pretrain", "admm", "retrain")  # the default program's phases


def stage_config(epochs: int, lr: float, optimizer: str = "sgd", schedule: str = "cosine"):
    """Optimisation of one phase."""
    c = ml_collections.ConfigDict()
    c.epochs = epochs
    c.optimizer = optimizer  # 'sgd' (with momentum) | 'adam'
    c.lr = lr  # peak learning rate
    c.momentum = 0.9  # sgd only; 0 = plain SGD
    c.nesterov = False  # sgd only
    c.weight_decay = 0.0  # L2 term added to the gradient
    # 'constant' | 'cosine' | 'multistep' | 'periodic' (cosine restarting at every ADMM update)
    c.schedule = schedule
    c.milestones = "0.5,0.75"  # multistep: fractions of the stage where lr *= gamma
    c.gamma = 0.1
    c.warmup_epochs = 0.0  # linear warmup from 0 (fractions allowed)
    return c


def phase_config(kind: str, epochs: int, lr: float, rules: str = "", **optim):
    """One phase of a program (training/program.py): `kind` 'dense' | 'admm' | 'retrain',
    its optimisation, and for admm and retrain its compression `rules` ('' = those of the
    closest earlier admm/retrain phase, or `prune.*` for the first)."""
    c = stage_config(epochs, lr, **optim)
    c.kind = kind
    # This phase's training attack where it differs from `attack.*` (None = attack.*'s):
    # e.g. a finer attack while compressing, where the pruned model's robustness is made.
    c.attack_steps = config_dict.placeholder(int)
    c.attack_step_size = config_dict.placeholder(float)
    if kind != "dense":
        c.rules = rules
    if kind == "retrain":
        # How quantized layers stay on their levels while retraining: 'project' (project
        # after every update, the scale refit) | 'ste' (latent full-precision weights, the
        # model run on their levels, straight-through gradients); measured in the README.
        c.quantize_update = "project"
    if kind == "admm":
        c.rho = 0.001  # initial penalty rho
        c.rho_growth = 1.3  # rho <- growth * rho at each update (the paper's multi-rho)
        c.rho_max = 1.0  # cap on rho
        c.update_every_epochs = 2  # Z/U update interval (also the 'periodic' lr period)
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The compression program: its phases in order, each a field below with a `kind`
    # (dense | admm | retrain) and, for admm and retrain, compression `rules`
    # (training/program.py). A config file adds phases with phase_config().
    c.program = ",".join(STAGES)
    # Which phases to run ('' = the whole program): consecutive, in program order. A phase
    # after the program's first loads the previous phase's checkpoint from the workdir.
    c.stages = ""
    # 'adversarial' (PGD min-max training, Madry et al.) | 'natural' (no attack in training).
    c.setting = "adversarial"
    # The training loss: 'pgd_at' (cross-entropy at the attack's point, Madry et al.),
    # 'trades' (Zhang et al. 2019: CE(clean) + beta KL(clean || adv); its attack ascends
    # the KL from x + 0.001 N(0, 1)), 'mart' (Wang et al. 2020; its attack ascends CE),
    # 'natural' (no attack; the same as setting='natural').
    c.objective = "pgd_at"
    c.objective_beta = 6.0  # TRADES's and MART's beta
    # Label smoothing eps of the objective's cross-entropy terms: targets 1 - eps on the
    # label, eps / (classes - 1) on each other class (Ye et al.'s `smooth_eps`); 0 = off.
    # The KL terms and the attack keep the hard labels.
    c.label_smoothing = 0.0
    # mixup (Ye et al.'s `alpha`): each batch mixed with a permutation of itself,
    # lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha) per batch, the loss (and the
    # training attack's) lam * L(y) + (1 - lam) * L(y[perm]); 0 = off.
    c.mixup_alpha = 0.0
    c.batch_size = 64  # global training batch
    c.log_every_steps = 50  # metrics line + progress (img/s, ETA) every this many steps
    # Speed only, CPU only: 'xla' compiles the steps with XLA:CPU's own convolutions (the
    # YNNPACK library keeps matmuls and reductions; faster steps on the CIFAR models,
    # benchmarks/NOTES.md, entry 14), 'library' keeps jaxlib's defaults, 'auto' = 'xla'
    # where this jaxlib accepts the option, else 'library' with a warning
    # (runtime/compiler.py).
    c.cpu_convolutions = "auto"

    # Checkpoints (orbax, asynchronous) under <workdir>/checkpoints/<stage>; rerunning the
    # same command resumes from the newest readable one, bit for bit.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # and always at the end of each stage, and on SIGTERM
    c.checkpoint.keep = 3  # newest checkpoints kept per stage

    # A step whose loss or gradients are not finite is never applied (optax.apply_if_finite).
    # 'stop': end the run at the next log step, naming the step and the last checkpoint;
    # 'skip': go on, stopping only after `max_consecutive` non-finite steps in a row.
    c.nonfinite = ml_collections.ConfigDict()
    c.nonfinite.policy = "stop"
    c.nonfinite.max_consecutive = 10

    c.data = ml_collections.ConfigDict()
    # 'mnist' | 'digits' | 'cifar10' | 'cifar100'; with a folder, shards or npz, any name (a
    # label for the logs: the classes come from the data); with tfds, the TFDS name.
    c.data.name = ""
    # Kept on the device: 'tfds' | 'files' (original IDX / CIFAR binary files) | 'npz'
    # (your own arrays: one .npz file with x_train, y_train, x_test, y_test; images uint8,
    # or floats k/255 in [0, 1]; NHWC or NHW; integer labels, classes = largest + 1;
    # data/npz.py). Streamed from the host (data/streamed.py): 'folder'
    # (DIR/train/<class>/*, DIR/val/<class>/*; JPEG, PNG) | 'shards' (what `robust-admm
    # shards` writes from such a folder) | 'tfds' with any other TFDS image-classification
    # dataset (e.g. data.name='imagenet2012', prepared in the ArrayRecord format).
    c.data.source = "tfds"
    c.data.dir = ""  # files: folder of the original files (CIFAR: or the .tar.gz);
    # tfds: data_dir ('' = default); folder, shards: the folder (required); npz: the file
    # Streamed sources only: the side of the square crops the model sees (training:
    # RandomResizedCrop and flip; evaluation: short side to 256/224 of it, centre crop).
    c.data.image_size = 0
    # 'imagenet' (those crops) | 'resize' (the whole image resized to the size in both
    # splits, no crop or flip: for images already framed, such as digits).
    c.data.crops = "imagenet"
    c.data.channels = 3  # 3: RGB | 1: grayscale (e.g. digits stored as images)
    c.data.check_headers = True  # folder: read every file's header before compiling
    # An image that cannot be decoded mid-run: 'stop' (an error naming the file) | 'skip'
    # (logged, left out of the loss and the evaluation, counted as `skipped`).
    c.data.bad_images = "stop"
    c.data.max_pixels = MAX_PIXELS  # images above this many pixels are refused unread
    c.data.num_workers = 0  # reader processes per host (0: read in the training process)
    c.data.num_threads = 2  # decoding threads per reader (PIL releases the GIL)
    c.data.prefetch = 2  # global batches on the devices ahead of the step
    c.data.train_examples = 0  # use only the first n training examples (0 = all); for tests
    c.data.test_examples = 0  # evaluate on the first n test examples (0 = all)
    # Training batches only: 'none' | 'crop_flip' (4-pixel zero-padded random crop and
    # horizontal flip, CIFAR's standard), in the compiled step, keyed by (run key, step).
    c.data.augment = "none"

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # 'lenet_adv' | 'lenet5' | 'lenet_digits' | 'vgg16' | 'resnet18' | 'resnet8'
    # | 'wrn28_4' | 'wrn34_10' | any 'wrn<depth>_<widen factor>' | ImageNet, width 1 only for
    # the last two: 'imagenet_resnet18' | 'imagenet_resnet50' | 'imagenet_vgg16_bn' | 'alexnet_bn'
    # | your own flax.linen Module class by import path: 'my_pkg.my_module:MyNet'
    # (models/external.py: num_classes passed if it has that field; width 1, no normalize).
    # The constructor arguments of an import-path model: a JSON object as a string,
    # --config.model.kwargs='{"features": 64}', in a config file json.dumps({...}) ('' = none;
    # arrays arrive as tuples).
    c.model.kwargs = ""
    c.model.width = 1  # the paper's width multiplier w (lenet_adv: conv 2w, conv 4w, fc 64w;
    # vgg16 / resnet18: w times the standard channels; wrn*: w times the widen factor)
    # Compute precision: 'float32' | 'bfloat16' (for GPU and TPU; parameters, optimizer and
    # ADMM state stay float32, logits are float32).
    c.model.dtype = "float32"
    # Pixels normalised inside the model, before its first layer (attacks still act on
    # [0, 1] pixels): 'none' | 'imagenet' (ImageNet's per-channel mean and std, what
    # torchvision's and timm's weights expect; the imagenet_* models only).
    c.model.normalize = "none"

    # Initial weights (training/initialization.py; inheriting: experiments/inherit.py).
    # `scheme` draws every kernel (conv and dense; biases 0) with 'default' (flax's LeCun
    # normal) | 'xavier_uniform' | 'xavier_normal' | 'kaiming_uniform' | 'kaiming_normal' |
    # 'lecun_uniform' | 'orthogonal'.
    c.init = ml_collections.ConfigDict()
    c.init.scheme = "default"
    # A safetensors file of torchvision's or timm's weights (their names and layouts) to
    # start from ('' = none): imagenet_resnet18, imagenet_resnet50, imagenet_vgg16_bn, with
    # model.normalize='imagenet'; not with a non-default `scheme` or with `inherit_from`.
    c.init.pretrained = ""
    # Its classifier: 'keep' (the checkpoint's; its class count must be the data's) |
    # 'new' (this model's freshly drawn classifier, every other layer pretrained).
    c.init.pretrained_head = "keep"
    # A finished run's workdir: start from the sparse model it pruned (same model.name and
    # model.width; its masks stay fixed in every phase of this run) ...
    c.init.inherit_from = ""
    # ... with, at the kept positions, 'initial': that run's initial weights (the
    # lottery-ticket test) | 'trained': its trained surviving weights (and BatchNorm stats).
    c.init.inherit = "initial"
    c.init.inherit_stage = ""  # the source run's phase to inherit ('' = its last)

    # The training attack (inner maximisation). Pixels are in [0, 1].
    c.attack = ml_collections.ConfigDict()
    c.attack.epsilon = config_dict.placeholder(float)  # L-inf radius
    c.attack.num_steps = 40  # PGD steps
    c.attack.step_size = config_dict.placeholder(float)  # per-step size
    c.attack.random_start = True  # uniform start in the eps-ball
    c.attack.loss = "ce"  # 'ce' | 'margin'
    # pretrain only: epsilon and step size ramp linearly from 0 over this many epochs.
    c.attack.warmup_epochs = 0.0
    c.attack.unroll = 1  # lax.fori_loop unroll factor of the PGD loop (speed only)
    # How the PGD loop runs (speed only; training and eval): 'fori' = inside the compiled
    # step, 'host' = one compiled call per PGD step, 'auto' = 'host' on CPU (where XLA
    # runs rolled loop bodies slower, benchmarks/NOTES.md, entry 1), 'fori' on GPU and TPU.
    c.attack.loop = "auto"

    # Evaluation during training: natural accuracy and accuracy under PGD, set apart from
    # the training attack (`attack.loop` and `attack.unroll`, speed only, apply to both).
    c.eval = ml_collections.ConfigDict()
    c.eval.epsilon = config_dict.placeholder(float)  # L-inf radius
    c.eval.num_steps = 40
    c.eval.step_size = config_dict.placeholder(float)
    c.eval.restarts = 1
    c.eval.random_start = True
    c.eval.loss = "ce"  # 'ce' | 'margin'
    c.eval.batch_size = 500
    c.eval.every_epochs = 1  # evaluate every this many epochs (and always at a stage's end)
    # Which of those evaluations run the PGD above: 'every_eval' | 'phase_end' (only the
    # one at each phase's end; the others report natural accuracy only) | 'auto':
    # 'phase_end' in the natural setting (a naturally trained model reads about 0% under
    # PGD at every epoch, and attacking it would take most of the run's time),
    # 'every_eval' in the adversarial one. eval.num_steps=0 or eval.epsilon=0: no attack
    # in any of them (natural accuracy only).
    c.eval.adversarial = "auto"
    # The evaluations before a phase's end read n test examples (0 = the whole split): the
    # first n of a split kept on the devices, n spread evenly over a streamed one (in
    # class order); the one at each phase's end, which the summary reports, reads the
    # whole split (as data.test_examples gives it).
    c.eval.n = 0

    # What to compress, and how: the rules of the first admm/retrain phase whose `rules` is
    # empty (a phase's own `rules`, e.g. "conv*=filter:0.5,fc*=irregular:0.9+quantize:4",
    # mixes kinds per layer).
    c.prune = ml_collections.ConfigDict()
    c.prune.kind = "irregular"  # 'irregular' | 'filter' | 'column' | 'channel'
    # Per-layer prune ratios (fraction of units removed), keyed by layer name or glob over
    # the '/'-joined module path: "conv1=0.8,conv2=0.9,fc*=0.95".
    c.prune.ratios = ""
    # If > 0: ignore `ratios` and prune each layer listed in `to_width_layers` to the size
    # of the same model at width `to_width` (the paper's "pruned to w'").
    c.prune.to_width = 0
    c.prune.to_width_layers = ""
    # Masked-progressive: weights that are already zero when ADMM starts stay zero.
    c.prune.masked_progressive = False

    c.pretrain = phase_config("dense", epochs=40, lr=0.01)
    c.admm = phase_config("admm", epochs=40, lr=0.01, schedule="periodic")
    c.retrain = phase_config("retrain", epochs=40, lr=0.005)
    return c
