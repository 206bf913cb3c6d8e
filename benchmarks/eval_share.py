"""Wall time of a training run and the share of it spent in the evaluations during
training, measured from outside the loop (so the same script times any revision of the
package on PYTHONPATH, including one that does not log the share itself).

    PYTHONPATH=<checkout> python benchmarks/eval_share.py \
        --config <checkout>/configs/mnist.py:natural --workdir W \
        --config.data.source=files --config.data.dir=../shared/data/mnist

Prints one line per phase, `[phase] evaluation X s of Y s (Z%)`, and a last line
`RESULT wall_s=... eval_s=... eval_share=...` (the phases together).
"""
import sys
import time

from absl import app

from robust_admm import train
from robust_admm.experiments import run as run_lib
from robust_admm.training import loop


def main():
    spans = []  # (phase or None, seconds) of every evaluation
    phases = []  # (phase, seconds) of every run_stage
    current = [None]
    evaluate, run_stage = loop.evaluate, run_lib.run_stage

    def timed_evaluate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return evaluate(*args, **kwargs)
        finally:
            spans.append((current[0], time.perf_counter() - t0))

    def timed_run_stage(run, phase, *args, **kwargs):
        current[0] = phase.name
        t0 = time.perf_counter()
        try:
            return run_stage(run, phase, *args, **kwargs)
        finally:
            phases.append((phase.name, time.perf_counter() - t0))

    loop.evaluate, run_lib.run_stage = timed_evaluate, timed_run_stage
    t_start = time.perf_counter()
    try:
        train.run(sys.argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    wall = time.perf_counter() - t_start
    total_eval = 0.0
    for name, seconds in phases:
        ev = sum(s for p, s in spans if p == name)
        total_eval += ev
        print(f"[{name}] evaluation {ev:.1f} s of {seconds:.1f} s ({100 * ev / seconds:.0f}%)")
    print(f"RESULT wall_s={wall:.1f} eval_s={total_eval:.1f} "
          f"eval_share={total_eval / wall:.3f} evaluations={len(spans)}")


if __name__ == "__main__":
    main()
