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


def make_eval_attack(config) -> attacks.Pgd:
    """The PGD of the evaluation during training: `eval.*` only (and the speed-only unroll)."""
    e = config.eval
    return attacks.Pgd(epsilon=e.epsilon, step_size=e.step_size, num_steps=e.num_steps,
                       random_start=e.random_start, loss=e.loss, restarts=e.restarts,
                       unroll=config.attack.unroll)


def eval_attack_label(config) -> str:
    """What measured `adv_acc`, in words (every robust accuracy names its attack)."""
    e = config.eval
    return (f"PGD-{e.num_steps} (L-inf eps {e.epsilon:g}, step {e.step_size:g}, "
            f"{e.restarts} restart(s), {'random' if e.random_start else 'no random'} start)")


def make_eval_step(model, eval_attack: attacks.Attack, mesh: Mesh | None = None,
                   pgd_loop: str = "auto", cpu_convolutions: str = "auto") -> CompiledStep:
    """`eval_step(params, batch_stats, images_u8, labels, valid, key)` -> (natural correct,
    adversarial correct, valid) counts over the valid entries of one batch, under any attack of
    `robust_admm.attacks`. Evaluation uses the running BatchNorm averages (train=False)
    for the attack too; no weight gradients."""
    shard = parallel.batch_constraint(mesh)
    jit = jit_with_options(cpu_convolutions)
    out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
    apply = lambda model_args, xa: apply_model(model, *model_args, xa, train=False)[0]

    def count(model_args, x, y, valid):
        return ((apply(model_args, x).argmax(-1) == y) & valid).sum()

    def valid_count(valid):
        return valid.sum()

    def prepare(images_u8, labels, valid):
        return shard(to_pixels(images_u8)), shard(labels), shard(valid)

    if resolve_pgd_loop(pgd_loop) == "fori" or eval_attack.is_identity:
        def eval_step(params, batch_stats, images_u8, labels, valid, key):
            m = (params, batch_stats)
            x, y, valid = prepare(images_u8, labels, valid)
            x_adv = attacks.run(eval_attack, functools.partial(apply, m), x, y, key)
            return count(m, x, y, valid), count(m, x_adv, y, valid), valid_count(valid)

        step = jit(eval_step, **out)
        return CompiledStep(step, [step])

    def begin(model_args, images_u8, labels, valid):
        x, y, valid = prepare(images_u8, labels, valid)
        return x, y, valid, count(model_args, x, y, valid), valid_count(valid)

    begin_c = jit(begin)  # the batch stays split along the mesh
    runner = attacks.HostRunner(eval_attack, apply, jit, shard)
    count_c = jit(count, **out)

    def host_eval_step(params, batch_stats, images_u8, labels, valid, key):
        m = (params, batch_stats)
        x, y, valid, nat, num = begin_c(m, images_u8, labels, valid)
        return nat, count_c(m, runner(m, x, y, key), y, valid), num

    return CompiledStep(host_eval_step, [begin_c, *runner.parts, count_c])


def evaluate(eval_step, params, batch_stats, batches, key) -> dict:
    """Natural and adversarial accuracy over `batches` of (images uint8, labels, valid)
    (`data.feed`: the padded test split on the devices, or streamed); batch i attacked
    with fold_in(key, i)."""
    nat = adv = total = 0
    for i, (images, labels, valid) in enumerate(batches):
        n, a, v = eval_step(params, batch_stats, images, labels, valid,
                            jax.random.fold_in(key, i))
        nat, adv, total = nat + n, adv + a, total + v
    total = int(total)
    if total == 0:
        raise ValueError("the evaluation read no valid test example")
    return {"nat_acc": int(nat) / total, "adv_acc": int(adv) / total, "eval_examples": total}
