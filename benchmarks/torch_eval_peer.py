"""Eager PyTorch evaluation under attack: the peer of `benchmarks/step.py --mode eval`.

Takes the models and the PGD of the PyTorch training peer (`--torch-peer PATH`, the
shared bench tools' torch_peer.py, loaded as a module so that its own benchmark does not
run) and times, for one batch: natural accuracy, PGD with random start (k steps of input
gradients only: every weight frozen, BatchNorm on its running averages), accuracy on the
adversarial batch. Random data shaped like MNIST / CIFAR-10, as the training peer.

    ~/torchvenv/bin/python benchmarks/torch_eval_peer.py \\
        --torch-peer ../shared/bench/torch_peer.py --model vgg16 --iters 3

Output line:  RESULT impl=torch-eager-eval model=... img/s=...  (evaluated images/s)
"""
import argparse
import runpy
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-peer", required=True, help="path of the training peer (models, PGD)")
    p.add_argument("--model", default="lenet_adv", choices=["lenet_adv", "vgg16", "resnet18", "wrn28_4"])
    p.add_argument("--width", type=int, default=4, help="LeNet_adv width multiplier")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 40 mnist / 10 cifar)")
    p.add_argument("--batch", type=int, default=None, help="default 64 mnist / 128 cifar")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse()
    # The training peer parses its flags at import and runs its benchmark only as __main__.
    sys.argv = [args.torch_peer, "--model", args.model, "--width", str(args.width),
                "--threads", str(args.threads), "--seed", str(args.seed)]
    peer = runpy.run_path(args.torch_peer, run_name="torch_peer")
    torch = peer["torch"]
    torch.manual_seed(args.seed)
    net, shape, eps, alpha, k_def, b_def = peer["build"]()
    k = args.steps if args.steps is not None else k_def
    b = args.batch if args.batch is not None else b_def
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(b, *shape)
    y = torch.randint(0, 10, (b,))

    def step():
        with torch.no_grad():
            natural = (net(x).argmax(1) == y).sum()
        xa = peer["pgd"](net, x, y, eps, alpha, k)
        with torch.no_grad():
            adversarial = (net(xa).argmax(1) == y).sum()
        return natural + adversarial

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step().item()
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        last = step()
    last.item()
    dt = time.perf_counter() - t0
    print(f"RESULT impl=torch-eager-eval model={args.model} "
          f"width={args.width if args.model == 'lenet_adv' else '-'} steps={k} batch={b} "
          f"threads={args.threads} iters={args.iters} warmup_s={t_warm:.1f} "
          f"s/iter={dt / args.iters:.4f} img/s={args.iters * b / dt:.2f}", flush=True)


if __name__ == "__main__":
    main()
