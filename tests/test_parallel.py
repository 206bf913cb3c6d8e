"""robust_admm.runtime.parallel: the mesh and shardings on 8 simulated CPU devices, a real
2-process run on localhost (jax.distributed through the ROBUST_ADMM_* variables), env
validation.

The multi-device checks run in subprocesses: the device count (XLA_FLAGS) and
jax.distributed must be set before JAX starts, and this pytest process has started it.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from robust_admm.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUST_ADMM_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        # One thread per process: the machine may be busy; the test is about semantics.
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in stdout:\n{stdout}"
    return json.loads(lines[-1][len("RESULT "):])


EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from robust_admm.runtime import parallel

    mesh = parallel.make_mesh()
    out = {"size": mesh.size, "axis_names": list(mesh.axis_names),
           "auto": [t == jax.sharding.AxisType.Auto for t in mesh.axis_types]}
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    xb = jax.device_put(x, parallel.batch_sharding(mesh))
    out["shards"] = sorted(s.data.shape[0] for s in xb.addressable_shards)
    out["shard_devices"] = len({s.device for s in xb.addressable_shards})

    state = parallel.replicate({"w": np.array([1.0, 2.0, 3.0], np.float32),
                                "key": jax.random.key(0)}, mesh)
    out["state_replicated"] = bool(state["w"].sharding.is_fully_replicated)
    out["key_replicated"] = bool(state["key"].sharding.is_fully_replicated)

    def f(state, batch):
        return jnp.mean(batch * state["w"], axis=0), jnp.sum(batch)

    g = jax.jit(f, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                out_shardings=parallel.replicated(mesh))
    mean, total = g({"w": state["w"]}, xb)
    out["mean"] = np.asarray(mean).tolist()
    out["sum"] = float(total)
    out["mean_replicated"] = bool(mean.sharding.is_fully_replicated)
    out["per_device"] = parallel.check_global_batch(64, mesh)
    try:
        parallel.check_global_batch(12, mesh)
    except ValueError as e:
        out["error"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def test_eight_devices_mesh_shardings_and_jit():
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr}"
    out = _result(proc.stdout)
    assert out["size"] == 8 and out["axis_names"] == ["data"]
    assert out["auto"] == [True]
    assert out["shards"] == [8] * 8 and out["shard_devices"] == 8
    assert out["state_replicated"] and out["key_replicated"] and out["mean_replicated"]
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    np.testing.assert_allclose(out["mean"], (x * np.array([1.0, 2.0, 3.0])).mean(0),
                               rtol=1e-6)
    np.testing.assert_allclose(out["sum"], x.sum(), rtol=1e-6)
    assert out["per_device"] == 8
    assert "batch_size=12" in out["error"] and "8" in out["error"]
    assert "8 or 16" in out["error"]


TWO_PROCESS_WORKER = textwrap.dedent("""
    import json
    from robust_admm.runtime import parallel

    # Through the ROBUST_ADMM_* variables, before any other JAX call.
    assert parallel.initialize_distributed() is True
    assert parallel.initialize_distributed() is False  # idempotent

    import jax, jax.numpy as jnp, numpy as np

    mesh = parallel.make_mesh()
    n = 16
    global_x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    sl = parallel.process_slice(n)
    xb = parallel.host_local_batch_to_global(global_x[sl], mesh)
    state = parallel.replicate({"w": np.array([1.0, 2.0, 3.0], np.float32),
                                "key": jax.random.key(0)}, mesh)

    def f(state, batch):
        return jnp.mean(batch * state["w"], axis=0), jnp.sum(batch)

    g = jax.jit(f, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                out_shardings=parallel.replicated(mesh))
    mean, total = g({"w": state["w"]}, xb)
    # A collective on the replicated typed key too: fold_in then a global reduction.
    k = jax.jit(lambda s: jax.random.key_data(jax.random.fold_in(s["key"], 1)).sum(),
                out_shardings=parallel.replicated(mesh))(state)
    print("RESULT " + json.dumps({
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "mesh_size": mesh.size,
        "slice": [sl.start, sl.stop],
        "global_shape": list(xb.shape),
        "mean": np.asarray(mean.addressable_data(0)).tolist(),
        "sum": float(total.addressable_data(0)),
        "key_sum": int(k.addressable_data(0)),
        "main": parallel.is_main_process(),
        "state_replicated": bool(state["w"].sharding.is_fully_replicated),
    }), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost():
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(2, ROBUST_ADMM_MULTIHOST="1", ROBUST_ADMM_COORDINATOR=f"localhost:{port}",
                   ROBUST_ADMM_NUM_PROCESSES="2", ROBUST_ADMM_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_PROCESS_WORKER], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        errs = [p.communicate()[1] for p in procs]
        pytest.fail("2-process run timed out after %ds; stderr:\n%s"
                    % (TIMEOUT_S, "\n----\n".join(errs)))
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}; stderr:\n{err}"
    results = [_result(out) for out, _ in outputs]

    n = 16
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    key_sum = None
    for i, r in enumerate(results):
        assert r["process_index"] == i and r["process_count"] == 2
        assert r["devices"] == 4 and r["local_devices"] == 2 and r["mesh_size"] == 4
        assert r["slice"] == [8 * i, 8 * (i + 1)]
        assert r["global_shape"] == [16, 3]
        assert r["state_replicated"]
        np.testing.assert_allclose(r["mean"], (x * np.array([1.0, 2.0, 3.0])).mean(0),
                                   rtol=1e-6)
        np.testing.assert_allclose(r["sum"], x.sum(), rtol=1e-6)
        key_sum = r["key_sum"] if key_sum is None else key_sum
        assert r["key_sum"] == key_sum
    assert [r["main"] for r in results].count(True) == 1 and results[0]["main"]


# ----------------------------------------------------------------------- env validation

def test_not_multihost_returns_none_and_does_not_initialise():
    assert parallel.distributed_env({}) is None
    assert parallel.distributed_env({"ROBUST_ADMM_MULTIHOST": "0"}) is None
    assert parallel.distributed_env({"ROBUST_ADMM_MULTIHOST": "0",
                                     "ROBUST_ADMM_PROCESS_ID": "3"}) is None
    assert parallel.initialize_distributed({}) is False


def test_multihost_env_parsing():
    assert parallel.distributed_env({"ROBUST_ADMM_MULTIHOST": "1"}) == {}
    assert parallel.distributed_env({
        "ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_COORDINATOR": "node001:12355",
        "ROBUST_ADMM_NUM_PROCESSES": "4", "ROBUST_ADMM_PROCESS_ID": "3",
    }) == {"coordinator_address": "node001:12355", "num_processes": 4, "process_id": 3}
    assert parallel.distributed_env({"ROBUST_ADMM_MULTIHOST": "1",
                                     "ROBUST_ADMM_COORDINATOR": "[::1]:80"}) == {
        "coordinator_address": "[::1]:80"}


@pytest.mark.parametrize("env, words", [
    ({"ROBUST_ADMM_MULTIHOST": "yes"}, ["ROBUST_ADMM_MULTIHOST", "'yes'", "1"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_NUM_PROCESSES": "abc"},
     ["ROBUST_ADMM_NUM_PROCESSES", "'abc'", "not an integer"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_NUM_PROCESSES": "0"},
     ["ROBUST_ADMM_NUM_PROCESSES", ">= 1"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_PROCESS_ID": "-1"},
     ["ROBUST_ADMM_PROCESS_ID", ">= 0"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_NUM_PROCESSES": "2",
      "ROBUST_ADMM_PROCESS_ID": "2"}, ["ROBUST_ADMM_PROCESS_ID=2", "NUM_PROCESSES=2"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_COORDINATOR": "node001"},
     ["ROBUST_ADMM_COORDINATOR", "'node001'", "host:port"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_COORDINATOR": "node001:http"},
     ["ROBUST_ADMM_COORDINATOR", "'http'", "1..65535"]),
    ({"ROBUST_ADMM_MULTIHOST": "1", "ROBUST_ADMM_COORDINATOR": ":1234"},
     ["ROBUST_ADMM_COORDINATOR", "host:port"]),
    ({"ROBUST_ADMM_PROCESS_ID": "1"}, ["ROBUST_ADMM_PROCESS_ID", "ROBUST_ADMM_MULTIHOST=1"]),
])
def test_env_validation_errors(env, words, monkeypatch):
    for k in list(os.environ):
        if k.startswith("ROBUST_ADMM_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # Through os.environ, as in a real launch; fails before jax.distributed is touched.
    with pytest.raises(ValueError) as err:
        parallel.initialize_distributed()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_check_global_batch_and_process_slice():
    assert parallel.check_global_batch(32, 8) == 4
    with pytest.raises(ValueError, match=r"eval\.batch_size=5 .*\(4\).*4 or 8"):
        parallel.check_global_batch(5, 4, field="eval.batch_size")
    with pytest.raises(ValueError, match=r"batch_size=3 .*\(8\).*Nearest valid values: 8$"):
        parallel.check_global_batch(3, 8)
    with pytest.raises(ValueError, match="positive"):
        parallel.check_global_batch(0, 8)
    assert parallel.process_slice(12, process_index=2, process_count=3) == slice(8, 12)
    with pytest.raises(ValueError, match="10 .*3 processes"):
        parallel.process_slice(10, process_index=0, process_count=3)


def test_single_process_helpers():
    """In-process (1 CPU device here): the same code path a laptop run takes."""
    import jax
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("data",)
    x = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    g = parallel.host_local_batch_to_global({"x": x}, mesh)
    np.testing.assert_array_equal(np.asarray(g["x"]), x)
    r = parallel.replicate({"a": x, "s": 3}, mesh)
    assert r["a"].sharding == parallel.replicated(mesh)
    assert parallel.is_main_process()
    assert parallel.process_slice(7) == slice(0, 7)


def test_a_replicated_state_keeps_a_step_compiled_once():
    """A state made on one device (arrays not yet committed to a sharding) is placed as the
    step's outputs are, so the step's second call hits jit's cache. Left as it was (it is
    equivalent on a one-device mesh), every program of a phase's step compiled twice."""
    import jax
    import jax.numpy as jnp
    mesh = parallel.make_mesh(jax.devices()[:1])
    made = {"w": jnp.zeros(3), "step": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}
    state = parallel.replicate(made, mesh)
    assert all(x.sharding == parallel.replicated(mesh) for x in jax.tree.leaves(state))
    step = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1,
                              "key": jax.random.fold_in(s["key"], 1)},
                   out_shardings=parallel.replicated(mesh))
    out = step(step(state))
    assert int(out["step"]) == 2 and step._cache_size() == 1
