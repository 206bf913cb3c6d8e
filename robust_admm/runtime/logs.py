"""What a run logs: JSONL metrics, progress with img/s and ETA, the final table.
(Reports with plots: robust_admm/experiments/report.py.)"""
import json
import math
import os
import sys
import time

import jax
import numpy as np

from robust_admm.runtime.parallel import is_main_process


def to_python(x):
    """JSON-serialisable copy of numbers, arrays and nested dicts/lists."""
    if isinstance(x, dict):
        return {str(k): to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    if hasattr(x, "shape") and getattr(x, "shape", None) == ():
        x = x.item()
    elif hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class MetricsWriter:
    """Appends one JSON object per line to the file `path` (a run's metrics.jsonl)."""

    def __init__(self, path: str):
        self.path = path
        self.enabled = is_main_process()

    def truncate_after(self, stage: str, step: int, later_stages=()):
        """Drops the records of `stage` after `step` and of every later stage: a resumed
        stage writes them again, so the file reads as if the run had never stopped."""
        if not self.enabled or not os.path.exists(self.path):
            return
        later = set(later_stages)
        keep = [json.dumps(r) + "\n" for r in read_jsonl(self.path)
                if not (r.get("stage") in later
                        or (r.get("stage") == stage and r.get("step", 0) > step))]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, **record):
        if not self.enabled:
            return
        record = to_python(record)
        record.setdefault("time", time.time())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """Images per second and ETA of a stage, measured between calls to `update`; the first
    step, which compiles, is timed apart (`compiled`) so rates are the running speed."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
        self.total, self.batch = total_steps, batch_size
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start_step
        self.compile_s = None
        self.rates = []  # img/s of each interval since the first step
        self.wait = 0.0  # seconds spent waiting for input in this interval

    def compiled(self, step: int):
        """The first step (`step`) has finished, compilation included."""
        now = time.perf_counter()
        self.compile_s, self.t_last, self.step_last = now - self.t0, now, step
        self.wait = 0.0

    def waited(self, seconds: float):
        """The loop waited `seconds` for a step's input."""
        self.wait += seconds

    def update(self, step: int) -> dict:
        """img/s, ETA and the share of the interval spent waiting for input."""
        now = time.perf_counter()
        elapsed = max(now - self.t_last, 1e-9)
        rate = (step - self.step_last) / elapsed
        share, self.wait = min(self.wait / elapsed, 1.0), 0.0
        self.t_last, self.step_last = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        self.rates.append(rate * self.batch)
        return {"img_per_s": rate * self.batch, "eta_s": eta, "input_wait_share": share}

    def median_img_per_s(self) -> float | None:
        return float(np.median(self.rates)) if self.rates else None


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"



def log(msg: str):
    if is_main_process():
        print(msg, flush=True, file=sys.stdout)


def log_any(msg: str):
    """A line from whichever process has something to say (each reads its own files),
    prefixed with its index in a multi-process run."""
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    print(prefix + msg, flush=True, file=sys.stdout)


def exit_on_error(fn, *args, errors=()):
    """`fn(*args)`; on bad input or a diverged run (and `errors`), the message alone (it
    says what to do, no traceback) and exit status 2 (3: non-finite training)."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError, NotImplementedError, FloatingPointError,
            *errors) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3 if isinstance(e, FloatingPointError) else 2)


def read_json(path: str):
    """The JSON value in the file `path`; a ValueError naming the file if it holds none."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file ({type(e).__name__}: {e})") \
            from None


def read_json_object(path: str) -> dict:
    """`read_json` of a file that must hold a JSON object (a config, a result)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_jsonl(path: str) -> list:
    """The records of a JSONL file (lines cut short by a crash skipped; [] if none)."""
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


def write_json(path: str, obj, indent: int = 2):
    """Writes JSON atomically (a temporary file renamed), from process 0 only."""
    if not is_main_process():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_python(obj), f, indent=indent)
    os.replace(tmp, path)


def summary_table(summary: dict) -> str:
    """The per-stage results as a text table (the robust accuracy's column, named by its
    attack, only where an attack measured one)."""
    attack = next((r["adv_attack"] for r in summary["stages"].values()
                   if r.get("adv_attack") and "adv_acc" in r), None)
    adv = (f"adv_acc: {attack.split(' (')[0]}",) if attack else ()
    rows = [("stage", "nat_acc", *adv, "compression (all)", "compression (pruned)",
             "stored (vs float32)", "train img/s")]
    for stage, r in summary["stages"].items():
        c = r["compression_rate"]
        size = r.get("size", {}).get("total")
        stored = (f"{size['bytes'] / 1024:.1f} KiB ({size['rate_by_bytes']:.2f}x)" if size
                  else "")
        rate = (r.get("speed") or {}).get("img_per_s")
        robust = (f"{100 * r['adv_acc']:.2f}%" if "adv_acc" in r else "",) if attack else ()
        rows.append((stage, f"{100 * r['nat_acc']:.2f}%", *robust,
                     f"{c['all']:.2f}x", f"{c['pruned']:.2f}x", stored,
                     f"{rate:.0f}" if rate else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if attack:
        lines.append(f"adv_acc: accuracy under {attack}; AutoAttack: python -m "
                     f"robust_admm.eval --workdir <this workdir>")
    return "\n".join(lines)


def mean_metrics(history: list) -> dict:
    """Mean of each metric over a list of per-step metric dicts (already on the host)."""
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}
