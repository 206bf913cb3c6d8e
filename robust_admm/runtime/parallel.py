"""Data parallelism from one CPU to a TPU pod: the mesh, shardings and multi-host helpers.

One mesh axis, `data`, spans every device of every process. The train state is
replicated (`P()`), batches are split along their first dimension (`P('data')`), and XLA
inserts the gradient all-reduce. The same program runs on 1 CPU, 8 GPUs or a pod; only the
device count changes.

Multi-host runs are opted into through environment variables (set by launch.sh):

    ROBUST_ADMM_MULTIHOST=1           required to initialise jax.distributed
    ROBUST_ADMM_COORDINATOR=host:port optional; process 0's address
    ROBUST_ADMM_NUM_PROCESSES=N       optional; positive integer
    ROBUST_ADMM_PROCESS_ID=i          optional; 0 <= i < N

Whatever is left out is auto-detected by `jax.distributed.initialize` (TPU pods, Slurm,
Open MPI ...); with none of the three set it is called without arguments.
"""
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

ENV_MULTIHOST = "ROBUST_ADMM_MULTIHOST"
ENV_COORDINATOR = "ROBUST_ADMM_COORDINATOR"
ENV_NUM_PROCESSES = "ROBUST_ADMM_NUM_PROCESSES"
ENV_PROCESS_ID = "ROBUST_ADMM_PROCESS_ID"


# ------------------------------------------------------------------------ mesh, shardings

def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh, axis `data` (AxisType.Auto), over `devices` (default: all devices).

    The default order is by (process index, device id), so each process owns a contiguous
    block of the `data` axis, which is what `process_slice` and
    `host_local_batch_to_global` assume. Explicit `devices` are used in the order given.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the train state)."""
    return NamedSharding(mesh, P())


def batch_constraint(mesh: Mesh | None):
    """x -> x constrained to be split along the mesh's `data` axis (identity without one)."""
    if mesh is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The first dimension is split across the `data` axis (batches)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def _count(mesh_or_count) -> int:
    if isinstance(mesh_or_count, Mesh):
        return int(mesh_or_count.size)
    return int(mesh_or_count)


def check_global_batch(batch_size: int, mesh_or_count, field: str = "batch_size") -> int:
    """Check that a global batch splits evenly over the devices; returns the per-device size.

    Raises a ValueError naming `field`, the value, the device count and the nearest valid
    values, before anything is compiled (an uneven split fails deep inside XLA otherwise).
    """
    n = _count(mesh_or_count)
    if n < 1:
        raise ValueError(f"device count must be >= 1, got {n}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{field}={batch_size!r} must be a positive integer (a multiple of "
                         f"the {n} devices)")
    batch_size = int(batch_size)
    if batch_size % n:
        lower = (batch_size // n) * n
        nearest = [v for v in (lower, lower + n) if v > 0]
        raise ValueError(
            f"{field}={batch_size} is not divisible by the number of devices ({n}); the "
            f"global batch is split evenly across devices. Nearest valid values: "
            f"{' or '.join(map(str, nearest))}")
    return batch_size // n


# ------------------------------------------------------------------------------ multi-host

def _parse_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _parse_coordinator(env: Mapping[str, str]) -> str | None:
    raw = env.get(ENV_COORDINATOR)
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    host, sep, port = raw.rpartition(":")
    if not sep or not host or host in ("[", "[]"):
        raise ValueError(f"{ENV_COORDINATOR}={raw!r} must be host:port, e.g. "
                         f"node001:12355 or [::1]:12355")
    try:
        port_num = int(port)
    except ValueError:
        port_num = -1
    if not 0 < port_num < 65536:
        raise ValueError(f"{ENV_COORDINATOR}={raw!r}: port {port!r} must be an integer in "
                         f"1..65535")
    return raw


def distributed_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """Validated `jax.distributed.initialize` keyword arguments from the environment.

    None when the run is not multi-host (ROBUST_ADMM_MULTIHOST unset, empty or 0); {} means
    "initialise and let JAX auto-detect everything". Pure: touches no JAX state.
    """
    env = os.environ if environ is None else environ
    flag = env.get(ENV_MULTIHOST, "").strip()
    others = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
              if env.get(n, "").strip()]
    if flag not in ("", "0", "1"):
        raise ValueError(f"{ENV_MULTIHOST}={env.get(ENV_MULTIHOST)!r}; allowed: 1 (multi-host) "
                         f"or 0/unset (single process)")
    if flag == "":
        if others:
            raise ValueError(f"{', '.join(others)} set but {ENV_MULTIHOST} is not; set "
                             f"{ENV_MULTIHOST}=1 for a multi-host run (or unset them)")
        return None
    if flag == "0":
        return None
    kwargs = {}
    coordinator = _parse_coordinator(env)
    num_processes = _parse_int(env, ENV_NUM_PROCESSES, minimum=1)
    process_id = _parse_int(env, ENV_PROCESS_ID, minimum=0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be < "
                         f"{ENV_NUM_PROCESSES}={num_processes}")
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    return kwargs


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize` when the environment asks for a multi-host run.

    Call it first thing, before any other JAX call (JAX refuses to initialise once a
    backend exists). Returns True when this call initialised jax.distributed; False for a
    single-process run, or when it was already initialised (so calling twice is safe).
    The environment is validated before JAX is touched.
    """
    kwargs = distributed_env(environ)
    if kwargs is None or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(**kwargs)
    return True


def all_processes_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: every process must call it);
    lets a check split across processes fail on all of them, not hang the others."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, metrics and summaries."""
    return jax.process_index() == 0


def process_slice(global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """The contiguous rows of a global batch this process loads (by process index)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                         f"{count} processes; each process loads an equal slice")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def host_local_batch_to_global(local_batch, mesh: Mesh):
    """Assemble a global batch, sharded along `data`, from every process's slice.

    `local_batch` (an array or pytree of arrays) holds this process's rows, e.g.
    `global[process_slice(n)]`; the result is a global jax.Array of n rows. Single process:
    the local batch is the global batch.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local_devices == 0:
        raise ValueError(f"process {jax.process_index()} owns no device of the mesh")

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % local_devices:
            raise ValueError(f"local batch of shape {x.shape}: the first dimension must be "
                             f"divisible by this process's {local_devices} devices")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(one, local_batch)


def replicate(tree, mesh: Mesh):
    """Put a pytree on every device of `mesh`, replicated (e.g. the initial train state).

    Multi-host: every process must pass the same values (same seed); each process supplies
    the data for its own devices. Typed PRNG keys are supported.
    """
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already replicated over this mesh (e.g. the previous stage's result)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=impl)
        if jax.process_count() == 1:
            # Also for an array on one device that is equivalent on a one-device mesh: jit
            # keys its cache on the sharding, so a state not placed as the step's outputs
            # are would compile every program of the step again at its second call.
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(one, tree)
