"""The step benchmark runs the project's real steps end to end (tiny settings), in both
modes, and counts FLOPs as the hand count of LeNet_adv's layers says. The GPU check runs
every section shrunk to CPU sizes and reports each row as its own numbers say."""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "step.py")
GPU_CHECK = os.path.join(BENCHMARKS, "gpu_check.sh")


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


@pytest.mark.slow
def test_gpu_check_shrunk_runs_every_row(tmp_path):
    out = subprocess.run([GPU_CHECK, "--out", str(tmp_path), "--shrink"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["a1", "a2", "a3", "b1", "b2", "c1"], list(rows)
    assert report["device"]["backend"] == "cpu" and report["shrink"] is True
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["status"])
        assert r["img_per_s"] > 0 and r["batch"] >= 1, (name, r)
        # The img/s reported is the median of the timed repeats (AutoAttack: images over
        # its wall time); compilation is timed for every row that compiles.
        if name != "c1":
            assert r["rates"] and all(x > 0 for x in r["rates"]), (name, r["rates"])
            assert r["img_per_s"] == pytest.approx(statistics.median(r["rates"])), name
        if name != "a2":
            assert r["compile_s"] > 0, (name, r)
    assert rows["a2"]["compile_s"] is None
    assert [rows[b]["dtype"] for b in ("a1", "a3", "b1", "b2")] == [
        "bfloat16", "bfloat16", "float32", "bfloat16"]
    shares = rows["a3"]["input_wait_shares"]
    assert shares and all(0 <= s <= 1 for s in shares)
    assert rows["a3"]["input_wait_share"] == pytest.approx(statistics.median(shares))
    aa = rows["c1"]
    # Labels are the model's predictions: every image is correct, so APGD-CE attacks all,
    # and each later member only the images still robust before it.
    assert aa["natural_acc"] == 1.0
    points = [aa["member_points"][m] for m in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert points[0] == 8 and points == sorted(points, reverse=True)
    assert aa["robust_acc"] * 8 <= points[-1]
    assert aa["img_per_s"] == pytest.approx(8 / aa["seconds"])
    # The device line first, then one table line per row, as the JSON says.
    lines = out.stdout.splitlines()
    assert lines[0].startswith("device: ") and "cpu" in lines[0], lines[0]
    table = [ln for ln in lines if re.match(r"\| [abc]\d \|", ln)]
    assert [ln.split("|")[1].strip() for ln in table] == list(rows), table
    a3 = [c.strip() for c in table[2].strip("|").split("|")]
    assert a3[6] == f"{100 * rows['a3']['input_wait_share']:.0f}%", a3
    for name in ("a2", "a3"):  # each streamed rate against the on-device split's
        ratio = re.search(rf"^{name} / a1 = ([\d.]+) ", out.stdout, re.M)
        assert ratio and float(ratio.group(1)) == pytest.approx(
            rows[name]["img_per_s"] / rows["a1"]["img_per_s"], abs=0.006), out.stdout
    with open(tmp_path / "gpu_check.md") as f:
        assert f.read().splitlines() == lines[lines.index(table[0]) - 5:]


def test_gpu_check_skips_the_rows_the_budget_cannot_hold(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--out",
                          str(tmp_path), "--shrink", "--budget-s", "0"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        rows = json.load(f)["rows"]
    assert [r["row"] for r in rows] == ["a1", "a2", "a3", "b1", "b2", "c1"]
    for r in rows:
        assert r["status"].startswith("skipped: ") and "img_per_s" not in r, r


def test_gpu_check_script_lints_and_stops_at_its_limit(tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; install it (apt-get install shellcheck) to "
                    "lint benchmarks/gpu_check.sh, as tests/test_launch.py lints launch.sh")
    proc = subprocess.run(["shellcheck", GPU_CHECK], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([GPU_CHECK], capture_output=True, text=True)
    assert proc.returncode == 2 and "--out DIR is required" in proc.stderr, proc.stderr
    proc = subprocess.run([GPU_CHECK, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("The project's speeds"), proc.stdout
    # Past its limit the wrapper stops the run, says so and shows what was finished (here
    # nothing: 1 s ends it before the first row).
    proc = subprocess.run([GPU_CHECK, "--out", str(tmp_path), "--shrink"], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_LIMIT_S": "1"})
    assert proc.returncode == 124, proc.stdout + proc.stderr
    assert "stopped at the 1 s limit" in proc.stderr and "(none: " in proc.stdout, proc
