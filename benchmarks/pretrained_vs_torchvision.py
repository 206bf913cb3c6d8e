"""Our import of torchvision's and timm's checkpoints (`init.pretrained`) against the
PyTorch models themselves: the same logits on the same images.

For each model, a child process in a separate environment with PyTorch (`--torch-python`;
torch, torchvision, safetensors and, for `--library timm`, timm: never a dependency of
this package) builds the library's network with seeded random weights (BatchNorm's
affine parameters and running averages drawn too, so that they matter), saves its
state_dict as safetensors, and computes its eval-mode logits on seeded random images in
[0, 1] normalised with ImageNet's mean and std, in float32 and in float64. This process
then starts our model from that file as a run does (`initial_variables` with
`init.pretrained` and `model.normalize='imagenet'`), computes its logits on the same
pixels, and prints the largest difference and how often the argmax agrees.

    python benchmarks/pretrained_vs_torchvision.py --torch-python /tmp/torchvenv/bin/python \\
        --library torchvision --models imagenet_resnet18,imagenet_resnet50,imagenet_vgg16_bn

Output, one line per model:
    RESULT model=... library=... images=N size=S max_abs_diff=... max_abs_diff_f64=...
        max_abs_logit=... argmax_agree=k/N
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ARCHS = {"imagenet_resnet18": "resnet18", "imagenet_resnet50": "resnet50",
         "imagenet_vgg16_bn": "vgg16_bn"}  # our name -> the libraries' (the same in both)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", help="python of an environment with torch+torchvision")
    p.add_argument("--library", default="torchvision", choices=["torchvision", "timm"])
    p.add_argument("--models", default=",".join(ARCHS))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (child)")
    p.add_argument("--make", help="(child) write DIR/model.safetensors, images, logits")
    p.add_argument("--arch", help="(child) the library's model name")
    return p.parse_args()


def make(args):
    """The PyTorch side (runs under --torch-python)."""
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.library == "timm":
        import timm
        net = timm.create_model(args.arch, pretrained=False)
    else:
        import torchvision
        net = getattr(torchvision.models, args.arch)(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(args.make, "model.safetensors"))
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.images, 3, args.size, args.size, generator=g)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    with torch.no_grad():
        logits = net((x - mean) / std)
        logits64 = net.double()((x.double() - mean.double()) / std.double())
    np.save(os.path.join(args.make, "images.npy"), x.numpy())
    np.save(os.path.join(args.make, "logits.npy"), logits.numpy())
    np.save(os.path.join(args.make, "logits64.npy"), logits64.numpy())


def compare(args, name: str, folder: str):
    """Our side: the run's initial variables from the file, the logits on the same pixels."""
    import jax
    import jax.numpy as jnp

    from robust_admm.experiments.config_base import base_config
    from robust_admm.models import get_model
    from robust_admm.training.initialization import initial_variables
    c = base_config()
    c.model.name, c.model.normalize = name, "imagenet"
    c.init.pretrained = os.path.join(folder, "model.safetensors")
    x = np.load(os.path.join(folder, "images.npy")).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    model = get_model(name, 1000, normalize="imagenet")
    t0 = time.perf_counter()
    params, stats = initial_variables(c, model, (1, *x.shape[1:]))
    t_import = time.perf_counter() - t0
    ours = np.asarray(jax.jit(model.apply)({"params": params, "batch_stats": stats},
                                           jnp.asarray(x)), np.float64)
    theirs = np.load(os.path.join(folder, "logits.npy")).astype(np.float64)
    theirs64 = np.load(os.path.join(folder, "logits64.npy"))
    agree = int((ours.argmax(1) == theirs64.argmax(1)).sum())
    print(f"RESULT model={name} library={args.library} images={len(x)} size={args.size} "
          f"max_abs_diff={np.abs(ours - theirs).max():.3g} "
          f"max_abs_diff_f64={np.abs(ours - theirs64).max():.3g} "
          f"torch_f32_vs_f64={np.abs(theirs - theirs64).max():.3g} "
          f"max_abs_logit={np.abs(theirs64).max():.3g} argmax_agree={agree}/{len(x)} "
          f"import_s={t_import:.1f}", flush=True)


def main():
    args = parse()
    if args.make:
        return make(args)
    if not args.torch_python:
        sys.exit("--torch-python is required: an environment with torch and torchvision")
    from robust_admm.models import get_model
    for name in args.models.split(","):
        try:
            get_model(name, 1000)
        except ValueError as e:
            print(f"SKIP model={name}: {e}", flush=True)
            continue
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([args.torch_python, os.path.abspath(__file__), "--make", folder,
                            "--arch", ARCHS[name], "--library", args.library,
                            "--images", str(args.images), "--size", str(args.size),
                            "--seed", str(args.seed), "--threads", str(args.threads)],
                           check=True)
            compare(args, name, folder)


if __name__ == "__main__":
    main()
