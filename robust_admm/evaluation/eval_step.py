"""The evaluation during training: natural accuracy and accuracy under the config's PGD,
over the test split's batches (kept on the devices or streamed), one compiled step per
batch."""
import functools

import jax
from jax.sharding import Mesh

from robust_admm import attacks
from robust_admm.data.batching import to_pixels
from robust_admm.models import apply_model
from robust_admm.runtime import parallel
from robust_admm.runtime.compiler import CompiledStep, jit_with_options, resolve_pgd_loop

TOP5_ABOVE_CLASSES = 10  # top-5 accuracy is reported too for more classes than this


def make_eval_attack(config) -> attacks.Pgd:
    """The PGD of the evaluation during training: `eval.*` only (and the speed-only unroll)."""
    e = config.eval
    return attacks.Pgd(epsilon=e.epsilon, step_size=e.step_size, num_steps=e.num_steps,
                       random_start=e.random_start, loss=e.loss, restarts=e.restarts,
                       unroll=config.attack.unroll)


def eval_attack_label(config) -> str | None:
    """What measured `adv_acc`, in words (every robust accuracy names its attack); None
    where the evaluation runs no attack (eval.num_steps 0 or eval.epsilon 0): natural
    accuracy only, never reported as a robust one."""
    e = config.eval
    if make_eval_attack(config).is_identity:
        return None
    return (f"PGD-{e.num_steps} (L-inf eps {e.epsilon:g}, step {e.step_size:g}, "
            f"{e.restarts} restart(s), {'random' if e.random_start else 'no random'} start)")


# eval.adversarial: which evaluations during training run the attack (config_base.py).
EVAL_ADVERSARIAL = ("auto", "every_eval", "phase_end")


def attack_schedule(config) -> str:
    """When the evaluations during training attack: 'every_eval', 'phase_end' (natural
    accuracy only before a phase's end) or 'never' (no attack configured); eval.adversarial
    with 'auto' resolved by the setting."""
    if eval_attack_label(config) is None:
        return "never"
    mode = config.eval.adversarial
    if mode == "auto":
        return "phase_end" if config.setting == "natural" else "every_eval"
    return mode


def make_eval_step(model, eval_attack: attacks.Attack | None, mesh: Mesh | None = None,
                   pgd_loop: str = "auto", cpu_convolutions: str = "auto",
                   top5: bool = False) -> CompiledStep:
    """`eval_step(params, batch_stats, images_u8, labels, valid, key)` -> counts over the
    valid entries of one batch: {"nat": natural correct, "adv": adversarial correct,
    "valid": valid entries}, with `top5` also "nat_top5", "adv_top5" (the label among the
    5 largest logits), under any attack of `robust_admm.attacks`. Evaluation uses the
    running BatchNorm averages (train=False) for the attack too; no weight gradients.
    With no attack (None, or one that leaves the inputs as they are) it compiles and
    counts the natural accuracy only: no "adv" counts."""
    shard = parallel.batch_constraint(mesh)
    jit = jit_with_options(cpu_convolutions)
    out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
    apply = lambda model_args, xa: apply_model(model, *model_args, xa, train=False)[0]

    def count(model_args, x, y, valid, name):
        logits = apply(model_args, x)
        counts = {name: ((logits.argmax(-1) == y) & valid).sum()}
        if top5:
            top = jax.lax.top_k(logits, 5)[1]
            counts[name + "_top5"] = ((top == y[:, None]).any(-1) & valid).sum()
        return counts

    def prepare(images_u8, labels, valid):
        return shard(to_pixels(images_u8)), shard(labels), shard(valid)

    if eval_attack is None or eval_attack.is_identity:
        def natural_step(params, batch_stats, images_u8, labels, valid, key):
            x, y, valid = prepare(images_u8, labels, valid)
            return {**count((params, batch_stats), x, y, valid, "nat"), "valid": valid.sum()}

        step = jit(natural_step, **out)
        return CompiledStep(step, [step])

    if resolve_pgd_loop(pgd_loop) == "fori":
        def eval_step(params, batch_stats, images_u8, labels, valid, key):
            m = (params, batch_stats)
            x, y, valid = prepare(images_u8, labels, valid)
            x_adv = attacks.run(eval_attack, functools.partial(apply, m), x, y, key)
            return {**count(m, x, y, valid, "nat"), **count(m, x_adv, y, valid, "adv"),
                    "valid": valid.sum()}

        step = jit(eval_step, **out)
        return CompiledStep(step, [step])

    def begin(model_args, images_u8, labels, valid):
        x, y, valid = prepare(images_u8, labels, valid)
        return x, y, valid, {**count(model_args, x, y, valid, "nat"), "valid": valid.sum()}

    begin_c = jit(begin)  # the batch stays split along the mesh
    runner = attacks.HostRunner(eval_attack, apply, jit, shard)
    count_c = jit(functools.partial(count, name="adv"), **out)

    def host_eval_step(params, batch_stats, images_u8, labels, valid, key):
        m = (params, batch_stats)
        x, y, valid, nat = begin_c(m, images_u8, labels, valid)
        return {**nat, **count_c(m, runner(m, x, y, key), y, valid)}

    return CompiledStep(host_eval_step, [begin_c, *runner.parts, count_c])


class EvaluationInterrupted(Exception):
    """`stop()` held before a batch of `evaluate`: the evaluation ended there, unfinished."""

    def __init__(self, done: int):
        super().__init__(f"evaluation stopped after {done} batch(es)")
        self.done = done


def evaluate(eval_step, params, batch_stats, batches, key, stop=None) -> dict:
    """Natural and adversarial accuracy (top-1; top-5 too where the step counts it; no
    `adv_acc` from a natural-only step) over
    `batches` of (images uint8, labels, valid) (`data.feed`: the padded test split on
    the devices, or streamed); batch i attacked with fold_in(key, i). `stop()` is asked
    before each batch: once true, `EvaluationInterrupted` (so a SIGTERM waits for one
    batch at most, not the whole evaluation)."""
    totals = {}
    try:
        for i, (images, labels, valid) in enumerate(batches):
            if stop is not None and stop():
                raise EvaluationInterrupted(i)
            counts = eval_step(params, batch_stats, images, labels, valid,
                               jax.random.fold_in(key, i))
            totals = {k: totals.get(k, 0) + v for k, v in counts.items()}
    finally:
        if hasattr(batches, "close"):  # a streamed split's reader stops with its generator
            batches.close()
    total = int(totals.get("valid", 0))
    if total == 0:
        raise ValueError("the evaluation read no valid test example")
    result = {k + "_acc": int(totals[k]) / total for k in ("nat", "adv") if k in totals}
    result["eval_examples"] = total
    result.update({k: int(totals[k]) / total for k in ("nat_top5", "adv_top5") if k in totals})
    return result
