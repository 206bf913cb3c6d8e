"""robust_admm.runtime.host_memory: large blocks freed by a worker thread are reused
without new page faults in 'reuse' mode, and faulted in again on every allocation with
the system's defaults (the control that shows the check can fail)."""
import json
import subprocess
import sys

import pytest

from robust_admm.runtime import host_memory

SIZE = 256 << 20  # a block larger than a worker thread's malloc heap (64 MB)

SCRIPT = """
import ctypes, json, resource, sys, threading
from robust_admm.runtime import host_memory
host_memory.configure(sys.argv[1])
libc = host_memory._glibc()
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def work():  # as XLA's worker threads do with a program's buffers: allocate, touch, free
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(%d)
        ctypes.memset(p, 1, %d)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(faults))
""" % (SIZE, SIZE)


def faults_per_round(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the settings are glibc's")
def test_reuse_mode_keeps_freed_blocks_and_system_mode_does_not():
    pages = SIZE // 4096
    reuse, system = faults_per_round("reuse"), faults_per_round("system")
    assert reuse[0] > sum(reuse[1:]), reuse  # the first touch faults the pages in
    assert sum(reuse[1:]) < 0.01 * pages, reuse  # then they are reused
    assert sum(system[1:]) > 10 * sum(reuse[1:]) + 100, (system, reuse)


def test_modes_are_checked_and_auto_picks_by_model():
    assert host_memory.configure("system").startswith("host malloc: the C library")
    for bad in ("fast", "auto"):
        with pytest.raises(ValueError, match=f"'{bad}'.*allowed.*'reuse', 'system'"):
            host_memory.configure(bad)
    with pytest.raises(ValueError, match="'fast'.*allowed.*'auto', 'reuse', 'system'"):
        host_memory.resolve("fast", "vgg16")
    assert host_memory.resolve("auto", "vgg16") == "reuse"
    assert host_memory.resolve("auto", "resnet18") == "reuse"
    assert host_memory.resolve("auto", "wrn28_4") == "reuse"
    assert host_memory.resolve("auto", "lenet_adv") == "system"
    assert host_memory.resolve("auto", "wrn28_4x") == "system"
    assert host_memory.resolve("system", "vgg16") == "system"
