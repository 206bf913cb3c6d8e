"""The step benchmark runs the project's real steps end to end (tiny settings), in both
modes, and counts FLOPs as the hand count of LeNet_adv's layers says."""
import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "step.py")


def lenet_adv_forward_flops(w: int) -> int:
    """2 x multiply-adds of one forward pass: 5x5 'same' convs 1 -> 2w on 28x28 and
    2w -> 4w on 14x14, dense 7*7*4w -> 64w and 64w -> 10."""
    return 2 * (28 * 28 * 2 * w * 25 + 14 * 14 * 4 * w * 25 * 2 * w
                + 7 * 7 * 4 * w * 64 * w + 64 * w * 10)


@pytest.mark.parametrize("mode, passes", [("train", 2 * 2 + 3), ("eval", 2 * 2 + 2)])
def test_step_benchmark_times_the_step_and_counts_its_flops(mode, passes):
    out = subprocess.run(
        [sys.executable, SCRIPT, "--mode", mode, "--model", "lenet_adv", "--width", "16",
         "--steps", "2", "--batch", "8", "--iters", "2", "--repeats", "3", "--warmup", "0"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = dict(re.findall(r"(\S+?)=(\S+)", line))
    assert (result["mode"], result["steps"], result["batch"]) == (mode, "2", "8")
    # The rate is the median of the three repeats' rates it prints, and the GFLOP/s that
    # rate times the FLOPs of an image (each printed rounded).
    repeats = re.search(r"img/s per repeat ([\d.]+), ([\d.]+), ([\d.]+);", out.stdout)
    assert repeats, out.stdout
    assert float(result["img/s"]) == pytest.approx(sorted(map(float, repeats.groups()))[1],
                                                  abs=0.06)
    expected = passes * lenet_adv_forward_flops(16) / 1e9
    assert float(result["gflop_per_img"]) == pytest.approx(expected, abs=1e-4)
    assert float(result["gflops"]) == pytest.approx(
        float(result["img/s"]) * float(result["gflop_per_img"]), rel=1e-3, abs=0.06)


def test_all_prints_a_table_against_the_larger_peak_reading():
    out = subprocess.run(
        [sys.executable, SCRIPT, "--all", "--only", "lenet_adv:1", "--rounds", "1",
         "--iters", "1", "--repeats", "1", "--warmup", "0", "--peak-n", "512"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    readings = [float(v) for v in re.findall(r"matmul peak (?:before|after) ([\d.]+)", out.stdout)]
    assert len(readings) == 2
    row = [ln for ln in out.stdout.splitlines() if ln.startswith("| lenet_adv w=1 PGD-40 b=64 ")]
    assert len(row) == 1, out.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    rate, gflops, peak, share = float(cells[2]), float(cells[3]), float(cells[4]), cells[5]
    assert peak == pytest.approx(max(readings), abs=0.05)
    # The cells are rounded (img/s to 0.01, GFLOP/s and the peak to 0.1, the share to 1%).
    assert gflops == pytest.approx(rate * (2 * 40 + 3) * lenet_adv_forward_flops(1) / 1e9,
                                   rel=1e-3, abs=0.06)
    assert share.endswith("%")
    assert float(share[:-1]) == pytest.approx(100 * gflops / peak, abs=0.5 + 100 * 0.06 / peak)
