"""The fields of a study config (`configs/studies/*.py`), and the grids of the papers'
studies built from a training config. A study is a set of named cells, each a whole
training config (any program) plus how it relates to other cells:

- `start_from`: a cell whose first phase this cell shares: that phase's finished
  checkpoints are copied and this cell runs the rest of its program (e.g. the same dense
  model pruned at several rates, pretrained once). The two configs must agree on everything
  the shared phase depends on.
- `inherit_from`: a cell whose final pruned model this cell inherits (`init.inherit_from`;
  experiments/inherit.py says exactly what is inherited).
- `labels`: what the report groups and plots by: `kind` (of compression), `size` (the width
  whose size the model has), `init` ('scratch' | 'pruned' | 'inherited'), free others.
"""
import importlib.util
import os

import ml_collections

CELL_INITS = ("scratch", "pruned", "inherited")


def study_base() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.name = ""
    # Applied to every cell when set: where the data come from (e.g. offline machines:
    # --config.data.source=files --config.data.dir=/path/to/mnist).
    s.data = ml_collections.ConfigDict({"source": "", "dir": ""})
    # Every cell's final model is evaluated with these attacks (robust_admm.eval's names)
    # on the first `n` test images (0 = all), at the dataset's standard epsilon.
    s.eval = ml_collections.ConfigDict({"attacks": "pgd40,aa-standard", "n": 1000,
                                        "batch": 500, "seed": 0})
    s.poll_s = 30.0  # how often a process with nothing to claim looks again
    # How often a cell's time record is saved: a killed process's time is counted up to its
    # last save (experiments/study.py, CellClock).
    s.clock_every_s = 10.0
    s.cells = ml_collections.ConfigDict()
    return s


def train_config(here: str, path: str, preset: str = ""):
    """The training config of the config file at `path` (relative to the file `here`, a
    study config's `__file__`) with `preset`: studies build their cells from the dataset
    configs, wherever the command is run from."""
    full = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(here)), path))
    spec = importlib.util.spec_from_file_location(
        "_study_train_config_" + os.path.basename(full).removesuffix(".py"), full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def cell(train, start_from: str = "", inherit_from: str = "", **labels):
    """One cell: its training config and its relations to other cells (see above)."""
    c = ml_collections.ConfigDict()
    c.train = train
    c.start_from = start_from
    c.inherit_from = inherit_from
    c.labels = ml_collections.ConfigDict(labels)
    return c


def width_grid(train_at, widths, large: int, epochs: dict, layers: str,
               inherit: str = "initial") -> ml_collections.ConfigDict:
    """The paper's width study (its Table 2) as cells:

    - `w{w}`: adversarial training from scratch at each width in `widths` and at `large`
      (program: one dense phase of `epochs['pretrain']` epochs);
    - `w{large}_to_w{w}`: the width-`large` model, pretrained once (the `w{large}` cell),
      pruned by admm + retrain to the size of width w (irregular, `layers`);
    - `w{w}_inherited`: the width-`large` model with that pruned model's masks, trained
      from the `inherit` weights ('initial' = the large model's initial weights at the kept
      positions: the lottery-ticket test) for as long as the from-scratch cells.

    `train_at(width)` returns a training config whose program is pretrain, admm, retrain."""
    cells = ml_collections.ConfigDict()
    for w in sorted(set(widths) | {large}):
        c = _with_epochs(train_at(w), epochs)
        c.program = "pretrain"
        cells[f"w{w}"] = cell(c, kind="dense", size=w, init="scratch")
    for w in sorted(widths):
        c = _with_epochs(train_at(large), epochs)
        c.prune.kind, c.prune.to_width, c.prune.to_width_layers = "irregular", w, layers
        cells[f"w{large}_to_w{w}"] = cell(c, start_from=f"w{large}", kind="irregular",
                                          size=w, init="pruned")
    for w in sorted(widths):
        c = _with_epochs(train_at(large), epochs)
        c.program = "pretrain"
        c.init.inherit = inherit
        cells[f"w{w}_inherited"] = cell(c, inherit_from=f"w{large}_to_w{w}",
                                        kind="irregular", size=w, init="inherited")
    return cells


def kinds_grid(train, kinds: dict, epochs: dict) -> ml_collections.ConfigDict:
    """Compression kinds compared at equal rates: one dense cell (`dense`), then for each
    `kinds[name] = {rate: rules}` one cell `{name}_{rate}` pruned from it by admm + retrain."""
    cells = ml_collections.ConfigDict()
    dense = _with_epochs(train.copy_and_resolve_references(), epochs)
    dense.program = "pretrain"
    cells["dense"] = cell(dense, kind="dense", rate=1.0, init="scratch")
    for kind, rates in kinds.items():
        for rate, rules in rates.items():
            c = _with_epochs(train.copy_and_resolve_references(), epochs)
            c.admm.rules = rules
            cells[f"{kind}_{rate:g}x"] = cell(c, start_from="dense", kind=kind, rate=rate,
                                              init="pruned")
    return cells


def _with_epochs(c, epochs: dict):
    for phase, n in epochs.items():
        c[phase].epochs = n
    return c
