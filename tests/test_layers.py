"""The package's layers (README, Architecture): every import runs down a layer or stays in
its own, and no modules import each other in a cycle. Read from the source with `ast`, so
an import inside a function counts as much as one at the top."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "robust_admm"

# Highest first. A module may import from its own layer or any layer below it.
LAYERS = {
    "entry": 7,        # robust_admm.train, .eval, .export, .study, .report, .shards, .cli
    "experiments": 6,
    "training": 5,
    "evaluation": 4,
    "compression": 3,
    "data": 2,
    "runtime": 1,
    "attacks": 0,
    "models": 0,
}
ENTRY_POINTS = ("train", "eval", "export", "study", "report", "shards")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a module of the package, by its subpackage."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ENTRY_POINTS + ("cli", "__main__"):
        return "entry"
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add its subpackage to LAYERS and to "
                             f"the README's Architecture section")
    return parts[1]


def imports_of(path: pathlib.Path, module: str | None = None) -> set:
    """The package's modules that `path` (the source of `module`, by default the module
    at that path) imports; a `from pkg import name` of a submodule counts as importing
    that submodule."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("robust_admm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("robust_admm"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    found.discard(module)
    return found


def graph() -> dict:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(g: dict) -> list:
    bad = []
    for module, deps in g.items():
        for dep in deps:
            if dep == "robust_admm" and module != "robust_admm":
                bad.append(f"{module} imports the package root (import from its layer)")
            elif LAYERS[layer_of(dep)] > LAYERS[layer_of(module)]:
                bad.append(f"{module} ({layer_of(module)}) imports {dep} ({layer_of(dep)})")
            elif layer_of(dep) == "entry" and dep.split(".")[-1] in ENTRY_POINTS:
                bad.append(f"{module} imports the entry point {dep}: entry points share "
                           f"functions from experiments, never each other")
    return bad


def cycles(g: dict) -> list:
    """One module path per cycle found by a depth-first search."""
    out, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                out.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return out


def test_every_import_runs_down_a_layer_and_none_closes_a_cycle():
    g = graph()
    assert "robust_admm.training.step" in g and "robust_admm.compression.admm" in g
    assert upward_imports(g) == []
    assert cycles(g) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks themselves, on a made-up graph: they can fail."""
    g = {"robust_admm.compression.admm": {"robust_admm.training.step"},
         "robust_admm.training.step": {"robust_admm.training.loop"},
         "robust_admm.training.loop": {"robust_admm.training.step"},
         "robust_admm.train": {"robust_admm.eval"}, "robust_admm.eval": set()}
    assert upward_imports(g) == [
        "robust_admm.compression.admm (compression) imports robust_admm.training.step "
        "(training)",
        "robust_admm.train imports the entry point robust_admm.eval: entry points share "
        "functions from experiments, never each other"]
    assert cycles(g) == ["robust_admm.training.step -> robust_admm.training.loop -> "
                         "robust_admm.training.step"]


def test_imports_are_read_from_function_bodies_and_relative_forms(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("def f():\n    from robust_admm.experiments import run\n"
                   "from . import step\nfrom ..compression.admm import penalty\n"
                   "import robust_admm.runtime.logs\n")
    assert imports_of(src, "robust_admm.training.probe") == {
        "robust_admm.experiments.run", "robust_admm.training.step",
        "robust_admm.compression.admm", "robust_admm.runtime.logs"}


@pytest.mark.parametrize("module", ["robust_admm.cli"])
def test_the_dispatcher_reaches_the_entry_points_by_name_only(module):
    """`robust-admm VERB` imports the verb's entry point by name (importlib), so no entry
    point imports another one."""
    g = graph()
    assert not any(d.split(".")[-1] in ENTRY_POINTS for d in g[module])
