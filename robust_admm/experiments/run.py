"""A run of a program of phases in a workdir (the default program: pretrain -> admm ->
retrain): `train_and_evaluate(config, workdir)`, what `robust_admm.train` calls.

Writes into the workdir (layout: `experiments/workdir.py`) config.json, metrics.jsonl,
each phase's checkpoints and summary.json. Called again on the same workdir, it resumes
where the run stopped.
"""
import os
import time

import jax
import jax.numpy as jnp

from robust_admm.data import Split, describe, fingerprint, load_dataset
from robust_admm.data.batching import pad_to_multiple
from robust_admm.data.feed import DeviceFeed, DeviceTest, Reading, StreamFeed, StreamTest
from robust_admm.data.streamed import describe_streamed, open_streamed, streamed
from robust_admm.evaluation.eval_step import (TOP5_ABOVE_CLASSES, make_eval_attack,
                                              make_eval_step)
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.inherit import inherited
from robust_admm.experiments.validation import validate_config
from robust_admm.models import check_model, get_model, is_import_path
from robust_admm.runtime import logs, parallel
from robust_admm.training.initialization import initial_variables
from robust_admm.training.loop import (Run, initial_state, previous_stage_result, run_stage,
                                       sigterm_flag, stage_summary)
from robust_admm.training.program import phase_specs


def load_data(config):
    ds = load_dataset(config.data.name, config.data.source, config.data.dir or None)
    train, test = ds.train, ds.test
    if config.data.train_examples:
        train = Split(train.images[: config.data.train_examples],
                           train.labels[: config.data.train_examples])
    if config.data.test_examples:
        test = Split(test.images[: config.data.test_examples],
                          test.labels[: config.data.test_examples])
    return ds, train, test


def timed_fingerprint(fn, *args) -> dict:
    """`fn(*args)`, its time logged (a fingerprint of large data reads a few MiB)."""
    t0 = time.time()
    out = fn(*args)
    logs.log(f"fingerprinted the data ({out['kind']}) in {time.time() - t0:.2f} s")
    return out


def open_data(config, mesh) -> tuple:
    """(description, class count, model input shape, training feed, test batches,
    fingerprint) of the config's data: kept on the devices (tfds, files, npz) or streamed
    (folder, shards); the fingerprint (data/fingerprint.py) catches a resume on other data."""
    d = config.data
    if streamed(d.source, d.name):
        ds = open_streamed(d.name, d.source, d.dir, d.check_headers, d.max_pixels,
                           log=logs.log)
        reading = Reading.of_config(d, mesh)
        return (describe_streamed(ds, d.image_size), ds.num_classes,
                (1, d.image_size, d.image_size, d.channels),
                StreamFeed(ds.train, config.batch_size, reading), StreamTest(ds.test, reading),
                timed_fingerprint(fingerprint.of_streamed, ds, d.dir))
    ds, train, test = load_data(config)
    return (describe(ds), ds.num_classes, (1,) + train.images.shape[1:],
            DeviceFeed(parallel.replicate((train.images, train.labels), mesh),
                       config.batch_size, mesh),
            DeviceTest(pad_to_multiple(test.images, test.labels, config.eval.batch_size,
                                       mesh)),
            timed_fingerprint(fingerprint.of_arrays, {"train": ds.train, "test": ds.test}))


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       allow_data_change: bool = False) -> dict:
    """Runs the configured stages in `workdir`; returns the summary (also summary.json).

    The run holds `workdir` while it runs (`workdir.hold_run`): a second process started
    on it is refused at once, naming the holder, before anything is written. A resume on
    data other than the run's (its fingerprint, data.json) is refused unless
    `allow_data_change`; `allow_config_change` does not cover it."""
    validate_config(config)  # a bad config is refused before the workdir is made
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.hold_run(workdir, jax.process_index()):
        return _train_and_evaluate(config, workdir, allow_config_change, allow_data_change)


def _train_and_evaluate(config, workdir: str, allow_config_change: bool,
                        allow_data_change: bool = False) -> dict:
    program, phases = validate_config(config)
    mesh = parallel.make_mesh()
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.check_config(workdir, config, allow_config_change)
    t_start = time.time()
    about, num_classes, input_shape, train, test, data_print = open_data(config, mesh)
    logs.log(about)
    workdir_lib.check_data(workdir, data_print, allow_data_change)
    workdir_lib.write_config(workdir, config)

    model = get_model(config.model.name, num_classes, config.model.width,
                      config.model.dtype, config.model.normalize, config.model.kwargs)
    if is_import_path(config.model.name):  # a user's model, checked on the data's shapes
        check_model(model, config.model.name, input_shape, num_classes)
    key = jax.random.PRNGKey(config.seed)
    params, batch_stats = initial_variables(config, model, input_shape)
    specs = phase_specs(config, program, params, num_classes, input_shape)

    eval_attack = make_eval_attack(config)
    masks = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, bool), params)
    if config.init.inherit_from and phases[0].index == 0:
        params, batch_stats, masks = inherited(config, model, input_shape, params)
    summary_path = workdir_lib.summary_path(workdir)
    summary = workdir_lib.read_summary(workdir)  # keeps the results of phases run earlier
    summary["program"] = [p.name for p in program]

    with sigterm_flag() as preempted:
        run = Run(config=config, model=model, mesh=mesh,
                  checkpoint_dirs={p.name: workdir_lib.stage_dir(workdir, p.name)
                                   for p in program},
                  train=train, test=test,
                  program=program, specs=specs,
                  eval_step=make_eval_step(model, eval_attack, mesh, config.attack.loop,
                                           config.cpu_convolutions,
                                           top5=num_classes > TOP5_ABOVE_CLASSES),
                  natural_eval_step=make_eval_step(model, None, mesh, config.attack.loop,
                                                   config.cpu_convolutions,
                                                   top5=num_classes > TOP5_ABOVE_CLASSES),
                  writer=logs.MetricsWriter(workdir_lib.metrics_path(workdir)), key=key,
                  preempted=preempted)
        if phases[0].index > 0:
            prev = program[phases[0].index - 1]
            like = initial_state(run, prev, 1, params, batch_stats, masks)[0]
            params, batch_stats, masks = previous_stage_result(run, phases[0].name,
                                                               prev.name, like)
        for phase in phases:
            state, result, speed = run_stage(run, phase, params, batch_stats, masks)
            params, batch_stats, masks = state.params, state.batch_stats, state.masks
            earlier = summary["stages"].get(phase.name, {}).get("speed")
            summary["stages"][phase.name] = dict(stage_summary(run, phase, state, result),
                                                 speed=speed or earlier)
            # In program order, whatever order earlier runs wrote them in.
            summary["stages"] = {p.name: summary["stages"][p.name] for p in program
                                 if p.name in summary["stages"]}
            logs.write_json(summary_path, summary)
    stages = [p.name for p in phases]
    run.writer.write(kind="done", stages=stages, wall_time_s=time.time() - t_start)
    logs.log(logs.summary_table(summary))
    logs.log(f"done in {logs.fmt_duration(time.time() - t_start)}; outputs in {workdir}")
    return summary
