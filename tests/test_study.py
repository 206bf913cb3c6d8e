"""Studies: cell claims between processes, the grid runner (killed, resumed, shared by two
processes), the report, initialisation schemes and inherited initialisation."""
import os
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, has_checkpoint
from robust_admm.experiments import inherit
from robust_admm.experiments import study
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.config_base import base_config
from robust_admm.experiments.study_config import train_config
from robust_admm.models import get_model
from robust_admm.runtime import claims
from robust_admm.runtime import logs
from robust_admm.training import initialization

STUDY = "configs/studies/digits_width.py"
CELLS = ["w2", "w4", "w4_to_w2", "w2_inherited"]  # the smoke grid, in the order it runs


def load_study(path=STUDY, preset="smoke"):
    """The study config of the file `path` (relative to the repository) with `preset`."""
    return train_config(os.path.join(ROOT, "setup.py"), path, preset)


def study_command(workdir):
    return [sys.executable, "-m", "robust_admm.study", f"--config={STUDY}:smoke",
            f"--workdir={workdir}"]


def png_size(path) -> tuple:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def started(output: str) -> list:
    """The cells a study process started, from its log."""
    return [line.split()[2] for line in output.splitlines()
            if line.startswith("[study] cell ") and " of " in line.split(":")[0]]


# ----------------------------------------------------------------------------- claims

def test_a_claim_excludes_other_processes_and_ends_with_its_holder(tmp_path):
    cell = str(tmp_path / "cell")
    code = ("import sys, time\nfrom robust_admm.runtime import claims\n"
            "with claims.claim(sys.argv[1]) as mine:\n    print(mine, flush=True)\n"
            "    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, cell], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with claims.claim(cell) as mine:
            assert mine is False
        assert claims.holder(cell).endswith(f":{holder.pid}")
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock still goes with the process
        holder.wait()
    with claims.claim(cell) as mine:
        assert mine is True
        assert claims.holder(cell).endswith(f":{os.getpid()}")


# ----------------------------------------------------------------------------- configs

def test_the_width_grid_has_the_papers_cells_in_a_runnable_order(tmp_path):
    s = load_study("configs/studies/mnist_width.py", "cpu")
    order = study.validate_study(s, str(tmp_path))
    assert order == ["w2", "w4", "w8", "w8_to_w2", "w8_to_w4", "w2_inherited", "w4_inherited"]
    c = s.cells
    assert [c[n].train.model.width for n in order] == [2, 4, 8, 8, 8, 8, 8]
    assert c.w8_to_w2.start_from == "w8" and c.w8_to_w2.train.prune.to_width == 2
    assert c.w4_inherited.inherit_from == "w8_to_w4"
    assert c.w4_inherited.train.program == "pretrain" and c.w4.train.program == "pretrain"
    assert c.w4_inherited.train.pretrain.epochs == c.w4.train.pretrain.epochs
    cfg = study.cell_train_config(s, "w8_to_w4", str(tmp_path))
    assert cfg.stages == "admm,retrain"
    cfg = study.cell_train_config(s, "w4_inherited", str(tmp_path))
    assert cfg.init.inherit_from == os.path.abspath(workdir_lib.cell_dir(str(tmp_path), "w8_to_w4"))


@pytest.mark.parametrize("path", ["configs/studies/mnist_kinds.py",
                                  "configs/studies/mnist_progressive.py", STUDY])
def test_every_study_config_validates(path, tmp_path):
    s = load_study(path, "smoke" if path == STUDY else "")
    assert study.validate_study(s, str(tmp_path))


def test_a_study_that_cannot_run_is_refused_naming_the_cell(tmp_path):
    def refused(edit, *words):
        s = load_study()
        s.unlock()
        edit(s)
        with pytest.raises(ValueError) as e:
            study.validate_study(s, str(tmp_path))
        for w in words:
            assert w in str(e.value), str(e.value)

    refused(lambda s: setattr(s.cells.w4_to_w2, "start_from", "w9"), "w4_to_w2", "'w9'")
    refused(lambda s: setattr(s, "clock_every_s", 0.0), "clock_every_s=0.0", "> 0")
    refused(lambda s: setattr(s.cells.w4, "inherit_from", "w2_inherited"), "cycle")
    refused(lambda s: setattr(s.cells.w4_to_w2.train.model, "width", 3), "w4_to_w2",
            "model.width")
    refused(lambda s: setattr(s.cells.w4_to_w2.train.pretrain, "lr", 0.5), "pretrain.lr")
    refused(lambda s: setattr(s.cells.w4_to_w2.train, "mixup_alpha", 0.2), "mixup_alpha")
    refused(lambda s: setattr(s.cells.w2.train.model, "name", "nope"), "cell 'w2'", "nope")
    refused(lambda s: setattr(s.cells.w2.labels, "init", "magic"), "magic")
    refused(lambda s: s.cells.__delattr__("w2") or [s.cells.__delattr__(n) for n in
                                                     ("w4", "w4_to_w2", "w2_inherited")],
            "no cells")


# ----------------------------------------------------------------------------- the runner

@pytest.fixture(scope="module")
def shared_study(tmp_path_factory):
    """A study killed (SIGKILL) inside its second cell after a checkpoint, then finished by
    two processes started together: (workdir, first output, the two outputs, their pids,
    the first cell's files before the two ran)."""
    workdir = str(tmp_path_factory.mktemp("study"))
    first = subprocess.Popen(study_command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    w4 = workdir_lib.cell_dir(workdir, "w4")
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if has_checkpoint(w4, "pretrain"):
            break
        time.sleep(0.02)
    first.kill()
    out_first = first.communicate()[0]
    assert workdir_lib.is_cell_done(workdir, "w2") and not workdir_lib.is_cell_done(workdir, "w4"), out_first
    before = {f: open(os.path.join(workdir_lib.cell_dir(workdir, "w2"), f), "rb").read()
              for f in ("cell.json", "metrics.jsonl", "summary.json")}
    procs = [subprocess.Popen(study_command(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return workdir, out_first, outs, [p.pid for p in procs], before, first.pid


def test_a_killed_study_resumes_without_redoing_a_finished_cell(shared_study):
    workdir, out_first, outs, _, before, first_pid = shared_study
    assert started(out_first) == ["w2", "w4"]
    assert all("w2" not in started(out) for out in outs)
    for f, data in before.items():  # the finished cell is untouched
        with open(os.path.join(workdir_lib.cell_dir(workdir, "w2"), f), "rb") as fh:
            assert fh.read() == data, f
    assert logs.read_json(workdir_lib.cell_result_path(workdir, "w2"))["ran_by"]["pid"] == first_pid
    # The killed cell went on from its checkpoint, not from its first step.
    log = next(out for out in outs if "w4" in started(out))
    w4_log = log.split("[study] cell w4 ")[1]
    assert "[pretrain] resuming from step" in w4_log or "already complete" in w4_log, log
    # Its time counts both processes: the killed one up to its last save (every 0.5 s).
    result = logs.read_json(workdir_lib.cell_result_path(workdir, "w4"))
    attempts = logs.read_json(os.path.join(workdir_lib.cell_dir(workdir, "w4"), "time.json"))
    attempts = attempts["attempts"]
    assert [a["pid"] for a in attempts] == [first_pid, result["ran_by"]["pid"]]
    assert result["processes"] == 2 and attempts[0]["seconds"] > 0.5
    assert result["wall_time_s"] == pytest.approx(sum(a["seconds"] for a in attempts))
    assert result["wall_time_s"] > result["this_process_s"]
    for name in CELLS[2:]:  # cells run by one process
        r = logs.read_json(workdir_lib.cell_result_path(workdir, name))
        assert r["processes"] == 1 and r["wall_time_s"] == r["this_process_s"]


def test_two_processes_sharing_a_study_never_run_the_same_cell(shared_study):
    workdir, _, outs, pids, _, _ = shared_study
    runs = [started(out) for out in outs]
    for name in CELLS[1:]:
        assert sum(r.count(name) for r in runs) == 1, runs
        assert logs.read_json(workdir_lib.cell_result_path(workdir, name))["ran_by"]["pid"] in pids
    assert all(f"all {len(CELLS)} cells done" in out for out in outs)


def test_the_inherited_cell_trains_the_pruned_structure_from_its_initial_weights(shared_study):
    workdir = shared_study[0]
    pruned = workdir_lib.load_final_state(workdir_lib.cell_dir(workdir, "w4_to_w2"), "retrain")
    inherited = workdir_lib.load_final_state(workdir_lib.cell_dir(workdir, "w2_inherited"), "pretrain")
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    kept = sum(int(m.sum()) for m in leaves(pruned["masks"]))
    assert kept < sum(m.size for m in leaves(pruned["masks"]))
    for m_src, m, w in zip(leaves(pruned["masks"]), leaves(inherited["masks"]),
                           leaves(inherited["params"])):
        np.testing.assert_array_equal(m, m_src)
        assert not np.any(w[~m])  # pruned positions stayed exactly zero
    # What it started from, against an independent re-derivation: the source's own initial
    # weights (flax init with the run's key) at the kept positions.
    s = load_study()
    cfg = study.cell_train_config(s, "w2_inherited", workdir)
    model = get_model(cfg.model.name, 10, cfg.model.width)
    shape = (1, 8, 8, 1)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))["params"]
    params, _, masks = inherit.inherited(cfg, model, shape, like)
    source = model.init(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 12345),
                        jnp.zeros(shape))["params"]
    for p, w0, m in zip(leaves(params), leaves(source), leaves(pruned["masks"])):
        np.testing.assert_array_equal(np.asarray(p), np.where(m, np.asarray(w0), 0))
    with cfg.unlocked():
        cfg.init.inherit = "trained"
    params, _, _ = inherit.inherited(cfg, model, shape, like)
    for p, w in zip(leaves(params), leaves(pruned["params"])):
        np.testing.assert_array_equal(np.asarray(p), w)


def test_the_report_of_a_study_and_of_a_run(shared_study):
    workdir = shared_study[0]
    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
        text = f.read()
    results = [logs.read_json(workdir_lib.cell_result_path(workdir, n)) for n in CELLS]
    for r in results:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r['cell']} |"))
        assert f"| {100 * r['natural_acc']:.2f} |" in row
        for a in r["attacks"].values():
            assert f"| {100 * a['robust_acc']:.2f} |" in row
    assert all(f"{label} %" in text for label in results[0]["attacks"])
    assert "run by more than one: w4 (2)." in text
    pngs = ["accuracy_vs_compression.png", "width_heatmap.png"] + [
        os.path.join("cells", n, p) for n in CELLS for p in ("curves.png",
                                                               "accuracy_vs_compression.png")]
    for p in pngs:
        assert png_size(os.path.join(workdir, p)) == (800, 450), p
    for p in pngs[:2] + [os.path.join("cells", n, "curves.png") for n in CELLS]:
        assert f"]({p})" in text, p
    cell_report = open(os.path.join(workdir_lib.cell_dir(workdir, "w4_to_w2"), "report.md")).read()
    for phase in ("admm", "retrain"):
        assert f"| {phase} |" in cell_report
    # Rerun when everything is done: nothing runs again; the report is written again.
    os.remove(os.path.join(workdir, "report.md"))
    assert study.run_study(load_study(), workdir) == []
    assert os.path.exists(os.path.join(workdir, "report.md"))


def test_the_report_command_refuses_a_directory_without_a_run(tmp_path):
    r = subprocess.run([sys.executable, "-m", "robust_admm.report", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "neither a study" in r.stderr


# ----------------------------------------------------------------------------- init

def _kernels(params):
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in
            jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"}


def _config(scheme):
    c = base_config()
    c.init.scheme = scheme
    return c


@pytest.mark.parametrize("scheme", ["xavier_uniform", "kaiming_normal", "orthogonal"])
def test_initialisation_schemes_draw_kernels_as_defined(scheme):
    model = get_model("lenet_adv", 10, 4)
    shape = (1, 28, 28, 1)
    params, _ = initialization.initial_variables(_config(scheme), model, shape)
    default, _ = initialization.initial_variables(_config("default"), model, shape)
    for path, k in _kernels(params).items():
        # Glorot's and He's fans: (in, out) channels times the kernel's receptive field.
        field = int(np.prod(k.shape[:-2]))
        fan_in, fan_out = k.shape[-2] * field, k.shape[-1] * field
        flat = k.reshape(-1, k.shape[-1]).astype(np.float64)
        if scheme == "xavier_uniform":
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            assert np.abs(flat).max() <= bound
            assert abs(flat.var() / (bound ** 2 / 3) - 1) < 0.2, path
        elif scheme == "kaiming_normal":
            assert abs(flat.std() / np.sqrt(2.0 / fan_in) - 1) < 0.2, path
        else:  # orthonormal columns (fewer columns than rows in every LeNet kernel)
            np.testing.assert_allclose(flat.T @ flat, np.eye(k.shape[-1]), atol=1e-4)
        assert not np.array_equal(k, _kernels(default)[path])
    biases = [v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
              if p[-1].key == "bias"]
    assert all(not np.any(np.asarray(b)) for b in biases)


def test_the_default_scheme_is_flax_init_and_a_bad_one_is_refused():
    model = get_model("lenet_adv", 10, 2)
    shape = (1, 28, 28, 1)
    params, _ = initialization.initial_variables(_config("default"), model, shape)
    ref = model.init(jax.random.fold_in(jax.random.PRNGKey(0), 12345), jnp.zeros(shape))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref["params"])
    with pytest.raises(ValueError, match="init.scheme='he'.*xavier_uniform"):
        initialization.initial_variables(_config("he"), model, shape)


def test_a_study_file_of_an_older_release_is_read_with_the_fields_added_since(tmp_path):
    """study.json whose cells lack the streamed-data fields (as the previous release wrote
    it) is the same study; a real change is still refused."""
    s = load_study("configs/studies/mnist_width.py", "cpu")
    workdir = str(tmp_path)
    study.check_study_file(workdir, s, allow_change=False)
    path = workdir_lib.study_path(workdir)
    stored = logs.read_json(path)
    new_fields = ("image_size", "check_headers", "bad_images", "max_pixels", "num_workers",
                  "num_threads", "prefetch", "crops", "channels")
    for cell in stored["cells"].values():
        for field in new_fields:
            del cell["train"]["data"][field]
    logs.write_json(path, stored)
    study.check_study_file(workdir, s, allow_change=False)
    s.cells.w2.train.pretrain.epochs += 1
    with pytest.raises(ValueError, match="cells.w2.train.pretrain.epochs"):
        study.check_study_file(workdir, s, allow_change=False)


@pytest.mark.parametrize("theirs, refused", [('{"features": [8, 16]}', False),
                                             ('{ "features" : [8,16] }', False),
                                             ('{"features": [8, 32]}', True), ("", True)])
def test_an_inherited_users_model_must_be_built_with_the_sources_kwargs(tmp_path, theirs,
                                                                         refused):
    """model.kwargs are part of the architecture: other constructor arguments are refused
    naming the field; the same arguments spelled otherwise are not (the run goes on to
    read the source's phases, which this source lacks)."""
    source = base_config()
    source.model.name, source.model.kwargs = "my_pkg.nets:Net", '{"features": [8, 16]}'
    os.makedirs(tmp_path / "source")
    workdir_lib.write_config(str(tmp_path / "source"), source)
    config = base_config()
    config.model.name, config.model.kwargs = "my_pkg.nets:Net", theirs
    config.init.inherit_from = str(tmp_path / "source")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        inherit.inherited(config, None, None, None)
    assert ("model.kwargs" in str(e.value)) is refused, e.value
